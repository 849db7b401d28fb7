"""`voxseg estimate WORKDIR`: how long will training take, and what would another setting buy?

Every row is a short real run (`time_training`) of one configuration on this device, so the numbers include
the data path, the model and the optimiser as training runs them; only the extrapolation to a whole
training is arithmetic:

    epoch time = end-to-end step time x iterations per epoch
    total      = epoch time x epochs

The speed-up compares rows at equal samples seen, not equal iterations: it is the ratio of samples/s (batch /
end-to-end step) against the first row, so a larger batch is credited for the samples it adds per step. A row
whose timing rounds spread by more than 20% (or came out inconsistent) shows "noise" instead of a ratio.

Iterations per epoch are fixed (nnU-Net style, default 250), or, with `iterations_per_epoch=0`, one pass
over the training cases: ceil(cases x patches per case / batch size) — so a larger batch or fewer patches per
case shortens an epoch. "Cases" are fold 0's training cases, as `voxseg train --fold 0` counts them. A
configuration that runs out of memory is reported as "does not fit", never a crash.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from voxseg.bench.calibrate import MemoryCalibration
from voxseg.bench.timing import config_for, is_out_of_memory, time_training, training_cases
from voxseg.data.memory import estimate_memory_gb
from voxseg.errors import VoxsegError
from voxseg.jsonio import write_json_atomic
from voxseg.plans import Plan


@dataclass
class EstimateRow:
    batch_size: int
    num_samples: int
    patch_size: list[int]
    step_s: float | None = None
    iterations_per_epoch: int = 0
    epoch_s: float | None = None
    total_h: float | None = None
    speedup: float | None = None
    peak_memory_gb: float | None = None
    model_memory_gb: float | None = None  # the planner's memory model (calibrated when plans.json holds a fit)
    fits: bool = True
    note: str = ""
    noisy: bool = False


def epoch_iterations(fixed: int, num_cases: int, num_samples: int, batch_size: int) -> int:
    """`fixed` when > 0, else one pass over the cases: ceil(cases x patches per case / batch)."""
    return fixed if fixed > 0 else max(1, math.ceil(num_cases * num_samples / batch_size))


def fold_training_cases(workdir: Path) -> int:
    """Training cases of fold 0 (what one pass of `voxseg train --fold 0` covers); all cases without splits."""
    from voxseg.data.splits import SPLITS_FILE, get_fold

    names = training_cases(workdir)
    if not (workdir / SPLITS_FILE).is_file():
        return len(names)
    return len(get_fold(workdir, 0, available=names)[0])


def _measure(workdir: Path, device: str, batch: int, samples: int, patch: list[int], iterations: int,
             base_overrides: list[str]) -> EstimateRow:
    row = EstimateRow(batch, samples, list(patch))
    if batch % samples:
        row.fits, row.note = False, f"batch {batch} is not a multiple of {samples} patches per case"
        return row
    overrides = base_overrides + [f"plan.batch_size={batch}", f"data.num_samples={samples}",
                                  "plan.patch_size=" + ",".join(str(p) for p in patch)]
    try:
        timing = time_training(workdir, config_for(device, torch.get_num_threads(), overrides),
                               iterations=iterations, warmup=min(3, iterations))
    except Exception as exc:  # noqa: BLE001 - out-of-memory is an answer here, anything else is re-raised
        if not is_out_of_memory(exc):
            raise
        row.fits, row.note = False, "does not fit (out of memory)"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row
    row.step_s, row.peak_memory_gb, row.noisy = timing.end_to_end_step_s, timing.peak_memory_gb, timing.noisy
    return row


def model_memory_gb(plan: Plan, batch: int, patch: list[int]) -> float | None:
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


def run_estimate(workdir: str | Path, batch_sizes: Sequence[int] | None = None,
                 num_samples: Sequence[int] | None = None, patch_sizes: Sequence[Sequence[int]] | None = None,
                 epochs: int = 1000, iterations_per_epoch: int = 250, device: str = "auto", iterations: int = 10,
                 output: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Time every combination and extrapolate; the first row is the current plan (the reference)."""
    workdir = Path(workdir)
    plan = Plan.load(workdir / "plans.json")
    num_cases = fold_training_cases(workdir)
    combos = [(plan.batch_size, 1, list(plan.patch_size))]
    for batch in batch_sizes or [plan.batch_size]:
        for samples in num_samples or [1]:
            for patch in patch_sizes or [plan.patch_size]:
                combo = (int(batch), int(samples), [int(p) for p in patch])
                if combo not in combos:
                    combos.append(combo)
    rows = []
    for batch, samples, patch in combos:
        row = _measure(workdir, device, batch, samples, patch, iterations, list(overrides or []))
        row.model_memory_gb = model_memory_gb(plan, batch, patch)
        row.iterations_per_epoch = epoch_iterations(iterations_per_epoch, num_cases, samples, batch)
        if row.step_s is not None:
            row.epoch_s = row.step_s * row.iterations_per_epoch
            row.total_h = row.epoch_s * epochs / 3600
        rows.append(row)
    reference = rows[0]
    for row in rows:  # samples/s against the reference's: equal samples seen
        if row.step_s and reference.step_s and not (row.noisy or reference.noisy):
            row.speedup = (row.batch_size / row.step_s) / (reference.batch_size / reference.step_s)
    result = {"epochs": epochs, "iterations_per_epoch": iterations_per_epoch, "num_cases": num_cases,
              "calibrated": bool(plan.memory_calibration),
              "rows": [row.__dict__ for row in rows]}
    write_json_atomic(Path(output) if output else workdir / "estimate.json", result)
    return result


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}GB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} d"


def format_estimate(result: dict[str, Any]) -> str:
    header = f"{'batch':>5} {'patches/case':>12} {'patch':>16} {'step':>9} {'it/epoch':>8} {'epoch':>9} " \
             f"{'total':>9} {'speed-up':>8} {'memory':>8} {'model':>8}"
    lines = [f"{result['num_cases']} training cases, {result['epochs']} epochs "
             f"({'one pass over the cases' if not result['iterations_per_epoch'] else str(result['iterations_per_epoch']) + ' iterations'} per epoch)",
             header]
    for row in result["rows"]:
        patch = "x".join(str(p) for p in row["patch_size"])
        start = f"{row['batch_size']:>5} {row['num_samples']:>12} {patch:>16}"
        if not row["fits"]:
            lines.append(f"{start}  {row['note']}")
            continue
        # None: noise (this row or the reference), or the reference did not fit
        speedup = ("noise" if row.get("noisy") or result["rows"][0].get("noisy") else "-") \
            if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(f"{start} {row['step_s'] * 1000:>7.0f}ms {row['iterations_per_epoch']:>8} "
                     f"{_duration(row['epoch_s']):>9} {_duration(row['total_h'] * 3600):>9} "
                     f"{speedup:>8} {row['peak_memory_gb']:>6.2f}GB {_gb(row.get('model_memory_gb')):>8}")
    lines.append("first row: the current plan (reference for the speed-up, compared at equal samples seen); memory: "
                 "measured peak (CUDA allocator on a GPU, the process's RSS on a CPU); model: the planner's GPU "
                 "memory model" + (" (calibrated)" if result.get("calibrated") else ""))
    return "\n".join(lines)
