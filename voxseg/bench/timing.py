"""Timing of one training configuration, shared by `voxseg benchmark` and `voxseg estimate`.

Two numbers tell where time goes:
- the *device step*: model + loss + backward + optimiser on batches that already sit on the device;
- the *end-to-end step*: sampling + augmentation + the step, as training runs it.
Their difference is the data path's cost; `data_wait_fraction` is the share of end-to-end time the step
waited for a batch. Every timed region ends with a device synchronisation, so the numbers are honest.

So that the device step cannot come out slower than the end-to-end one (it does less work), both are
measured the same way: the same warm-up, a pool of freshly sampled batches for the device step (stepping one
batch over and over drives the weights towards values CPU kernels handle slowly), and `repeats` interleaved
rounds (device, end to end, end to end, device, ...) so that load from other processes and clock drift hit
both alike. Each figure is the median of its rounds with the min..max spread; a spread above 20% of the
median, or an end-to-end median below the device one, marks the measurement as noise.
"""
from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from voxseg.config import TrainConfig
from voxseg.data.store import list_cases
from voxseg.errors import DatasetError
from voxseg.units import gib

NOISE_SPREAD = 0.2
"""A figure whose (max - min) / median over its rounds exceeds this is reported as noise, not compared."""


@dataclass
class StepTiming:
    """Measured training speed of one configuration (seconds, GiB); step times are medians over rounds."""

    device_step_s: float
    end_to_end_step_s: float
    data_wait_fraction: float
    samples_per_s: float
    peak_memory_gb: float
    batch_size: int
    patch_size: list[int]
    num_samples: int
    device_step_range_s: tuple[float, float] = (0.0, 0.0)
    end_to_end_range_s: tuple[float, float] = (0.0, 0.0)
    noisy: bool = False
    memory_kind: str = "gpu"  # "gpu": torch.cuda.max_memory_allocated; "rss": the process's peak resident set

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the rounds."""
    return float(np.median(values)), float(min(values)), float(max(values))


def is_noise(values: list[float]) -> bool:
    """Whether the rounds spread by more than NOISE_SPREAD of their median."""
    median, low, high = spread(values)
    return median <= 0 or (high - low) / median > NOISE_SPREAD


def interleaved(first: Callable[[], None], second: Callable[[], None], repeats: int,
                sync: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` rounds of each, in the order first, second, second, first, ... (ABBA)."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_index in range(repeats):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            sync()
            start = time.perf_counter()
            (first, second)[which]()
            sync()
            times[which].append(time.perf_counter() - start)
    return times


def peak_rss_gb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS), in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return gib(peak if sys.platform == "darwin" else peak * 1024)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory (a torch error) or the host allocator failing on CPU."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def training_cases(workdir: Path) -> list[str]:
    names = list_cases(workdir / "preprocessed")
    if not names:
        raise DatasetError(f"{workdir}/preprocessed has no cases: run 'voxseg preprocess {workdir}' first")
    return names


def time_training(workdir: str | Path, config: TrainConfig, iterations: int = 20, warmup: int = 5,
                  repeats: int = 3) -> StepTiming:
    """Build the training exactly as `voxseg train` does and time `iterations` steps both ways, `repeats` rounds.

    Raises whatever the device raises when the configuration does not fit (see `is_out_of_memory`).
    """
    from voxseg.train.loop import build_training, effective_plan, resolve, seed_everything

    workdir = Path(workdir)
    names = training_cases(workdir)
    plan = effective_plan(workdir, config)
    run = resolve(config, plan, len(names))
    seed_everything(config.loop.seed, False, config.data.num_threads)
    t = build_training(workdir, plan, config, run, names, [])
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pool = [t.data.next_batch() for _ in range(max(1, min(iterations, 4)))]  # fresh batches, data on the device
    waits: list[float] = []

    def device_steps(count: int = iterations) -> None:
        for index in range(count):
            t.step(*pool[index % len(pool)])

    def end_to_end_steps(count: int = iterations) -> None:
        stream = t.data.train_stream(count)
        for batch in stream:
            t.step(*batch)
        waits.append(stream.wait_seconds)

    if warmup:  # compilation, cudnn autotuning, allocator warm-up: the same for both paths
        device_steps(warmup)
        end_to_end_steps(warmup)
    sync(device)
    waits.clear()
    device_times, end_times = interleaved(device_steps, end_to_end_steps, max(1, repeats), lambda: sync(device))
    device_step, device_low, device_high = (v / iterations for v in spread(device_times))
    end_to_end, end_low, end_high = (v / iterations for v in spread(end_times))
    gpu = device.type == "cuda"
    peak = gib(torch.cuda.max_memory_allocated(device)) if gpu else peak_rss_gb()
    del t
    return StepTiming(
        device_step_s=device_step, end_to_end_step_s=end_to_end,
        data_wait_fraction=min(1.0, float(np.median(waits)) / max(end_to_end * iterations, 1e-9)),
        samples_per_s=plan.batch_size / end_to_end, peak_memory_gb=peak, batch_size=plan.batch_size,
        patch_size=list(plan.patch_size), num_samples=config.data.num_samples,
        device_step_range_s=(device_low, device_high), end_to_end_range_s=(end_low, end_high),
        noisy=is_noise(device_times) or is_noise(end_times) or end_to_end < device_step,
        memory_kind="gpu" if gpu else "rss",
    )


def config_for(device: str, num_threads: int, overrides: list[str] | None = None,
               base: TrainConfig | None = None) -> TrainConfig:
    """A training config for timing: the defaults (or `base`) on `device` with `num_threads` CPU threads."""
    from voxseg.config import apply_overrides

    config = copy.deepcopy(base) if base is not None else TrainConfig()
    items = [f"loop.device={device}", f"data.num_threads={num_threads}", "logging.tensorboard=false",
             "logging.progress_png=false"]
    return apply_overrides(config, items + list(overrides or []))
