"""A round trip through a real PACS: Orthanc with its DICOMweb plugin, started on a free localhost port. A
synthetic CT study is uploaded (STOW-RS), `voxseg predict -i dicomweb://...` retrieves it, writes the DICOM-SEG
and stores it back; the SEG read back from Orthanc equals, segment by segment, the NIfTI prediction of the same
series. Needs the Debian packages orthanc and orthanc-dicomweb (.ci/run installs them; as root the test installs
them when missing): without them the test fails, it does not skip."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from bad_inputs import run
from debian import ensure
from dicom_synth import hounsfield_volume, new_study, oblique_orientation, write_series
from test_dicom_predict import CT_LABELS
from test_predictor import make_workdir, tiny_plan
from voxseg.data.dicom import scan_dicom
from voxseg.data.dicom_volume import series_geometry
from voxseg.data.io import read_image

PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if Path(p).is_file()), None)


def _dicomweb_plugin() -> Path | None:
    found = [p for folder in PLUGIN_FOLDERS for p in sorted(Path(folder).glob("libOrthancDicomWeb.so*"))]
    return found[0] if found else None


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    # installed when missing (as root), else the test fails naming the packages: never skipped
    binary = ensure(_orthanc_binary, ("orthanc", "orthanc-dicomweb"))
    plugin = ensure(_dicomweb_plugin, ("orthanc-dicomweb",))
    root, port = tmp_path_factory.mktemp("orthanc"), _free_port()
    config = {"Name": "voxseg-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [str(plugin)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if requests.get(f"{url}/dicom-web/studies", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"Orthanc did not answer on {url} within 20 s: {(root / 'orthanc.log').read_text()[-2000:]}")
        if process.poll() is not None:
            pytest.fail(f"Orthanc stopped: {(root / 'orthanc.log').read_bytes()[-2000:].decode(errors='replace')}")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_predict_pulls_a_study_from_orthanc_and_stores_the_seg_back(orthanc, tmp_path):
    model = make_workdir(tmp_path / "model", tiny_plan(CT_LABELS, channels=1), seed=1)
    stored = hounsfield_volume((12, 24, 20)) + 1024
    info = write_series(tmp_path / "local", stored, orientation=oblique_orientation(), intercept=-1024.0,
                        order="shuffled", study=new_study("PACS1"))
    client = DICOMwebClient(url=f"http://{orthanc}/dicom-web")
    client.store_instances([pydicom.dcmread(path) for path in info.files])
    fast = ["--device", "cpu", "--folds", "0", "--no-mirror"]
    source = f"dicomweb://{orthanc}/dicom-web/studies/{info.study_uid}"
    code, out, err = run(["predict", "-m", model, "-i", source, "-o", tmp_path / "seg", *fast,
                          "--output-format", "dicom-seg"])
    assert code == 0, err
    assert f"retrieved 12 instance(s) of study {info.study_uid}" in out and "stored 1 dicom-seg object(s)" in out
    assert run(["predict", "-m", model, "-i", tmp_path / "local", "-o", tmp_path / "nifti", *fast])[0] == 0
    labels, geometry = read_image(tmp_path / "nifti" / "PACS1_20260101.nii.gz")
    assert geometry.allclose(info.geometry, atol=1e-4) and 0 < (labels > 0).sum() < labels.size

    found = client.search_for_series(info.study_uid, search_filters={"Modality": "SEG"})
    assert len(found) == 1
    seg_series = found[0]["0020000E"]["Value"][0]
    instances = client.retrieve_series(info.study_uid, seg_series)
    assert len(instances) == 1
    seg = hd.seg.Segmentation.from_dataset(instances[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.uid
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "tumor"]
    frames, _ = series_geometry(scan_dicom(tmp_path / "local").series[0])
    masks = seg.get_pixels_by_source_instance([f.sop_instance_uid for f in frames], segment_numbers=[1, 2],
                                              combine_segments=False, assert_missing_frames_are_empty=True)
    for number, value in enumerate((1, 2)):
        assert np.array_equal(masks[..., number].astype(bool), labels == value)


def test_an_unknown_study_or_server_is_a_clear_error(orthanc, tmp_path):
    model = make_workdir(tmp_path / "model", tiny_plan(CT_LABELS, channels=1))
    code, _, err = run(["predict", "-m", model, "-i", f"dicomweb://{orthanc}/dicom-web/studies/1.2.3.4",
                        "-o", tmp_path / "out", "--device", "cpu"])
    assert code == 2 and "study 1.2.3.4 on the DICOMweb service" in err and "Traceback" not in err
    code, _, err = run(["predict", "-m", model, "-i", "dicomweb://127.0.0.1:1/dicom-web/studies/1.2.3",
                        "-o", tmp_path / "out", "--device", "cpu"])
    assert code == 2 and "check that the server runs" in err and "Traceback" not in err
    code, _, err = run(["predict", "-m", model, "-i", "dicomweb://host/no-study", "-o", tmp_path / "out"])
    assert code == 2 and "give dicomweb://HOST:PORT/SERVICE_ROOT/studies/STUDY_UID" in err


def test_a_missing_orthanc_plugin_fails_rather_than_skips(monkeypatch):
    import debian

    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)  # not root: nothing is installed
    with pytest.raises(AssertionError, match="apt-get install -y orthanc-dicomweb"):
        ensure(lambda: None, ("orthanc-dicomweb",))
