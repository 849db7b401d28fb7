"""`voxseg estimate WORKDIR`: how long will training take, and what would another setting buy?

The question it answers: "my run (the baseline) takes X per epoch; what does a larger batch, fewer patches per
case, another patch or fewer epochs make it?". Every setting is timed here for a few steps, the rest is
arithmetic (`voxseg.bench.projection`):

- the *baseline* is row #1: the plan's batch and patch with `data.num_samples` patches per case, or
  `--baseline BATCH,PATCHES_PER_CASE[,PATCH]`; the first `--epochs` value is its number of epochs;
- `--cases N` sets the training cases of the run asked about (default: fold 0's training cases here), which
  decide the iterations of a one-pass epoch (`--iterations-per-epoch 0`) and the data cache the run would get;
- `--current-epoch-time SECONDS` anchors the table to the user's run: each row's epoch is that time x the
  row's epoch ratio to the baseline measured here. Ratios are what transfer between machines; a CPU's can
  still differ from a GPU's (a GPU gains more from a larger batch), so time on the GPU you train on if you can.

Method (`voxseg.bench.rowtiming`): each setting's training is built on `TIMING_CASES` cases with the cache mode
the whole training set would get on this machine, warmed up (`--warmup` steps and one validation batch),
then timed in `--rounds` rounds of `--iterations` end-to-end steps and one validation batch. On a CPU without
compilation the rounds are interleaved across settings (A B C, C B A, ...); on CUDA, or when compiling,
settings are timed one at a time, each compiled fresh after clearing Dynamo's caches and its memory measured
alone. Per-round ratios against the baseline give each speed-up as median (min-max). Rows whose rounds
spread by more than 20% are named in a note (the machine is too noisy), and pairs of rows whose ratios
contradict what must hold (more work per step or per sample measured faster) are named in a warning
(`voxseg.bench.plausibility`). A setting that runs out of memory is reported as "does not fit".
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from voxseg.bench.calibrate import MemoryCalibration
from voxseg.bench.plausibility import contradictions, noise_note
from voxseg.bench.projection import EpochShape, project
from voxseg.bench.rowtiming import (
    TIMING_CASES,
    Compiler,
    Measured,
    OpenRow,
    Schedule,
    Setting,
    TrainingRow,
    measure_settings,
)
from voxseg.bench.timing import config_for, training_cases
from voxseg.config import TrainConfig
from voxseg.data.memory import estimate_memory_gb
from voxseg.errors import ConfigError, VoxsegError
from voxseg.jsonio import write_json_atomic
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


@dataclass
class EstimateRequest:
    """What to compare and how long to time it (the `voxseg estimate` flags)."""

    batch_sizes: list[int] | None = None
    num_samples: list[int] | None = None
    patch_sizes: list[list[int]] | None = None
    baseline: list[int] | None = None
    """BATCH,PATCHES_PER_CASE[,PATCH...] of the run the user has; None: the plan's, data.num_samples."""
    epochs: list[int] = field(default_factory=lambda: [1000])
    iterations_per_epoch: int = 250
    cases: int | None = None
    current_epoch_s: float | None = None
    device: str = "auto"
    threads: int | None = None
    """CPU threads torch may use; None: as many as it uses now (all cores by default)."""
    schedule: Schedule = field(default_factory=Schedule)
    overrides: list[str] = field(default_factory=list)
    """Training config overrides (SECTION.FIELD=VALUE) every setting starts from."""

    def __post_init__(self) -> None:
        checks = [
            (all(e >= 1 for e in self.epochs) and bool(self.epochs), "--epochs", "every value must be >= 1"),
            (self.iterations_per_epoch >= 0, "--iterations-per-epoch", "must be >= 0 (0 = one pass over the cases)"),
            (self.cases is None or self.cases >= 1, "--cases", "must be >= 1"),
            (self.threads is None or self.threads >= 1, "--threads", "must be >= 1"),
            (self.current_epoch_s is None or self.current_epoch_s > 0, "--current-epoch-time",
             "must be > 0 seconds"),
            (self.baseline is None or len(self.baseline) >= 2, "--baseline", "expects BATCH,PATCHES_PER_CASE"),
            (all(v >= 1 for v in (self.batch_sizes or []) + (self.num_samples or []) + (self.baseline or [])),
             "--batch-sizes/--num-samples/--baseline", "every value must be >= 1"),
            (self.schedule.warmup >= 0 and self.schedule.iterations >= 1 and self.schedule.rounds >= 1,
             "--warmup/--iterations/--rounds", "need warmup >= 0, iterations >= 1 and rounds >= 1"),
        ]
        for ok, flag, rule in checks:
            if not ok:
                raise ConfigError(f"{flag}: {rule}")


