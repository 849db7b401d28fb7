"""`voxseg benchmark` and `voxseg estimate` on a tiny preprocessed work directory (CPU): every field present and
sane, the files written equal the results, and the estimate's arithmetic (iterations per epoch, epoch and total
time, speed-up) plus its handling of impossible and out-of-memory configurations."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from voxseg.bench import estimate as estimate_module
from voxseg.bench.benchmark import format_benchmark, run_benchmark
from voxseg.bench.estimate import epoch_iterations, format_estimate, run_estimate
from voxseg.bench import timing as timing_module
from voxseg.bench.timing import StepTiming, interleaved, is_noise, is_out_of_memory, spread
from voxseg.data.plan import plan_dataset
from voxseg.data.preprocess import preprocess_dataset
from voxseg.data.splits import get_fold
from voxseg.data.synth import make_synthetic_dataset

PATCH = [16, 16, 16]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    dataset = make_synthetic_dataset(root / "Dataset001_Tiny", num_cases=6, shape=(24, 24, 28), seed=1)
    overrides = {"patch_size": PATCH, "batch_size": 2, "network.features": [4, 8, 8]}
    plan_dataset(dataset, root / "work", overrides=overrides, num_folds=3)
    preprocess_dataset(root / "work", progress=False)
    return root / "work"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """run_benchmark sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


# ----- benchmark ---------------------------------------------------------------------------------------------
def test_benchmark_fields_file_and_table(workdir: Path) -> None:
    result = run_benchmark(workdir, device="cpu", num_threads=1, iterations=2, warmup=1, inference=True)
    assert set(result) == {"device", "torch", "cpu_threads", "plan", "training", "preprocessing", "inference"}
    assert result["device"].startswith("CPU") and result["torch"] == torch.__version__ and result["cpu_threads"] == 1
    assert result["plan"] == {"patch_size": PATCH, "batch_size": 2, "features": [4, 8, 8]}

    t = result["training"]
    assert _positive(t["device_step_s"]) and _positive(t["end_to_end_step_s"])
    assert 0.0 <= t["data_wait_fraction"] <= 1.0
    assert t["samples_per_s"] == pytest.approx(2 / t["end_to_end_step_s"])
    assert (t["batch_size"], t["patch_size"], t["num_samples"], t["memory_kind"]) == (2, PATCH, 1, "rss")
    assert 0.01 < t["peak_memory_gb"] < 64  # the process's peak resident set on a CPU
    assert t["device_step_range_s"][0] <= t["device_step_s"] <= t["device_step_range_s"][1]
    assert t["end_to_end_range_s"][0] <= t["end_to_end_step_s"] <= t["end_to_end_range_s"][1]
    assert _positive(result["preprocessing"]["read_s"]) and _positive(result["preprocessing"]["preprocess_s"])
    single, ensemble = result["inference"]["1_fold_no_tta_s"], result["inference"]["5_folds_mirror_s"]
    assert _positive(single) and _positive(ensemble)
    assert ensemble > single  # 5 folds x 8 mirrorings against one forward pass per tile

    # benchmark.json holds exactly what was returned
    assert json.loads((workdir / "benchmark.json").read_text()) == json.loads(json.dumps(result))

    table = format_benchmark(result)
    for row in ("device", "patch x batch", "step, data on device", "step, end to end", "waiting for data",
                "samples/s", "peak memory (process RSS)", "read one raw case", "preprocess one case",
                "predict, 1 fold, no TTA", "predict, 5 folds, mirroring"):
        assert row in table
    assert f"{t['samples_per_s']:.2f}" in table and f"{t['end_to_end_step_s'] * 1000:.1f} ms" in table
    assert f"{single:.2f} s/case" in table


