"""Commands sweep the temporary files a killed run left in the folders they write: predict, preprocess."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.test_predictor import make_workdir, tiny_plan, write_case
from voxseg.data.io import Geometry
from voxseg.data.plan import plan_dataset
from voxseg.data.preprocess import preprocess_dataset
from voxseg.data.synth import make_synthetic_dataset
from voxseg.infer.predictor import Predictor, find_input_cases


def _stale(folder, name):
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.tmp{pid}-abcdef.nii.gz"
    path.write_bytes(b"half a file")
    return path


def test_predict_and_preprocess_sweep_their_folders(tmp_path):
    workdir = make_workdir(tmp_path / "model", tiny_plan(), folds=(0,))
    write_case(tmp_path / "in", "a", np.zeros((2, 16, 16, 16), np.float32), Geometry.from_spacing((1, 1, 1)))
    stale = _stale(tmp_path / "out", "a")
    predictor = Predictor.from_workdir(workdir, folds=0, device="cpu", mirror_axes=None)
    predictor.predict_files(find_input_cases(tmp_path / "in", 2, ".nii.gz"), tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "a.nii.gz").is_file()

    root = make_synthetic_dataset(tmp_path / "Dataset001_Syn", num_cases=2, shape=(16, 16, 16), seed=0)
    plan_dataset(root, tmp_path / "work", num_folds=2)
    stale = _stale(tmp_path / "work" / "preprocessed", "SYN_000")
    preprocess_dataset(tmp_path / "work", progress=False)
    assert not stale.exists()
