"""`voxseg benchmark` and `voxseg estimate` on a tiny preprocessed work directory (CPU): every field present and
sane, the files written equal the results, and the estimate's arithmetic (iterations per epoch, epoch and total
time, speed-up) plus its handling of impossible and out-of-memory configurations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from voxseg.bench import estimate as estimate_module
from voxseg.bench.benchmark import format_benchmark, run_benchmark
from voxseg.bench.estimate import epoch_iterations, format_estimate, run_estimate
from voxseg.bench.timing import StepTiming, is_out_of_memory
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
    assert (t["batch_size"], t["patch_size"], t["num_samples"], t["peak_memory_gb"]) == (2, PATCH, 1, 0.0)
    assert _positive(result["preprocessing"]["read_s"]) and _positive(result["preprocessing"]["preprocess_s"])
    single, ensemble = result["inference"]["1_fold_no_tta_s"], result["inference"]["5_folds_mirror_s"]
    assert _positive(single) and _positive(ensemble)
    assert ensemble > single  # 5 folds x 8 mirrorings against one forward pass per tile

    # benchmark.json holds exactly what was returned
    assert json.loads((workdir / "benchmark.json").read_text()) == json.loads(json.dumps(result))

    table = format_benchmark(result)
    for row in ("device", "patch x batch", "step, data on device", "step, end to end", "waiting for data",
                "samples/s", "peak GPU memory", "read one raw case", "preprocess one case",
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
    reference = rows[0]["total_h"]
    for row in rows:
        if not row["fits"]:
            continue
        assert row["iterations_per_epoch"] == math.ceil(num_cases * row["num_samples"] / row["batch_size"])
        assert row["epoch_s"] == pytest.approx(row["step_s"] * row["iterations_per_epoch"])
        assert row["total_h"] == pytest.approx(row["epoch_s"] * epochs / 3600)
        assert row["speedup"] == pytest.approx(reference / row["total_h"])


def test_estimate_measures_every_combination(workdir: Path) -> None:
    result = run_estimate(workdir, batch_sizes=[2, 4], num_samples=[1, 2], epochs=10, iterations_per_epoch=0,
                          device="cpu", iterations=2)
    num_cases = len(get_fold(workdir, 0)[0])  # one pass over fold 0's training cases, as training counts it
    assert (result["epochs"], result["iterations_per_epoch"], result["num_cases"]) == (10, 0, num_cases) == (10, 0, 4)
    rows = result["rows"]
    # the plan's own setting first (batch 2, 1 patch per case), then each new combination once
    assert [(r["batch_size"], r["num_samples"], r["patch_size"]) for r in rows] == [
        (2, 1, PATCH), (2, 2, PATCH), (4, 1, PATCH), (4, 2, PATCH)]
    assert all(r["fits"] and _positive(r["step_s"]) and r["peak_memory_gb"] == 0.0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    assert [r["iterations_per_epoch"] for r in rows] == [2, 4, 1, 2]
    _check_arithmetic(result, 10, num_cases)
    assert json.loads((workdir / "estimate.json").read_text()) == json.loads(json.dumps(result))

    table = format_estimate(result)
    assert f"{num_cases} training cases, 10 epochs (one pass over the cases per epoch)" in table
    lines = [line.split() for line in table.splitlines() if "16x16x16" in line]
    # batch, patches per case, iterations per epoch
    assert [(int(c[0]), int(c[1]), int(c[4])) for c in lines] == [(2, 1, 2), (2, 2, 4), (4, 1, 1), (4, 2, 2)]
    assert "1.00x" in table


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
    assert rows[2, 2]["iterations_per_epoch"] == 4 and rows[2, 2]["speedup"] == pytest.approx(0.5)
    assert rows[3, 1]["iterations_per_epoch"] == 2 and rows[3, 1]["speedup"] == pytest.approx(0.025 / 0.035)
    assert rows[3, 1]["peak_memory_gb"] == pytest.approx(1.5)
    _check_arithmetic(result, 100, 4)
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(result))

    table = format_estimate(result)
    assert table.count("does not fit (out of memory)") == 2 and "batch 3 is not a multiple of 2" in table
    assert "0.50x" in table and "5.0 s" in table  # (2, 1): 100 epochs x 0.05 s


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