def test_benchmark_without_inference_writes_to_output(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = run_benchmark(workdir, device="cpu", num_threads=1, iterations=1, warmup=0, inference=False, output=out)
    assert "inference" not in result and "predict" not in format_benchmark(result)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert torch.get_num_threads() == 1  # the thread limit is what the benchmark ran with


# ----- estimate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixed", "cases", "samples", "batch", "expected"),
    [(250, 100, 1, 2, 250), (0, 6, 1, 2, 3), (0, 7, 1, 2, 4), (0, 6, 2, 4, 3), (0, 5, 2, 4, 3), (0, 1, 1, 8, 1),
     (0, 0, 1, 2, 1), (1, 1000, 4, 2, 1)],
)
def test_epoch_iterations(fixed: int, cases: int, samples: int, batch: int, expected: int) -> None:
    assert epoch_iterations(fixed, cases, samples, batch) == expected


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def _check_arithmetic(result: dict, epochs: int, num_cases: int) -> None:
    rows = result["rows"]
    reference_rate = rows[0]["batch_size"] / rows[0]["step_s"]
    for row in rows:
        if not row["fits"]:
            continue
        assert row["iterations_per_epoch"] == math.ceil(num_cases * row["num_samples"] / row["batch_size"])
        assert row["epoch_s"] == pytest.approx(row["step_s"] * row["iterations_per_epoch"])
        assert row["total_h"] == pytest.approx(row["epoch_s"] * epochs / 3600)
        if not (row["noisy"] or rows[0]["noisy"]):  # equal samples seen: the ratio of samples/s
            assert row["speedup"] == pytest.approx(row["batch_size"] / row["step_s"] / reference_rate)


def test_estimate_measures_every_combination(workdir: Path) -> None:
    result = run_estimate(workdir, batch_sizes=[2, 4], num_samples=[1, 2], epochs=10, iterations_per_epoch=0,
                          device="cpu", iterations=2)
    num_cases = len(get_fold(workdir, 0)[0])  # one pass over fold 0's training cases, as training counts it
    assert (result["epochs"], result["iterations_per_epoch"], result["num_cases"]) == (10, 0, num_cases) == (10, 0, 4)
    rows = result["rows"]
    # the plan's own setting first (batch 2, 1 patch per case), then each new combination once
    assert [(r["batch_size"], r["num_samples"], r["patch_size"]) for r in rows] == [
        (2, 1, PATCH), (2, 2, PATCH), (4, 1, PATCH), (4, 2, PATCH)]
    assert all(r["fits"] and _positive(r["step_s"]) and r["peak_memory_gb"] > 0 for r in rows)
    assert rows[0]["speedup"] in (1.0, None)  # None: the timing was noise
    assert [r["iterations_per_epoch"] for r in rows] == [2, 4, 1, 2]
    _check_arithmetic(result, 10, num_cases)
    assert json.loads((workdir / "estimate.json").read_text()) == json.loads(json.dumps(result))

    table = format_estimate(result)
    assert f"{num_cases} training cases, 10 epochs (one pass over the cases per epoch)" in table
    lines = [line.split() for line in table.splitlines() if "16x16x16" in line]
    # batch, patches per case, iterations per epoch
    assert [(int(c[0]), int(c[1]), int(c[4])) for c in lines] == [(2, 1, 2), (2, 2, 4), (4, 1, 1), (4, 2, 2)]
    assert "1.00x" in table or "noise" in table


def _fake_timing(step_per_batch: float, oom_batches: set[int]):
    """A stand-in for time_training: step time 5 ms + step_per_batch x batch; OOM for some batch sizes."""
    calls = []

    def fake(workdir, config, iterations=20, warmup=5):
        batch, samples = config.plan["batch_size"], config.data.num_samples
        calls.append((batch, samples))
        if batch in oom_batches:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")
        step = 0.005 + step_per_batch * batch
        return StepTiming(device_step_s=step / 2, end_to_end_step_s=step, data_wait_fraction=0.1,
                          samples_per_s=batch / step, peak_memory_gb=0.5 * batch, batch_size=batch,
                          patch_size=list(config.plan["patch_size"]), num_samples=samples)

    return fake, calls


