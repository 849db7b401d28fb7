"""Timing of one training configuration, shared by `voxseg benchmark` and `voxseg estimate`.

Two numbers tell where time goes:
- the *device step*: model + loss + backward + optimiser on batches that already sit on the device;
- the *end-to-end step*: sampling + augmentation + the step, as training runs it.
Their difference is the data path's cost. Waiting for data is measured where it happens (see `StepTiming`):
on CUDA as the device time between steps (CUDA events around every step), and where batches are prepared on
the host as the time the training thread waited for one. Every timed region ends with a device
synchronisation, so the numbers are honest. Peak memory is measured after the warm-up; on CUDA it is the
allocator's peak reserved memory plus the CUDA context, the quantity the planner's estimate models
(`gpu_peak_memory_gb`).

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
from voxseg.workdir import WorkDir

NOISE_SPREAD = 0.2
"""A figure whose (max - min) / median over its rounds exceeds this is reported as noise, not compared."""


@dataclass
class StepTiming:
    """Measured training speed of one configuration (seconds, GiB); step times are medians over rounds.

    Data waiting is named for where it is measured:
    - `gpu_data_wait_fraction` (CUDA): the share of the device's time in the end-to-end rounds that falls
      between steps (CUDA events before and after every step): data kernels, waiting for a prefetched batch,
      or a host too slow to queue the next step. None on a CPU.
    - `host_data_wait_fraction`: the share of end-to-end time the training thread waited for a batch, where
      batches are prepared on the host (a CPU device, or pinned / memory-mapped caches). None where making a
      batch only queues device work (the GPU cache): the host then measures kernel launches, not waiting.
    """

    device_step_s: float
    end_to_end_step_s: float
    samples_per_s: float
    peak_memory_gb: float
    batch_size: int
    patch_size: list[int]
    num_samples: int
    gpu_data_wait_fraction: float | None = None
    host_data_wait_fraction: float | None = None
    device_step_range_s: tuple[float, float] = (0.0, 0.0)
    end_to_end_range_s: tuple[float, float] = (0.0, 0.0)
    noisy: bool = False
    memory_kind: str = "reserved+context"
    """"reserved+context": the caching allocator's peak reserved memory after warm-up plus the CUDA context,
    what the planner's estimate models; "rss": the process's peak resident set on a CPU."""
    peak_allocated_gb: float | None = None
    """CUDA: torch.cuda.max_memory_allocated after warm-up (tensors only, no allocator slack, no context)."""

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


def cuda_context_gb(total_bytes: float, free_bytes: float, reserved_bytes: float) -> float:
    """GiB in use on the device outside torch's caching allocator: (total - free) - reserved.

    That is the CUDA context and the cuDNN / cuBLAS handles of this process (and whatever other processes hold
    on the same device): memory the planner's estimate counts (`CUDA_CONTEXT_GB`) but torch's counters do not.
    The three numbers are `torch.cuda.mem_get_info()` (free, total) and `torch.cuda.memory_reserved()`, read
    together.
    """
    return max(0.0, gib(total_bytes - free_bytes - reserved_bytes))


def gpu_peak_memory_gb(peak_reserved_bytes: float, total_bytes: float, free_bytes: float,
                       reserved_bytes: float) -> float:
    """Peak device memory comparable with the planner's estimate: the allocator's peak *reserved* memory (what
    decides an out-of-memory error: tensors, rounding, cached blocks, workspaces) plus the context outside it.

    Example: peak reserved 6.0 GiB; 80 GiB total, 72.9 GiB free, 6.5 GiB reserved now -> context 0.6 GiB,
    6.6 GiB against an estimate of e.g. 7.3 GiB. Comparing max_memory_allocated (5.2 GiB, say) with the
    estimate would leave out both the allocator's slack and the context.
    """
    return gib(peak_reserved_bytes) + cuda_context_gb(total_bytes, free_bytes, reserved_bytes)


def cuda_peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(peak reserved + context, peak allocated) in GiB since the last reset of the peak statistics."""
    free, total = torch.cuda.mem_get_info(device)
    peak = gpu_peak_memory_gb(torch.cuda.max_memory_reserved(device), total, free,
                              torch.cuda.memory_reserved(device))
    return peak, gib(torch.cuda.max_memory_allocated(device))


def between_steps_fraction(round_start_ms: float, starts_ms: list[float], ends_ms: list[float]) -> float:
    """Share of a round's device time that falls outside the steps (0..1).

    Times are on the device's clock (CUDA events, milliseconds from any common origin): the round starts at
    `round_start_ms`, step i runs from starts_ms[i] to ends_ms[i]. Whatever lies between the round's start and
    the first step, and between one step's end and the next one's start, is time the device spent on the data
    (crops, augmentation) or idle waiting for it.

    Example: a round starting at 0 with steps 2..10 and 12..20 -> (2 + 2) / 20 = 0.2.
    """
    if not starts_ms or len(starts_ms) != len(ends_ms):
        raise ValueError("between_steps_fraction: one start and one end per step are needed")
    span = ends_ms[-1] - round_start_ms
    inside = sum(end - start for start, end in zip(starts_ms, ends_ms))
    return 0.0 if span <= 0 else min(1.0, max(0.0, (span - inside) / span))


