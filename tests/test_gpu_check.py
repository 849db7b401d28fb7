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