def test_estimate_reports_impossible_and_out_of_memory_rows(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    fake, calls = _fake_timing(0.01, oom_batches={4})
    monkeypatch.setattr(estimate_module, "time_training", fake)
    result = run_estimate(workdir, batch_sizes=[2, 3, 4], num_samples=[1, 2], epochs=100, iterations_per_epoch=0,
                          device="cpu", output=tmp_path / "e.json")
    rows = {(r["batch_size"], r["num_samples"]): r for r in result["rows"]}
    assert list(rows) == [(2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2)]
    # batch 3 cannot hold whole groups of 2 patches: reported, never timed
    assert not rows[3, 2]["fits"] and "not a multiple" in rows[3, 2]["note"] and (3, 2) not in calls
    # out of memory is an answer, and the rows after it were still measured
    for key in ((4, 1), (4, 2)):
        assert not rows[key]["fits"] and rows[key]["note"] == "does not fit (out of memory)"
        assert rows[key]["step_s"] is None and rows[key]["total_h"] is None and rows[key]["speedup"] is None
    assert calls == [(2, 1), (2, 2), (3, 1), (4, 1), (4, 2)]

    # exact arithmetic with the known step times: 4 training cases in fold 0, 100 epochs
    assert rows[2, 1]["step_s"] == pytest.approx(0.025) and rows[2, 1]["iterations_per_epoch"] == 2
    assert rows[2, 1]["epoch_s"] == pytest.approx(0.05) and rows[2, 1]["total_h"] == pytest.approx(5 / 3600)
    # equal samples seen: (2, 2) steps as fast as (2, 1) with the same batch; batch 3 gives 3/0.035 vs 2/0.025
    assert rows[2, 2]["iterations_per_epoch"] == 4 and rows[2, 2]["speedup"] == pytest.approx(1.0)
    assert rows[3, 1]["iterations_per_epoch"] == 2 and rows[3, 1]["speedup"] == pytest.approx(3 / 0.035 / 80)
    assert rows[3, 1]["peak_memory_gb"] == pytest.approx(1.5)
    _check_arithmetic(result, 100, 4)
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(result))

    table = format_estimate(result)
    assert table.count("does not fit (out of memory)") == 2 and "batch 3 is not a multiple of 2" in table
    assert "1.07x" in table and "5.0 s" in table  # (2, 1): 100 epochs x 0.05 s


