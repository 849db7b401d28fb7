"""`voxseg benchmark` and `voxseg estimate` on a tiny preprocessed work directory (CPU): every field present and
sane, the files written equal the results, and the estimate's arithmetic (iterations per epoch, epoch and total
time, speed-up) plus its handling of impossible and out-of-memory configurations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from voxseg.bench import timing as timing_module
from voxseg.bench.benchmark import format_benchmark, memory_row, run_benchmark
from voxseg.bench.timing import (
    StepTiming,
    between_steps_fraction,
    cuda_context_gb,
    gpu_peak_memory_gb,
    host_prepares_batches,
    interleaved,
    is_noise,
    is_out_of_memory,
    spread,
)
from voxseg.data.plan import plan_dataset
from voxseg.data.preprocess import preprocess_dataset
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
    assert result["plan"] == {"patch_size": PATCH, "batch_size": 2, "features": [4, 8, 8],
                              "estimated_memory_gb": result["plan"]["estimated_memory_gb"]}
    assert _positive(result["plan"]["estimated_memory_gb"])

    t = result["training"]
    assert _positive(t["device_step_s"]) and _positive(t["end_to_end_step_s"])
    # on a CPU the batch is made on the host: the host's wait is the data wait; there are no GPU figures
    assert 0.0 <= t["host_data_wait_fraction"] <= 1.0 and t["gpu_data_wait_fraction"] is None
    assert t["peak_allocated_gb"] is None
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
    for row in ("device", "patch x batch", "step, data on device", "step, end to end", "host waiting for a batch",
                "GPU time between steps (data)  n/a (no CUDA device)", "samples/s", "peak memory (process RSS)",
                "read one raw case", "preprocess one case",
                "predict, 1 fold, no TTA", "predict, 5 folds, mirroring"):
        assert row in table
    assert f"{t['samples_per_s']:.2f}" in table and f"{t['end_to_end_step_s'] * 1000:.1f} ms" in table
    assert f"{single:.2f} s/case" in table
    assert f"host waiting for a batch       {t['host_data_wait_fraction'] * 100:.1f} %" in table


def test_benchmark_without_inference_writes_to_output(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = run_benchmark(workdir, device="cpu", num_threads=1, iterations=1, warmup=0, inference=False, output=out)
    assert "inference" not in result and "predict" not in format_benchmark(result)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert torch.get_num_threads() == 1  # the thread limit is what the benchmark ran with


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


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


def test_noisy_benchmark_says_so() -> None:
    table = format_benchmark({"device": "CPU", "torch": "x", "cpu_threads": 1, "preprocessing": {
        "read_s": 1.0, "preprocess_s": 1.0}, "training": StepTiming(0.02, 0.01, 200.0, 1.5, 2, PATCH, 1, noisy=True,
                                                             memory_kind="rss").to_dict()})
    assert "NOISE" in table and "peak memory (process RSS)" in table


# ----- memory against the estimate, data waiting: the device's numbers in, figures out ------------------------------
def test_gpu_peak_memory_is_reserved_plus_context() -> None:
    gib = 2**30
    # 80 GiB device, 72.9 GiB free while the allocator holds 6.5 GiB: 0.6 GiB of context outside it
    assert cuda_context_gb(80 * gib, 72.9 * gib, 6.5 * gib) == pytest.approx(0.6)
    assert gpu_peak_memory_gb(6.0 * gib, 80 * gib, 72.9 * gib, 6.5 * gib) == pytest.approx(6.6)
    assert cuda_context_gb(8 * gib, 8 * gib, 0) == 0.0  # nothing in use: no negative context
    assert cuda_context_gb(8 * gib, 2 * gib, 7 * gib) == 0.0  # a racy read never goes below zero


def test_memory_row_compares_like_with_like() -> None:
    cuda = {"peak_memory_gb": 6.6, "memory_kind": "reserved+context"}
    assert memory_row(cuda, 7.3) == ("peak GPU memory (reserved + context) / plan estimate",
                                     "6.60 GB / 7.30 GB (0.90x)")
    assert memory_row(cuda, None)[1] == "6.60 GB / -"
    assert memory_row({"peak_memory_gb": 0.46, "memory_kind": "rss"}, 7.3) == ("peak memory (process RSS)",
                                                                                "0.46 GB")


def test_between_steps_fraction() -> None:
    assert between_steps_fraction(0.0, [2.0, 12.0], [10.0, 20.0]) == pytest.approx(0.2)  # (2 + 2) / 20
    assert between_steps_fraction(5.0, [5.0, 6.0], [6.0, 7.0]) == 0.0  # back to back: no waiting
    assert between_steps_fraction(0.0, [9.0], [10.0]) == pytest.approx(0.9)  # 9 ms of data before a 1 ms step
    with pytest.raises(ValueError):
        between_steps_fraction(0.0, [1.0], [])


def test_host_wait_means_data_wait_only_where_the_host_makes_batches() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert host_prepares_batches(cpu, "gpu") and host_prepares_batches(cpu, "mmap")
    assert host_prepares_batches(cuda, "pinned") and host_prepares_batches(cuda, "mmap")
    assert not host_prepares_batches(cuda, "gpu")  # the host only queues kernels: launch time, not waiting


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_data_wait_sees_a_slow_data_path_and_memory_is_after_warm_up(workdir: Path, monkeypatch) -> None:
    """On CUDA: a data path that keeps the GPU busy (a spin kernel per batch) shows up as time between steps;
    the host's wait is not reported for the GPU cache; peak reserved + context is at least the allocated peak."""
    from voxseg.bench.timing import config_for, time_training
    from voxseg.train.feed import TrainData

    config = config_for("cuda", 2, ["data.cache=gpu", "loop.compile=off"])
    quick = time_training(workdir, config, iterations=4, warmup=2, repeats=3)
    make = TrainData.next_batch

    def slow_batch(self):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the stream, before the batch's kernels
        return make(self)

    monkeypatch.setattr(TrainData, "next_batch", slow_batch)
    slow = time_training(workdir, config, iterations=4, warmup=2, repeats=3)
    assert quick.host_data_wait_fraction is None and slow.host_data_wait_fraction is None
    assert 0.0 <= quick.gpu_data_wait_fraction < slow.gpu_data_wait_fraction <= 1.0
    assert slow.gpu_data_wait_fraction > 0.5  # the spin dwarfs a tiny step
    assert slow.memory_kind == "reserved+context" and slow.peak_memory_gb >= slow.peak_allocated_gb > 0
