"""benchmarks/gpu_check.py end to end on a CPU at the smallest sizes: every headline key is a number."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_gpu_check_cpu_quick_writes_numbers(tmp_path: Path) -> None:
    gpu_check = _gpu_check()
    out = tmp_path / "results"
    report = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--skip", "pytest",
                             "--cases", "5", "--shape", "32", "32", "32", "--iterations", "2"])
    written = json.loads((out / "gpu_check.json").read_text())
    assert written["errors"] == {} and report["errors"] == {}
    for key in gpu_check.KEYS:
        assert isinstance(written[key], (int, float)) and math.isfinite(written[key]) and written[key] >= 0, key
    assert written["step_ms_device"] > 0 and written["infer_s_1fold"] > 0
    assert written["step_ms_device"] <= written["step_ms_end_to_end"] * 1.5  # it does less work; allow noise
    assert written["infer_s_5fold_tta"] > written["infer_s_1fold"]  # 40 forward passes per tile against 1
    assert written["device"].startswith("CPU") and written["pytest"] == {"skipped": True}
    assert (out / "gpu_check.md").read_text().startswith("| measure | result |")
    assert not list(out.glob("gpu_check_*.json"))  # the per-device copy is for CUDA runs only


def _gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    return gpu_check


def test_a_stage_past_its_budget_or_failing_is_recorded_and_the_run_goes_on() -> None:
    import time

    gpu_check = _gpu_check()
    report: dict = {"errors": {}, "stage_seconds": {}}
    assert gpu_check.run_stage("slow", 0.2, lambda: time.sleep(5), report) is None
    assert gpu_check.run_stage("broken", 5, lambda: 1 / 0, report) is None
    assert gpu_check.run_stage("fine", 5, lambda: {"value": 1}, report) == {"value": 1}
    assert "budget of 0.2 s" in report["errors"]["slow"] and report["stage_seconds"]["slow"] < 2
    assert report["errors"]["broken"].startswith("ZeroDivisionError") and "fine" not in report["errors"]
    assert gpu_check.slug("NVIDIA H200 NVL") == "nvidia-h200-nvl"


def _stages():
    import importlib

    _gpu_check()  # importing gpu_check puts benchmarks/ on sys.path, where measure() imports its stages from
    return importlib.import_module("gpu_check_stages")


def test_stage_budgets_are_cut_to_what_is_left_of_the_total() -> None:
    stages = _stages()
    assert stages.stage_budget(90, 0, 510) == 90 and stages.stage_budget(90, 480, 510) == 30
    assert stages.stage_budget(90, 506, 510) is None  # less than MIN_STAGE_S left: not started
    # a cold compile has a stage of its own, and the whole CUDA check ends well within 10 minutes
    assert stages.CUDA_BUDGETS["warmup"] >= 150 and stages.CUDA_TOTAL_S <= 540
    assert set(stages.CUDA_BUDGETS) == set(stages.CPU_BUDGETS) == set(_gpu_check().STAGES)


def test_a_failed_or_skipped_warmup_times_the_training_without_compile() -> None:
    overrides = _stages().training_overrides
    assert overrides({"compile": True, "warmup_s": 95.0}, None) == ([], None)
    assert overrides({"compile": False, "skipped": "torch.compile is off on cpu"}, None) == ([], None)
    items, note = overrides(None, "StageTimeout: ran past its budget of 180 s\nTraceback ...")
    assert items == ["loop.compile=off"] and note.endswith("failed (StageTimeout: ran past its budget of 180 s)")
    items, note = overrides({"skipped": True}, None)
    assert items == ["loop.compile=off"] and "--skip warmup" in note


def test_a_cold_compile_past_its_budget_neither_fails_the_training_stage_nor_the_total(monkeypatch, tmp_path) -> None:
    import time

    import torch

    gpu_check, stages = _gpu_check(), _stages()
    received = {}

    def training(workdir, device, sizes, threads, overrides):
        received["overrides"] = overrides
        return {"device_step_s": 0.01}

    fakes = {"environment": lambda device: {}, "gpu_tests": lambda timeout: {}, "calibration": lambda *a: {},
             "dataset": lambda *a: {"workdir": "w"}, "compile_warmup": lambda *a: time.sleep(30),  # a cold compile
             "training": training, "inference": lambda *a: time.sleep(60), "augmentation": lambda *a: {}}
    for name, fake in fakes.items():
        monkeypatch.setattr(stages, name, fake)
    # budgets of seconds, not fractions of one: a loaded machine may take a few hundred ms to start a stage
    budgets = {name: 20.0 for name in gpu_check.STAGES} | {"warmup": 1.0}
    sizes = stages.Sizes(1, (8, 8, 8), 1, 1, 1, 8, 1, 1, budgets=budgets, total_budget_s=6.0)
    monkeypatch.setattr(stages, "sizes_for", lambda device, args: sizes)
    monkeypatch.setattr(stages, "MIN_STAGE_S", 0.2)
    report = {"errors": {}, "stage_seconds": {}}
    start = time.perf_counter()
    gpu_check.measure(gpu_check.parse_args([]), torch.device("cpu"), tmp_path, report)
    # the total budget (6 s) held: the 30 s warm-up and the 60 s inference were cut short (the margin is for
    # a loaded machine; without the budgets this takes 90 s)
    assert time.perf_counter() - start < 25
    assert "budget of 1 s" in report["errors"]["warmup"]
    assert received["overrides"][0] == ["loop.compile=off"] and report["training"] == {"device_step_s": 0.01}
    assert "ran past its budget" in report["errors"]["inference"]
    assert report["errors"]["augment"] == "not run: the check's total budget of 6 s was spent"