def test_estimate_with_fixed_iterations_and_oom_reference(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    fake, _ = _fake_timing(0.01, oom_batches={2})  # the plan's own batch does not fit
    monkeypatch.setattr(estimate_module, "time_training", fake)
    result = run_estimate(workdir, batch_sizes=[1], epochs=1000, iterations_per_epoch=250, device="cpu",
                          output=tmp_path / "e.json")
    reference, smaller = result["rows"]
    assert not reference["fits"] and smaller["fits"] and smaller["speedup"] is None  # nothing to compare with
    assert smaller["iterations_per_epoch"] == 250
    assert smaller["total_h"] == pytest.approx(0.015 * 250 * 1000 / 3600)
    table = format_estimate(result)
    assert "250 iterations per epoch" in table and "does not fit" in table and "62.5 min" in table


def test_estimate_reraises_other_errors(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("a real bug, not a memory limit")

    monkeypatch.setattr(estimate_module, "time_training", broken)
    with pytest.raises(RuntimeError, match="a real bug"):
        run_estimate(workdir, device="cpu", output=tmp_path / "e.json")


# ----- timing logic with a fake clock ------------------------------------------------------------------------
class FakeClock:
    """time.perf_counter that only advances when fake work runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaved_rounds_alternate_and_time_each_call(monkeypatch) -> None:
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing_module.time, "perf_counter", clock)
    costs = {"device": iter([5.0, 1.0, 1.0, 1.0]), "end": iter([2.0, 2.0, 2.0, 2.0])}  # first call pays set-up

    def work(name: str):
        def run() -> None:
            calls.append(name)
            clock.now += next(costs[name])
        return run

    device, end = interleaved(work("device"), work("end"), 4)
    assert calls == ["device", "end", "end", "device", "device", "end", "end", "device"]  # ABBA
    assert device == [5.0, 1.0, 1.0, 1.0] and end == [2.0] * 4
    # the median ignores the slow first round: the device step stays below the end-to-end step
    assert spread(device) == (1.0, 1.0, 5.0) and spread(end)[0] == 2.0
    assert is_noise(device) and not is_noise(end)


def test_noise_threshold_is_twenty_percent() -> None:
    assert not is_noise([1.0, 1.1, 1.2]) and is_noise([1.0, 1.1, 1.25])


def test_noisy_timings_are_flagged_not_compared(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    fake, _ = _fake_timing(0.01, oom_batches=set())

    def noisy_for_batch_4(workdir, config, iterations=20, warmup=5):
        timing = fake(workdir, config, iterations, warmup)
        timing.noisy = timing.batch_size == 4
        return timing

    monkeypatch.setattr(estimate_module, "time_training", noisy_for_batch_4)
    result = run_estimate(workdir, batch_sizes=[2, 4], epochs=10, device="cpu", output=tmp_path / "e.json")
    rows = {r["batch_size"]: r for r in result["rows"]}
    assert rows[2]["speedup"] == pytest.approx(1.0) and rows[4]["speedup"] is None and rows[4]["noisy"]
    line = next(line for line in format_estimate(result).splitlines() if line.split()[:2] == ["4", "1"])
    assert line.rstrip().split()[-3] == "noise"  # the speed-up column, before memory and model
    table = format_benchmark({"device": "CPU", "torch": "x", "cpu_threads": 1, "preprocessing": {
        "read_s": 1.0, "preprocess_s": 1.0}, "training": StepTiming(0.02, 0.01, 0.1, 200.0, 1.5, 2, PATCH, 1, noisy=True,
                                                             memory_kind="rss").to_dict()})
    assert "NOISE" in table and "peak memory (process RSS)" in table


def test_estimate_rows_carry_the_memory_model_formula_or_its_calibration(workdir: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    from voxseg.bench.calibrate import MemoryCalibration
    from voxseg.data.memory import estimate_memory_breakdown
    from voxseg.plans import Plan

    fake, _ = _fake_timing(0.01, oom_batches=set())
    monkeypatch.setattr(estimate_module, "time_training", fake)
    plan = Plan.load(workdir / "plans.json")

    def terms(batch: int) -> dict:
        return estimate_memory_breakdown(plan.network, plan.patch_size, batch, plan.num_channels, plan.num_outputs)

    result = run_estimate(workdir, batch_sizes=[1, 4], device="cpu", output=tmp_path / "e.json")
    rows = {r["batch_size"]: r for r in result["rows"]}
    for batch in (1, 4):
        assert rows[batch]["model_memory_gb"] == pytest.approx(terms(batch)["total"], abs=1e-4)
    assert not result["calibrated"]

    calibrated = tmp_path / "calibrated"
    shutil.copytree(workdir, calibrated)
    fit = MemoryCalibration(device="fake GPU", scale=0.5, fixed_gb=0.25, model_fixed_gb=terms(1)["fixed"])
    plan.memory_calibration = fit.to_dict()
    plan.save(calibrated / "plans.json")
    result = run_estimate(calibrated, batch_sizes=[4], device="cpu", output=tmp_path / "c.json")
    row = {r["batch_size"]: r for r in result["rows"]}[4]
    assert row["model_memory_gb"] == pytest.approx(0.5 * (terms(4)["total"] - terms(4)["fixed"]) + 0.25, abs=1e-4)
    assert result["calibrated"] and "(calibrated)" in format_estimate(result)
