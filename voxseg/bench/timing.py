"""Timing of one training configuration, shared by `voxseg benchmark` and `voxseg estimate`.

Two numbers tell where time goes:
- the *device step*: model + loss + backward + optimiser on one batch that already sits on the device;
- the *end-to-end step*: sampling + augmentation + the step, as training runs it.
Their difference is the data path's cost; `data_wait_fraction` is the share of end-to-end time the step
waited for a batch. Every timed region ends with a device synchronisation, so the numbers are honest.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxseg.config import TrainConfig
from voxseg.data.store import list_cases
from voxseg.errors import DatasetError
from voxseg.units import gib


@dataclass
class StepTiming:
    """Measured training speed of one configuration (seconds, GiB)."""

    device_step_s: float
    end_to_end_step_s: float
    data_wait_fraction: float
    samples_per_s: float
    peak_memory_gb: float
    batch_size: int
    patch_size: list[int]
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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


def time_training(workdir: str | Path, config: TrainConfig, iterations: int = 20, warmup: int = 5) -> StepTiming:
    """Build the training exactly as `voxseg train` does and time `iterations` steps both ways.

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

    image, seg = t.data.next_batch()
    for _ in range(warmup):  # compilation, cudnn autotuning, allocator warm-up
        t.step(image, seg)
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        t.step(image, seg)
    sync(device)
    device_step = (time.perf_counter() - start) / iterations

    stream = t.data.train_stream(iterations)
    start = time.perf_counter()
    for batch in stream:
        t.step(*batch)
    sync(device)
    end_to_end = (time.perf_counter() - start) / iterations
    peak = gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
    del t
    return StepTiming(
        device_step_s=device_step, end_to_end_step_s=end_to_end,
        data_wait_fraction=min(1.0, stream.wait_seconds / max(end_to_end * iterations, 1e-9)),
        samples_per_s=plan.batch_size / end_to_end, peak_memory_gb=peak, batch_size=plan.batch_size,
        patch_size=list(plan.patch_size), num_samples=config.data.num_samples,
    )


def config_for(device: str, num_threads: int, overrides: list[str] | None = None,
               base: TrainConfig | None = None) -> TrainConfig:
    """A training config for timing: the defaults (or `base`) on `device` with `num_threads` CPU threads."""
    from voxseg.config import apply_overrides

    config = copy.deepcopy(base) if base is not None else TrainConfig()
    items = [f"loop.device={device}", f"data.num_threads={num_threads}", "logging.tensorboard=false",
             "logging.progress_png=false"]
    return apply_overrides(config, items + list(overrides or []))