def fold_training_cases(workdir: Path) -> int:
    """Training cases of fold 0 (what one pass of `voxseg train --fold 0` covers); all cases without splits."""
    from voxseg.data.splits import get_fold

    names = training_cases(workdir)
    if not WorkDir(workdir).splits.is_file():
        return len(names)
    return len(get_fold(workdir, 0, available=names)[0])


def model_memory_gb(plan: Plan, batch: int, patch: Sequence[int]) -> float | None:
    """The memory model's peak (GiB) for the plan's network at this batch and patch: the fit of
    `voxseg plan --calibrate` when plans.json holds one, else the formula."""
    try:
        variant = dataclasses.replace(plan, batch_size=int(batch), patch_size=[int(p) for p in patch])
    except VoxsegError:  # a patch the network cannot take: the timing row says so
        return None
    if plan.memory_calibration:
        return round(MemoryCalibration.from_dict(plan.memory_calibration).estimate_gb(variant), 4)
    return round(estimate_memory_gb(variant.network, variant.patch_size, variant.batch_size, variant.num_channels,
                                    variant.num_outputs), 4)


def settings_for(plan: Plan, config: TrainConfig, request: EstimateRequest) -> list[Setting]:
    """The baseline first, then every combination of the requested values not already listed."""
    ndim = len(plan.patch_size)
    base = list(request.baseline or [plan.batch_size, config.data.num_samples])
    base_patch = base[2:] or list(plan.patch_size)
    if len(base_patch) != ndim:
        raise ConfigError(f"--baseline {','.join(map(str, base))}: the patch needs {ndim} sizes after "
                          "BATCH,PATCHES_PER_CASE (or none for the plan's)")
    settings = [Setting(int(base[0]), int(base[1]), tuple(int(p) for p in base_patch))]
    for batch in request.batch_sizes or [settings[0].batch_size]:
        for samples in request.num_samples or [settings[0].num_samples]:
            for patch in request.patch_sizes or [list(settings[0].patch_size)]:
                if len(patch) != ndim:
                    raise ConfigError(f"--patch-sizes {','.join(map(str, patch))}: the plan's patch has {ndim} sizes")
                setting = Setting(int(batch), int(samples), tuple(int(p) for p in patch))
                if setting not in settings:
                    settings.append(setting)
    return settings


def training_cache_mode(workdir: Path, config: TrainConfig, plan: Plan, cases: list[str], num_cases: int) -> str:
    """The cache mode `num_cases` cases like these would get on this device (data.cache unless "auto")."""
    if config.data.cache != "auto":
        return config.data.cache
    from voxseg.data.store import load_case
    from voxseg.devices import resolve_device
    from voxseg.train.cache import choose_cache_mode
    from voxseg.train.loop import cache_budget_gb

    sizes = []  # image and labels of each case are a tensor each, pinned one by one
    for name in cases:
        image, seg, _ = load_case(WorkDir(workdir).preprocessed, name, mmap=True)
        sizes += [image.nbytes] + ([seg.nbytes] if seg is not None else [])
    device = resolve_device(config.loop.device, option="--device")
    # the dataset at hand's cases, repeated to `num_cases` cases
    dataset = [sizes[i % len(sizes)] for i in range(round(len(sizes) * num_cases / max(1, len(cases))))]
    return choose_cache_mode(dataset, device, cache_budget_gb(config, plan, device))


