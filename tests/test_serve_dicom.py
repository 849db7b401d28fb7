"""A zip of a DICOM study as a `voxseg serve` job: the label map is `voxseg predict`'s of the same series, on its
grid, returned as NIfTI."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from dicom_synth import hounsfield_volume, new_study, oblique_orientation, write_series
from serve_helpers import Server, one_thread
from test_predictor import make_workdir, tiny_plan
from voxseg.cli import main
from voxseg.client import ServerError, segment
from voxseg.data.io import read_image

pytest.importorskip("fastapi")
pytest.importorskip("pydicom")


def test_a_dicom_study_zip_is_segmented_as_predict_segments_its_folder(tmp_path):
    model = make_workdir(tmp_path / "model", tiny_plan({"background": 0, "liver": 1, "tumor": 2}, channels=1), seed=1)
    info = write_series(tmp_path / "study" / "ct", hounsfield_volume((12, 24, 20)) + 1024,
                        orientation=oblique_orientation(), intercept=-1024.0, order="shuffled",
                        study=new_study("CT7"), description="Abdomen")
    study_zip = tmp_path / "study.zip"
    with zipfile.ZipFile(study_zip, "w") as archive:
        for path in sorted((tmp_path / "study" / "ct").iterdir()):
            archive.write(path, f"../DICOM/{path.name}")  # a path-like member name: only read, never a path
    with one_thread():
        assert main(["predict", "-m", str(model), "-i", str(tmp_path / "study"), "-o", str(tmp_path / "predicted"),
                     "--folds", "0", "--device", "cpu"]) == 0
    expected = read_image(next((tmp_path / "predicted").glob("*.nii.gz")))
    server = Server(model, tmp_path / "jobs")
    try:
        labels, geometry = segment(server.url, [study_zip])
        not_dicom = tmp_path / "notes.zip"
        with zipfile.ZipFile(not_dicom, "w") as archive:
            archive.writestr("readme", b"not a DICOM file")
        with pytest.raises(ServerError) as failed:
            segment(server.url, [not_dicom])
    finally:
        server.stop()
    assert np.array_equal(labels, expected[0]) and labels.shape == (12, 24, 20)
    assert geometry.allclose(info.geometry, atol=1e-4)
    assert failed.value.status == 422
    assert "notes.zip: not a DICOM study this model can read" in failed.value.message
