"""`voxseg demo --quick` on the CPU: the whole pipeline runs and ends in an evaluation of the held-out cases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from voxseg.cli import main
from voxseg.data.io import read_image
from voxseg.demo import QUICK_DEMO, run_demo, shrink_plan_for_cpu
from voxseg.plans import Plan

CLASSES = ["edema", "necrosis", "enhancing"]


def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = run_demo(tmp_path, quick=True, device="cpu")
    printed = capsys.readouterr().out
    assert all(f"[{i}/6]" in printed for i in range(1, 7)) and "demo finished" in printed
    assert f"report: {tmp_path / 'report.html'}" in printed and (tmp_path / "report_files" / "cases").is_dir()

    assert list(summary["mean"]) == CLASSES and summary["foreground_mean"]["classes"] == CLASSES
    assert summary["counts"] == {"cases": QUICK_DEMO.test_cases, "references": QUICK_DEMO.test_cases,
                                 "missing_predictions": 0}
    for name in CLASSES:
        dice = summary["mean"][name]["dice"]
        assert dice is not None and math.isfinite(dice) and 0.0 <= dice <= 1.0
    assert math.isfinite(summary["foreground_mean"]["dice"])
    # the table printed at the end is this summary
    edema_line = next(line for line in printed.splitlines() if line.startswith("edema"))
    assert float(edema_line.split()[1]) == pytest.approx(summary["mean"]["edema"]["dice"], abs=6e-5)

    predictions = sorted((tmp_path / "predictions").glob("*.nii.gz"))
    assert len(predictions) == QUICK_DEMO.test_cases
    for path in predictions:
        labels, geometry = read_image(path)
        channel_0 = path.name.replace(".nii.gz", "_0000.nii.gz")
        image, image_geometry = read_image(tmp_path / "Dataset001_Synth" / "imagesTs" / channel_0)
        assert labels.shape == image.shape == QUICK_DEMO.shape
        np.testing.assert_allclose(geometry.affine, image_geometry.affine, atol=1e-5)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert json.loads((tmp_path / "predictions" / "summary.json").read_text())["counts"]["cases"] == 2

    # the CPU demo trained the shrunken plan for the quick length
    plan = Plan.load(tmp_path / "model" / "plans.json")
    assert max(plan.network.features) <= QUICK_DEMO.max_features and plan.batch_size == 2
    log = (tmp_path / "model" / "training" / "fold_0" / "log.jsonl").read_text().splitlines()
    assert len(log) == QUICK_DEMO.epochs
    assert all(json.loads(line)["iterations"] == QUICK_DEMO.iterations for line in log)


def test_shrink_plan_for_cpu_keeps_the_patch_divisible() -> None:
    from voxseg.plans import ChannelNormalization, NetworkPlan

    plan = Plan(
        dataset_name="T", raw_dataset="/nowhere", channel_names={"0": "A"}, labels={"background": 0, "a": 1},
        file_ending=".nii.gz", target_spacing=[1.0, 1.0, 1.0], patch_size=[40, 128, 112], batch_size=5,
        network=NetworkPlan(features=[32, 64, 128, 256], kernel_sizes=[[3, 3, 3]] * 4,
                            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
        normalization=[ChannelNormalization()],
    )
    small = shrink_plan_for_cpu(plan, max_features=64, patch=32)
    assert small.network.features == [16, 32, 64, 64]
    # capped at 32, then a multiple of the total stride (4 along axis 0, 8 along the others)
    assert small.patch_size == [32, 32, 32] and small.batch_size == 2
    plan.patch_size = [20, 128, 12]
    assert shrink_plan_for_cpu(plan, max_features=64, patch=32).patch_size == [20, 32, 8]


def test_demo_command_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["demo", str(tmp_path / "demo"), "--device", "cuda:7", "--quick"])
    captured = capsys.readouterr()
    assert code != 0 and "Traceback" not in captured.err and "cuda:7" in captured.err
    assert not (tmp_path / "demo").exists()  # refused before writing anything