def _open_rows(workdir: Path, config: TrainConfig, cases: list[str], cache_mode: str, schedule: Schedule) -> OpenRow:
    def open_row(setting: Setting, compiler: Compiler | None) -> TrainingRow:
        return TrainingRow(workdir, setting, config, cases, cache_mode, schedule, compiler)

    return open_row


def _measure(settings: list[Setting], open_row: OpenRow, schedule: Schedule, device: torch.device,
             compiling: bool, compiler: Compiler | None) -> list[Measured]:
    measured = [Measured() for _ in settings]
    runnable = [i for i, s in enumerate(settings) if s.batch_size % s.num_samples == 0]
    for i, s in enumerate(settings):
        if i not in runnable:
            measured[i] = Measured(fits=False, note=f"batch {s.batch_size} is not a multiple of {s.num_samples} "
                                                    "patches per case")
    interleave = device.type == "cpu" and not compiling
    timed = measure_settings([settings[i] for i in runnable], open_row, schedule.rounds, interleave,
                             (compiler or Compiler()) if compiling else None)
    for i, result in zip(runnable, timed):
        measured[i] = result
    return measured


def run_estimate(workdir: str | Path, request: EstimateRequest | None = None, output: str | Path | None = None,
                 open_row: OpenRow | None = None, compiler: Compiler | None = None) -> dict[str, Any]:
    """Time every setting, project the table, write estimate.json (or `output`) and return it.

    `open_row` and `compiler` replace how a setting's training is built and compiled (tests).
    """
    from voxseg.bench.benchmark import device_name
    from voxseg.train.loop import effective_plan, resolve

    start = time.perf_counter()
    workdir, request = Path(workdir), request or EstimateRequest()
    schedule = request.schedule
    config = config_for(request.device, request.threads or torch.get_num_threads(), request.overrides)
    plan = effective_plan(workdir, config)
    num_cases = request.cases or fold_training_cases(workdir)
    cases = training_cases(workdir)[:TIMING_CASES]
    setup = resolve(config, plan, num_cases)
    if config.loop.val_iterations == 0:
        schedule = dataclasses.replace(schedule, val_batches=0)
    settings = settings_for(plan, config, request)
    cache_mode = training_cache_mode(workdir, config, plan, cases, num_cases)
    measured = _measure(settings, open_row or _open_rows(workdir, config, cases, cache_mode, schedule), schedule,
                        setup.device, setup.compile, compiler)
    shape = EpochShape(request.iterations_per_epoch, num_cases, config.loop.val_iterations, config.loop.val_freq)
    rows = project(settings, measured, shape, request.epochs, request.current_epoch_s)
    for row in rows:
        row.model_memory_gb = model_memory_gb(plan, row.batch_size, row.patch_size)
    first_rows = [next(r.index for r in rows if r.setting_index == i) for i in range(len(settings))]
    note = noise_note(rows, schedule.rounds, shared_threads=setup.device.type == "cpu" and config.data.num_threads > 1)
    result = {
        "device": device_name(setup.device), "device_type": setup.device.type, "torch": torch.__version__,
        "cpu_threads": config.data.num_threads, "num_cases": num_cases,
        "cases_from": "--cases" if request.cases else "fold 0 of this work directory",
        "epochs": list(request.epochs), "iterations_per_epoch": request.iterations_per_epoch,
        "val_iterations": config.loop.val_iterations, "val_freq": config.loop.val_freq,
        "current_epoch_s": request.current_epoch_s, "cache_mode": cache_mode, "compile": setup.compile,
        "schedule": {**dataclasses.asdict(schedule), "interleaved": setup.device.type == "cpu" and not setup.compile,
                     "timing_cases": len(cases)},
        "calibrated": bool(plan.memory_calibration),
        "settings": [{**dataclasses.asdict(s), "patch_size": list(s.patch_size), **dataclasses.asdict(m)}
                     for s, m in zip(settings, measured)],
        "rows": [dataclasses.asdict(row) for row in rows],
        "warnings": contradictions(settings, measured, setup.device.type, first_rows),
        "notes": [note] if note else [],
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(Path(output) if output else WorkDir(workdir).estimate, result)
    return result

