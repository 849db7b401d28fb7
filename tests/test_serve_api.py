"""The serving API in process (FastAPI's test client) with a stand-in predictor that waits to be released:
the bounded queue, cancelling, the keep time, and the refusals of `voxseg serve`'s flags."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serve_helpers import write_cases
from test_predictor import tiny_plan
from voxseg.cli import main
from voxseg.errors import ConfigError
from voxseg.serve import require_serve_extra

pytest.importorskip("fastapi")
pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")


class HeldPredictor:
    """Answers zeros of the image's shape once `release` is set; counts the cases it was given."""

    def __init__(self) -> None:
        import torch

        self.plan = tiny_plan()
        self.device = torch.device("cpu")
        self.release = threading.Event()
        self.predicted: list[str] = []

    def postprocessing_spec(self) -> None:
        return None

    def predict_array(self, image: np.ndarray, geometry, return_probabilities: bool = False,
                      name: str = "") -> np.ndarray:
        assert self.release.wait(timeout=30)
        self.predicted.append(name)
        return np.zeros(image.shape[1:], np.uint8)


@pytest.fixture
def api(tmp_path):
    from fastapi.testclient import TestClient

    from voxseg.serve.app import ServeSettings, create_app

    predictor = HeldPredictor()
    settings = ServeSettings(tmp_path / "jobs", max_queue=2, keep_seconds=0.5)
    cases = write_cases(tmp_path / "cases", 4)
    with TestClient(create_app(predictor, settings)) as client:
        yield client, predictor, cases, settings
        predictor.release.set()


def _upload(client, files, route="/v1/jobs"):
    return client.post(route, files=[("files", (path.name, path.read_bytes())) for path in files])


def _wait(client, job_id, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"/v1/jobs/{job_id}")
        if answer.status_code == 404 or answer.json()["state"] in states:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not in {states}: {answer.json()}")


def test_a_full_queue_answers_503_with_retry_after_and_takes_jobs_again_once_it_drains(api):
    client, predictor, cases, _ = api
    first, second = (_upload(client, files) for _, files in cases[:2])
    assert first.status_code == second.status_code == 202
    full = _upload(client, cases[2][1])
    assert full.status_code == 503 and full.headers["retry-after"] == "5"
    assert "queue is full (2 jobs" in full.json()["detail"]
    assert "voxseg_rejected_total 1" in client.get("/metrics").text
    predictor.release.set()
    for answer in (first, second):
        done = _wait(client, answer.json()["id"], ("done",)).json()
        assert done["progress"] == 1.0 and set(done["timings"]) == {"read", "predict", "write"}
    assert _upload(client, cases[2][1]).status_code == 202
    assert predictor.predicted[:2] == ["case000", "case001"]


def test_cancel_a_queued_and_a_running_job_then_remove_them(api):
    client, predictor, cases, settings = api
    running = _upload(client, cases[0][1]).json()["id"]
    while client.get(f"/v1/jobs/{running}").json()["stage"] != "predicting":  # held there; nothing read ahead
        time.sleep(0.01)
    queued = _upload(client, cases[1][1]).json()["id"]
    assert client.delete(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{running}").json()["cancel_requested"] is True
    predictor.release.set()
    assert _wait(client, running, ("cancelled",)).json()["state"] == "cancelled"
    refused = client.get(f"/v1/jobs/{running}/result")
    assert refused.status_code == 409 and "is cancelled" in refused.json()["detail"]
    assert predictor.predicted == ["case000"]  # the queued one never reached the device
    assert client.delete(f"/v1/jobs/{running}").json()["state"] == "removed"
    assert client.get(f"/v1/jobs/{running}").status_code == 404
    assert not (settings.jobs_dir / running).exists()


def test_finished_jobs_are_removed_after_the_keep_time(api):
    client, predictor, cases, settings = api
    predictor.release.set()
    answer = client.post("/v1/segment", files=[("files", (p.name, p.read_bytes())) for p in cases[0][1]])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/gzip"
    job_id = client.get("/v1/jobs").json()["jobs"][0]["id"]
    assert (settings.jobs_dir / job_id / "result.nii.gz").is_file()
    assert _wait(client, job_id, (), timeout=5).status_code == 404  # kept 0.5 s, swept every 0.5 s
    assert not (settings.jobs_dir / job_id).exists()


def test_the_viewer_page_the_openapi_page_and_a_missing_body(api):
    client, _, _, _ = api
    assert "niivue" in client.get("/").text.lower()
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.post("/v1/jobs", content=b"").status_code in (400, 422)


def test_the_serving_extra_missing_is_named_with_its_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "fastapi" else real(name))
    with pytest.raises(ConfigError, match=r"fastapi, not installed: pip install 'voxseg\[serve\]'"):
        require_serve_extra()


def test_serve_flags_are_checked_before_the_model_is_loaded(tmp_path, capsys):
    (tmp_path / "token").write_text("short\n")
    assert main(["serve", str(tmp_path / "none"), "--max-queue", "0"]) != 0
    assert "--max-queue 0: give a positive number" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "none"), "--token-file", str(tmp_path / "token")]) != 0
    assert "at least 16 characters" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "none"), "--token-file", str(tmp_path / "absent")]) != 0
    assert "--token-file" in capsys.readouterr().err
