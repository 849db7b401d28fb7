"""Memory-model calibration (`voxseg plan --calibrate`): the fit, the budget it hands the planner, the CPU note.

The CUDA measurement itself is exercised by the gpu-marked test; here a measurement is a known linear law of the
model's variable part, so every expected number follows from the law by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voxseg.bench.calibrate import (
    CalibrationError,
    MemoryCalibration,
    calibrate,
    calibrate_workdir,
    candidate_plans,
    fit_calibration,
)
from voxseg.data.dataset import RawDataset
from voxseg.data.fingerprint import save_fingerprint
from voxseg.data.memory import CONV_WORKSPACE_GB, CUDA_CONTEXT_GB, estimate_memory_breakdown
from voxseg.data.plan import make_plan, plan_dataset
from voxseg.data.synth import make_synthetic_dataset
from voxseg.errors import ConfigError
from voxseg.plans import Plan

MRI = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}
MODEL_FIXED = CUDA_CONTEXT_GB + CONV_WORKSPACE_GB


def brats_fingerprint(num_cases: int = 1250) -> dict:
    return {"spacings": [[1.0, 1.0, 1.0]] * num_cases, "shapes_after_crop": [[140, 170, 140]] * num_cases,
            "median_relative_size_after_cropping": 0.45, "foreground_intensity": {}}


def raw() -> RawDataset:
    return RawDataset(Path("/data/Test"), {"name": "Test", "channel_names": MRI, "labels": LABELS,
                                           "file_ending": ".nii.gz"})


def variable_gb(plan: Plan) -> float:
    terms = estimate_memory_breakdown(plan.network, plan.patch_size, plan.batch_size, plan.num_channels,
                                      plan.num_outputs)
    return terms["total"] - terms["fixed"]


def law(scale: float, fixed: float):
    return lambda plan: scale * variable_gb(plan) + fixed


def test_fit_recovers_a_linear_law():
    points = [{"variable_gb": v, "measured_gb": 0.8 * v + 0.7} for v in (2.0, 3.5, 6.0)]
    cal = fit_calibration(points, MODEL_FIXED, "test")
    assert cal.scale == pytest.approx(0.8, abs=1e-4) and cal.fixed_gb == pytest.approx(0.7, abs=1e-4)


def test_one_size_keeps_the_model_fixed_part():
    cal = fit_calibration([{"variable_gb": 4.0, "measured_gb": 6.0}], MODEL_FIXED, "test")
    assert cal.fixed_gb == MODEL_FIXED
    assert cal.scale == pytest.approx((6.0 - MODEL_FIXED) / 4.0, abs=1e-4)


def test_a_negative_fixed_part_falls_back_to_the_model_one():
    # slope 2, intercept -1: not a memory law (fixed memory cannot be negative)
    points = [{"variable_gb": v, "measured_gb": 2.0 * v - 1.0} for v in (2.0, 4.0)]
    cal = fit_calibration(points, MODEL_FIXED, "test")
    assert cal.fixed_gb == MODEL_FIXED
    assert cal.scale == pytest.approx((3.0 + 7.0 - 2 * MODEL_FIXED) / 6.0, abs=1e-4)


def test_nothing_measured_or_absurd_measurements_are_refused():
    with pytest.raises(CalibrationError, match="no candidate"):
        fit_calibration([{"variable_gb": 2.0, "measured_gb": None}], MODEL_FIXED, "test")
    with pytest.raises(CalibrationError, match="too far off"):
        fit_calibration([{"variable_gb": 2.0, "measured_gb": 60.0}], MODEL_FIXED, "test")


def test_candidates_never_exceed_the_plan_and_fit_the_network_stride():
    plan = make_plan(brats_fingerprint(), raw(), gpu_memory_gb=8.0)
    candidates = candidate_plans(plan)
    assert candidates[0] is plan and len(candidates) >= 2
    for c in candidates:
        assert c.batch_size <= plan.batch_size
        assert all(p <= q and p % t == 0 for p, q, t in zip(c.patch_size, plan.patch_size, plan.network.total_stride))
    assert len({variable_gb(c) for c in candidates}) == len(candidates)  # distinct sizes: the fit has a slope


def test_out_of_memory_candidates_are_recorded_and_left_out():
    plan = make_plan(brats_fingerprint(), raw(), gpu_memory_gb=8.0)
    true = law(0.9, 0.6)

    def measure(candidate):
        if candidate is plan:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return true(candidate)

    cal = calibrate(plan, measure, "fake GPU")
    assert cal.points[0]["measured_gb"] is None and cal.points[0]["note"] == "out of memory"
    assert all(p["measured_gb"] is not None for p in cal.points[1:])
    assert cal.estimate_gb(plan) == pytest.approx(true(plan), abs=1e-3)  # the law, extrapolated to the plan


def test_other_errors_are_not_swallowed():
    plan = make_plan(brats_fingerprint(), raw(), gpu_memory_gb=8.0)
    with pytest.raises(RuntimeError, match="cuDNN error"):
        calibrate(plan, lambda c: (_ for _ in ()).throw(RuntimeError("cuDNN error: bad param")), "fake GPU")


@pytest.mark.parametrize("scale, fixed", [(0.5, 0.6), (1.6, 1.2)])
def test_calibrated_plan_fits_the_budget_on_the_measured_device(scale, fixed):
    budget = 8.0
    plan = make_plan(brats_fingerprint(), raw(), gpu_memory_gb=budget)
    true = law(scale, fixed)
    cal = calibrate(plan, true, "fake GPU")
    calibrated = make_plan(brats_fingerprint(), raw(), gpu_memory_gb=cal.effective_budget(budget))
    assert true(calibrated) <= budget + 1e-6  # what the device really needs fits
    samples = lambda p: p.batch_size * float(torch.tensor(p.patch_size).prod())  # noqa: E731
    if scale < 1:  # the device needs less than the formula says: more voxels per step, still within budget
        assert true(plan) < budget and samples(calibrated) > samples(plan)
    else:  # it needs more: the uncalibrated plan would not fit, the calibrated one does with fewer voxels
        assert true(plan) > budget and samples(calibrated) < samples(plan)


def test_a_budget_below_the_measured_fixed_memory_is_refused():
    cal = MemoryCalibration(device="fake GPU", scale=1.0, fixed_gb=2.0, model_fixed_gb=MODEL_FIXED)
    with pytest.raises(ConfigError, match="fixed memory alone is 2.00 GiB"):
        cal.effective_budget(1.5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    data = make_synthetic_dataset(root / "Dataset001_Syn", num_cases=3, shape=(16, 16, 16), seed=1)
    work = root / "work"
    plan_dataset(data, work, num_folds=2)
    save_fingerprint(work / "fingerprint.json", brats_fingerprint())  # plan as if the cases were BraTS-sized
    plan = make_plan(brats_fingerprint(), raw(), gpu_memory_gb=8.0)
    plan.raw_dataset = str(data)
    plan.save(work / "plans.json")
    return work


def test_calibrate_workdir_records_the_fit_and_the_calibrated_estimate(workdir):
    true = law(0.7, 0.9)
    new, cal = calibrate_workdir(workdir, true, "fake GPU")
    stored = json.loads((workdir / "plans.json").read_text())
    assert stored["memory_calibration"]["device"] == "fake GPU"
    assert stored["memory_calibration"]["scale"] == pytest.approx(0.7, abs=1e-3)
    assert stored["gpu_memory_gb"] == 8.0  # the user's budget, not the one handed to the planner
    assert stored["estimated_memory_gb"] == pytest.approx(true(new), abs=2e-3) and true(new) <= 8.0
    assert Plan.load(workdir / "plans.json").memory_calibration == cal.to_dict()


def test_plan_calibrate_without_cuda_says_so_and_records_nothing(tmp_path):
    data = make_synthetic_dataset(tmp_path / "Dataset001_Syn", num_cases=3, shape=(16, 16, 16), seed=1)
    run = subprocess.run([sys.executable, "-m", "voxseg", "plan", str(data), "-o", str(tmp_path / "w"),
                          "--folds", "2", "--calibrate"], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # as on a machine without a GPU
    assert run.returncode == 0, run.stderr
    assert "needs a CUDA device" in run.stdout and "formula is used as it is" in run.stdout
    assert json.loads((tmp_path / "w" / "plans.json").read_text())["memory_calibration"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_on_a_real_gpu_fits_its_own_measurements(workdir):
    from voxseg.bench.calibrate import cuda_measure, device_name

    measure = cuda_measure()
    new, cal = calibrate_workdir(workdir, measure, device_name())
    assert abs(cal.estimate_gb(new) - measure(new)) <= 0.15 * measure(new)