class StepMarks:
    """CUDA events at the start of a round and around every step; nothing on other devices.

    Recording an event only queues it on the stream (no sync): the marks are read after the round's final sync.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.round_start: Any = None
        self.starts: list[Any] = []
        self.ends: list[Any] = []

    def _event(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin_round(self) -> None:
        if self.cuda:
            self.round_start, self.starts, self.ends = self._event(), [], []

    def before_step(self) -> None:
        if self.cuda:
            self.starts.append(self._event())

    def after_step(self) -> None:
        if self.cuda:
            self.ends.append(self._event())

    def fraction(self) -> float | None:
        """The round's between-steps fraction (call after a device sync); None off CUDA."""
        if not self.cuda or not self.starts:
            return None
        origin = self.round_start
        return between_steps_fraction(0.0, [origin.elapsed_time(e) for e in self.starts],
                                      [origin.elapsed_time(e) for e in self.ends])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory (a torch error) or the host allocator failing on CPU."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def training_cases(workdir: Path) -> list[str]:
    names = list_cases(WorkDir(workdir).preprocessed)
    if not names:
        raise DatasetError(f"{WorkDir(workdir).preprocessed} has no cases: run 'voxseg preprocess {workdir}' first")
    return names


def host_prepares_batches(device: torch.device, cache_mode: str) -> bool:
    """Whether making a batch is host work (a CPU device; pinned or memory-mapped caches) rather than device
    work queued from the host (the GPU cache), i.e. whether the host's wait for a batch means waiting for data."""
    return device.type != "cuda" or cache_mode != "gpu"


def time_training(workdir: str | Path, config: TrainConfig, iterations: int = 20, warmup: int = 5,
                  repeats: int = 3) -> StepTiming:
    """Build the training exactly as `voxseg train` does and time `iterations` steps both ways, `repeats` rounds.

    Peak memory is measured after the warm-up (compilation, cuDNN autotuning and the allocator's first
    growth are one-off costs of a run's first steps, not its steady state).
    Raises whatever the device raises when the configuration does not fit (see `is_out_of_memory`).
    """
    from voxseg.train.loop import build_training, effective_plan, resolve, seed_everything

    workdir = Path(workdir)
    names = training_cases(workdir)
    plan = effective_plan(workdir, config)
    setup = resolve(config, plan, len(names))
    seed_everything(config.loop.seed, False, config.data.num_threads)
    training = build_training(workdir, plan, config, setup, names, [])
    device = setup.device
    pool = [training.data.next_batch() for _ in range(max(1, min(iterations, 4)))]  # fresh batches, data on the device
    host_waits: list[float] = []
    marks = StepMarks(device)
    between: list[float] = []

    def device_steps(count: int = iterations) -> None:
        for index in range(count):
            training.step(*pool[index % len(pool)])

    def end_to_end_steps(count: int = iterations) -> None:
        marks.begin_round()
        stream = training.data.train_stream(count)
        for batch in stream:
            marks.before_step()
            training.step(*batch)
            marks.after_step()
        host_waits.append(stream.wait_seconds)

    def sync_and_mark() -> None:  # the interleaved rounds' sync: the round's events are complete after it
        sync(device)
        if marks.starts and len(marks.ends) == len(marks.starts):
            between.append(marks.fraction())
            marks.starts, marks.ends = [], []

    if warmup:  # compilation, cudnn autotuning, allocator warm-up: the same for both paths
        device_steps(warmup)
        end_to_end_steps(warmup)
    sync_and_mark()
    host_waits.clear()
    between.clear()
    if device.type == "cuda":  # the blocks autotuning and compilation reserved go; the steady state's peak stays
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    device_times, end_times = interleaved(device_steps, end_to_end_steps, max(1, repeats), sync_and_mark)
    host_prepared = host_prepares_batches(device, training.data.train_cache.mode)
    return _step_timing(device_times, end_times, iterations, host_waits if host_prepared else None, between,
                        plan, config.data.num_samples, device)


def _step_timing(device_times: list[float], end_times: list[float], iterations: int,
                 host_waits: list[float] | None, between: list[float], plan: Any, num_samples: int,
                 device: torch.device) -> StepTiming:
    device_step, device_low, device_high = (v / iterations for v in spread(device_times))
    end_to_end, end_low, end_high = (v / iterations for v in spread(end_times))
    gpu = device.type == "cuda"
    peak, allocated = cuda_peak_memory_gb(device) if gpu else (peak_rss_gb(), None)
    host_wait = None if host_waits is None else \
        min(1.0, float(np.median(host_waits)) / max(end_to_end * iterations, 1e-9))
    return StepTiming(
        device_step_s=device_step, end_to_end_step_s=end_to_end, samples_per_s=plan.batch_size / end_to_end,
        peak_memory_gb=peak, batch_size=plan.batch_size, patch_size=list(plan.patch_size), num_samples=num_samples,
        gpu_data_wait_fraction=float(np.median(between)) if between else None, host_data_wait_fraction=host_wait,
        device_step_range_s=(device_low, device_high), end_to_end_range_s=(end_low, end_high),
        noisy=is_noise(device_times) or is_noise(end_times) or end_to_end < device_step,
        memory_kind="reserved+context" if gpu else "rss", peak_allocated_gb=allocated,
    )


def config_for(device: str, num_threads: int, overrides: list[str] | None = None,
               base: TrainConfig | None = None) -> TrainConfig:
    """A training config for timing: the defaults (or `base`) on `device` with `num_threads` CPU threads."""
    from voxseg.config import apply_overrides

    config = copy.deepcopy(base) if base is not None else TrainConfig()
    items = [f"loop.device={device}", f"data.num_threads={num_threads}", "logging.tensorboard=false",
             "logging.progress_png=false"]
    return apply_overrides(config, items + list(overrides or []))
