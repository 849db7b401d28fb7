"""`voxseg serve` as a client sees it: a real server process on a free localhost port and real HTTP requests
(`voxseg.client` and raw urllib): the same segmentation as the Predictor's, concurrent jobs, bad uploads, the
token."""
from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_helpers import Server, one_thread, write_cases
from test_predictor import make_workdir, tiny_plan
from voxseg.client import ServerError, result, segment, status, submit
from voxseg.data.io import read_image
from voxseg.infer.predictor import Predictor

pytest.importorskip("fastapi")
TOKEN = "a-test-token-of-32-characters-xx"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, model folder, root) with a token, a 1 MiB upload limit and a 40,000 voxel image limit."""
    root = tmp_path_factory.mktemp("serve")
    model = make_workdir(root / "model", tiny_plan(), folds=(0,))
    (root / "token").write_text(TOKEN + "\n")
    server = Server(model, root / "jobs", "--token-file", str(root / "token"), "--max-upload-mb", "1",
                    "--max-voxels", "40000")
    yield server, model, root
    server.stop()


@pytest.fixture(scope="module")
def expected(served):
    """What the Predictor itself writes for 50 cases (`predict_files`, as `voxseg predict` runs it)."""
    _, model, root = served
    cases = write_cases(root / "cases", 50)
    with one_thread():
        Predictor.from_workdir(model, device="cpu").predict_files(cases, root / "predicted")
    return cases, {name: read_image(root / "predicted" / f"{name}.nii.gz") for name, _ in cases}


def _post(url, body: bytes, content_type: str, token: str | None = TOKEN):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _files_body(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "testboundary1234"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_segment_is_the_predictors_segmentation_voxel_for_voxel(served, expected, tmp_path):
    server, _, _ = served
    cases, predicted = expected
    for name, files in cases[:3]:
        out = segment(server.url, files, token=TOKEN, output=tmp_path / f"{name}.nii.gz")
        labels, geometry = read_image(out)
        want_labels, want_geometry = predicted[name]
        assert labels.dtype == want_labels.dtype and np.array_equal(labels, want_labels)
        assert np.allclose(geometry.affine, want_geometry.affine)
    labels, _ = segment(server.url, cases[3][1], token=TOKEN)  # no output: arrays
    assert np.array_equal(labels, predicted[cases[3][0]][0])


def test_synchronous_segment_returns_the_file(served, expected, tmp_path):
    server, _, _ = served
    cases, predicted = expected
    name, files = cases[4]
    body, content_type = _files_body([(path.name, path.read_bytes()) for path in files])
    code, data = _post(f"{server.url}/v1/segment", body, content_type)
    assert code == 200
    (tmp_path / "sync.nii.gz").write_bytes(data)
    assert np.array_equal(read_image(tmp_path / "sync.nii.gz")[0], predicted[name][0])


def test_fifty_concurrent_jobs_from_ten_clients_none_lost_or_mixed_up(served, expected, tmp_path):
    server, _, _ = served
    cases, predicted = expected

    def client(share: int) -> dict[str, np.ndarray]:
        mine = cases[share::10]
        return {name: segment(server.url, files, token=TOKEN, timeout=300)[0] for name, files in mine}

    with ThreadPoolExecutor(10) as pool:
        results = {name: labels for part in pool.map(client, range(10)) for name, labels in part.items()}
    assert sorted(results) == sorted(name for name, _ in cases)
    for name, labels in results.items():
        assert labels.shape == predicted[name][0].shape and np.array_equal(labels, predicted[name][0]), name
    metrics = _get(f"{server.url}/metrics")
    assert 'voxseg_jobs{state="failed"} 0' in metrics and "voxseg_queue_length 0" in metrics
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values['voxseg_jobs{state="done"}'] >= 50 and values["voxseg_process_resident_bytes"] > 50e6
    buckets = [value for key, value in values.items() if key.startswith("voxseg_job_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == values["voxseg_job_latency_seconds_count"] >= 50


def _get(url: str, token: str | None = TOKEN) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as answer:
        return answer.read().decode()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def test_bad_uploads_get_4xx_with_a_message_and_the_server_keeps_serving(served, expected, tmp_path):
    server, _, root = served
    cases, predicted = expected
    channel0, channel1 = (path.read_bytes() for path in cases[5][1])
    big = write_cases(tmp_path / "big", 1)[0][1]  # rewritten below at 40^3 > 40,000 voxels
    from voxseg.data.io import Geometry, write_image

    write_image(big[0], np.zeros((40, 40, 40), np.float32), Geometry(np.eye(4)))
    bomb = _zip([("bomb_0000.nii.gz", bytes(3 << 20)), ("bomb_0001.nii.gz", bytes(3 << 20))])
    assert len(bomb) < 100_000
    refusals = {
        "wrong channel count": ([("x_0000.nii.gz", channel0)], 422, "the model expects 2"),
        "not an image": ([("x_0000.nii.gz", b"hello" * 100), ("x_0001.nii.gz", channel1)], 415, "not a readable"),
        "unknown kind": ([("notes.txt", b"hello")], 415, "not an image file"),
        "too many voxels": ([("y_0000.nii.gz", big[0].read_bytes()), ("y_0001.nii.gz", channel1)], 413, "64000"),
        "zip bomb": ([("case.zip", bomb)], 413, "uncompressed"),
        "not a zip": ([("case.zip", b"PK not really")], 415, "not a readable zip"),
    }
    for what, (parts, code, words) in refusals.items():
        answer, data = _post(f"{server.url}/v1/jobs", *_files_body(parts))
        assert answer == code, (what, data)
        assert words in json.loads(data)["detail"], (what, data)
    # too large: refused from the Content-Length, before the body is read (a client still sending would see its
    # connection closed; this one sends the headers and reads the answer first)
    answer, data = _headers_only(server.url, 2 << 20)
    assert answer == 413 and "at most 1048576 bytes (--max-upload-mb)" in json.loads(data)["detail"]
    huge = tmp_path / "huge_0000.nii.gz"
    huge.write_bytes(bytes(2 << 20))
    with pytest.raises(ServerError) as refused:  # the client says so, whether or not the answer got through
        submit(server.url, [huge, cases[5][1][1]], token=TOKEN)
    assert refused.value.status == 413 and "--max-upload-mb" in refused.value.message
    # path-like names are only names: stored inside the job, nothing written where they point
    escape = root.parent / "escaped_0000.nii.gz"
    body, content_type = _files_body([("../../escaped_0000.nii.gz", channel0),
                                      ("/tmp/x/escaped_0001.nii.gz", channel1)])
    answer, data = _post(f"{server.url}/v1/jobs", body, content_type)
    assert answer == 202 and not escape.exists()
    job = json.loads(data)
    assert job["name"] == "escaped"
    zipped = _zip([("../a/b_0000.nii.gz", channel0), ("..\\..\\b_0001.nii.gz", channel1)])
    labels, _ = _segment_zip(server, zipped, tmp_path)
    assert np.array_equal(labels, predicted[cases[5][0]][0])
    assert not (root.parent / "b_0001.nii.gz").exists()
    assert np.array_equal(segment(server.url, cases[6][1], token=TOKEN)[0], predicted[cases[6][0]][0])


def _headers_only(url: str, length: int) -> tuple[int, bytes]:
    """POST /v1/jobs announcing a body of `length` bytes without sending it; (status, body) of the answer."""
    import http.client
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    connection.putrequest("POST", "/v1/jobs")
    for key, value in (("Content-Length", str(length)), ("Authorization", f"Bearer {TOKEN}"),
                       ("Content-Type", "multipart/form-data; boundary=x")):
        connection.putheader(key, value)
    connection.endheaders()
    answer = connection.getresponse()
    try:
        return answer.status, answer.read()
    finally:
        connection.close()


def _segment_zip(server, data: bytes, folder):
    path = folder / "case.zip"
    path.write_bytes(data)
    return segment(server.url, [path], token=TOKEN)


def test_the_token_is_asked_for_everywhere_but_health(served, expected):
    server, _, _ = served
    cases, _ = expected
    body, content_type = _files_body([(path.name, path.read_bytes()) for path in cases[7][1]])
    for token in (None, "wrong-token-of-the-same-length-x"):
        answer, data = _post(f"{server.url}/v1/jobs", body, content_type, token=token)
        assert answer == 401 and "Bearer" in json.loads(data)["detail"]
        with pytest.raises(ServerError) as refused:
            status(server.url, "0" * 32, token=token)
        assert refused.value.status == 401
    assert json.loads(_get(f"{server.url}/healthz", token=None)) == {"status": "ok"}
    assert json.loads(_get(f"{server.url}/readyz", token=None))["channels"] == ["ch0", "ch1"]
    job = submit(server.url, cases[7][1], token=TOKEN)
    assert job["state"] in ("queued", "running", "done")
    with pytest.raises(ServerError) as unknown:
        status(server.url, "f" * 32, token=TOKEN)
    assert unknown.value.status == 404 and "no job" in unknown.value.message


def test_probabilities_of_a_job_sent_with_probabilities(served, expected, tmp_path):
    server, model, _ = served
    cases, predicted = expected
    name, files = cases[8]
    job = submit(server.url, files, token=TOKEN, probabilities=True)
    plain = submit(server.url, cases[9][1], token=TOKEN)
    for job_id in (job["id"], plain["id"]):
        while status(server.url, job_id, token=TOKEN)["state"] != "done":
            time.sleep(0.05)
    with np.load(result(server.url, job["id"], tmp_path / "p.npz", token=TOKEN, probabilities=True)) as saved:
        probabilities, class_names = saved["probabilities"], list(saved["class_names"])
    from voxseg.infer.inputs import read_input_case

    predictor = Predictor.from_workdir(model, device="cpu")
    with one_thread():
        labels, want = predictor.predict_array(*read_input_case(name, files, predictor.plan),
                                               return_probabilities=True)
    assert class_names == predictor.class_names and probabilities.dtype == np.float16
    assert np.array_equal(probabilities, want.astype(np.float16)) and np.array_equal(labels, predicted[name][0])
    with pytest.raises(ServerError) as refused:
        result(server.url, plain["id"], tmp_path / "q.npz", token=TOKEN, probabilities=True)
    assert refused.value.status == 409 and "probabilities=1" in refused.value.message
