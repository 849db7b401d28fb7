"""Acceptance: real sizes. Preprocessing and prediction of a BraTS-sized case (4 x 155 x 240 x 240) and a CT-sized
case (1 x 300 x 512 x 512, 41 classes) with the network `voxseg plan` plans for them, through the command line.

The network is trained for one iteration only (what is measured here is the data path, the sliding window and
the way back to the input's grid, not accuracy). Prediction runs with the defaults (every trained fold, tile
step 0.5, mirroring on every axis) on the BraTS case; on the CT case the CPU version runs `--no-mirror --step 1`,
since the defaults (343 tiles x 8 mirrors of the planned 6-stage network) take hours on 2 CPU cores. The
`gpu`-marked tests run both cases with every default on a CUDA device.

Each step's wall time and the peak memory of its process tree are recorded (tests/acceptance.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from acceptance import record, require_success, run, voxseg
from voxseg.data.io import read_image

pytestmark = pytest.mark.acceptance
TIMEOUT = 3600
ONE_ITERATION = ["--epochs", "1", "--iterations", "1", "--set", "loop.val_iterations=1", "--set", "loop.full_val=false"]


def _step(name: str, command: list[str], cwd: Path, timeout: float = TIMEOUT, **extra) -> str:
    measured = require_success(run(command, cwd, timeout), name)
    record(name, measured, command, **extra)
    return measured.stdout + measured.stderr


def _planned_model(root: Path, kind: str, synth: list[str], plan: list[str], device: str) -> Path:
    """Synthetic dataset -> plan -> preprocess -> one training iteration of the planned network; returns WORKDIR."""
    raw, work = root / "raw", root / "work"
    _step(f"{kind}: synth", voxseg("synth", raw, *synth), root)
    planned = _step(f"{kind}: plan", voxseg("plan", raw, "-o", work, *plan), root)
    assert "patch x batch" in planned
    plan_json = json.loads((work / "plans.json").read_text())
    network = {"patch": plan_json["patch_size"], "batch": plan_json["batch_size"],
               "features": plan_json["network"]["features"]}
    _step(f"{kind}: preprocess", voxseg("preprocess", work), root, **network)
    _step(f"{kind}: train 1 iteration ({device})",
          voxseg("train", work, "--fold", "0", "--device", device, *ONE_ITERATION), root, **network)
    return work


def _check_prediction(raw: Path, preds: Path, case: str, channel: str, num_classes: int) -> None:
    labels, geometry = read_image(preds / f"{case}.nii.gz")
    image, image_geometry = read_image(raw / "imagesTs" / f"{case}_{channel}.nii.gz")
    assert labels.shape == image.shape
    assert np.allclose(geometry.affine, image_geometry.affine)
    assert labels.max() < num_classes


def _brats(root: Path, device: str, predict: list[str]) -> None:
    work = _planned_model(root, "BraTS-sized", ["--cases", "5", "--test-cases", "1", "--shape", "155,240,240"], [],
                          device)
    output = _step(f"BraTS-sized: predict 1 case ({device}{', ' + ' '.join(predict) if predict else ''})",
                   voxseg("predict", "-m", work, "-i", root / "raw" / "imagesTs", "-o", root / "preds",
                          "--device", device, *predict), root)
    assert "using fold 0 (every trained fold" in output and "predicted 1 case(s) in" in output
    _check_prediction(root / "raw", root / "preds", "SYN_005", "0000", 4)


def _ct(root: Path, device: str, predict: list[str]) -> None:
    work = _planned_model(root, "CT-sized 41 classes",
                          ["--kind", "ct", "--classes", "41", "--cases", "4", "--test-cases", "1", "--shape",
                           "300,512,512"], ["--val-fraction", "0.25"], device)
    _step(f"CT-sized 41 classes: predict 1 case ({device}{', ' + ' '.join(predict) if predict else ''})",
          voxseg("predict", "-m", work, "-i", root / "raw" / "imagesTs", "-o", root / "preds", "--device", device,
                 *predict), root)
    _check_prediction(root / "raw", root / "preds", "CT_004", "0000", 41)


def test_brats_sized_case_on_the_cpu(tmp_path):
    _brats(tmp_path, "cpu", [])


def test_ct_sized_case_with_41_classes_on_the_cpu(tmp_path):
    _ct(tmp_path, "cpu", ["--no-mirror", "--step", "1"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_brats_sized_case_on_the_gpu(tmp_path):
    _brats(tmp_path, "cuda", [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ct_sized_case_with_41_classes_on_the_gpu(tmp_path):
    _ct(tmp_path, "cuda", [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_brats_sized_training_with_every_default_on_the_gpu(tmp_path):
    """Two epochs of the default 250 iterations, compiled, mixed precision, the bar on, 50 validation batches
    and the full validation: past the bar's refreshes, the first checkpoints and the compile warm-up."""
    raw, work = tmp_path / "raw", tmp_path / "work"
    _step("BraTS-sized: synth", voxseg("synth", raw, "--cases", "10", "--shape", "155,240,240"), tmp_path)
    _step("BraTS-sized: plan", voxseg("plan", raw, "-o", work), tmp_path)
    _step("BraTS-sized: preprocess", voxseg("preprocess", work), tmp_path)
    output = _step("BraTS-sized: train 2 epochs x 250 iterations (cuda, defaults)",
                   voxseg("train", work, "--fold", "0", "--epochs", "2"), tmp_path)
    assert "expected duration: 2 epochs x (250 iterations x" in output and "compile on" in output
    records = [json.loads(line) for line in (work / "training" / "fold_0" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(np.isfinite(r["loss"]["loss"]) for r in records)
    assert (work / "training" / "fold_0" / "validation" / "summary.json").is_file()
