"""Checks that keep `voxseg estimate` from printing timings that cannot be right without saying so.

Some orderings hold whatever the machine, so a measurement that contradicts them beyond its own uncertainty
(every paired round agrees, by more than a margin) is a bad measurement, not a finding:

- *more work per step*: a setting with at least the batch, at least the patch along every axis and at most the
  patches per case of another (more crops to cut, not fewer), bigger in one of them, can not step faster;
- *more work per sample*: a larger patch (every axis at least as large) at the same or fewer patches per case
  can not be faster per sample. On a GPU only at the same or a smaller batch: a GPU may use a larger batch
  better, and that gain can outweigh a slightly larger patch;
- *a CPU batches little*: at the same patch and patches per case a larger batch does the same work per sample;
  amortising per-step overhead can buy a little, not more than `CPU_BATCH_GAIN`.

A warning names both rows and the measured ratio. The noise note says which rows' rounds spread by more than
`NOISE_SPREAD`: their ratios are printed with that spread, and the machine is too busy to trust them.
"""
from __future__ import annotations

from typing import Sequence

from voxseg.bench.projection import EstimateRow, noisy_rows, paired_ratios, summary
from voxseg.bench.rowtiming import Measured, Setting
from voxseg.bench.timing import NOISE_SPREAD

MARGIN = 0.05
"""A contradiction must exceed the ordering by this much in every round."""
CPU_BATCH_GAIN = 1.2
"""The most a larger batch may gain per sample on a CPU at the same patch (per-step overheads amortised)."""


def more_work_per_step(a: Setting, b: Setting) -> bool:
    """Whether `a` does at least `b`'s work per step, and more of it."""
    at_least = (a.batch_size >= b.batch_size and a.num_samples <= b.num_samples
                and all(x >= y for x, y in zip(a.patch_size, b.patch_size)))
    return at_least and (a.batch_size > b.batch_size or tuple(a.patch_size) != tuple(b.patch_size))


def more_work_per_sample(a: Setting, b: Setting, device_type: str) -> bool:
    """Whether each of `a`'s samples costs more than `b`'s on this kind of device (see the module docstring)."""
    larger_patch = (all(x >= y for x, y in zip(a.patch_size, b.patch_size))
                    and tuple(a.patch_size) != tuple(b.patch_size))
    batching_may_help = device_type == "cuda" and a.batch_size > b.batch_size
    return larger_patch and a.num_samples <= b.num_samples and not batching_may_help


def _rates(setting: Setting, timing: Measured) -> list[float]:
    return [setting.batch_size / step for step in timing.step_s]


def _ratio(values: list[float]) -> str:
    median, low, high = summary(values)
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def _pair_warning(a: Setting, timing_a: Measured, b: Setting, timing_b: Measured, device_type: str,
                  names: tuple[str, str]) -> str | None:
    per_step = paired_ratios(timing_b.step_s, timing_a.step_s)  # > 1: a steps faster
    per_sample = paired_ratios(_rates(a, timing_a), _rates(b, timing_b))  # > 1: a is faster per sample
    if not per_step or not per_sample:
        return None
    first, second = names
    if more_work_per_step(a, b) and min(per_step) > 1 + MARGIN:
        return (f"{first} does more work per step than {second} yet measured {_ratio(per_step)} faster per step: "
                "one of the two timings is wrong")
    if more_work_per_sample(a, b, device_type) and min(per_sample) > 1 + MARGIN:
        return (f"{first} does more work per sample than {second} yet measured {_ratio(per_sample)} faster per "
                "sample: one of the two timings is wrong")
    same_sample = tuple(a.patch_size) == tuple(b.patch_size) and a.num_samples == b.num_samples
    if device_type != "cuda" and same_sample and a.batch_size > b.batch_size and min(per_sample) > CPU_BATCH_GAIN:
        return (f"{first} measured {_ratio(per_sample)} faster per sample than {second}; on a CPU a larger batch "
                f"does the same work per sample and can not gain more than {CPU_BATCH_GAIN:.1f}x: one of the two "
                "timings is wrong")
    return None


def contradictions(settings: Sequence[Setting], measured: Sequence[Measured], device_type: str,
                   row_numbers: Sequence[int]) -> list[str]:
    """One warning per pair of settings whose timings contradict an ordering (module docstring).

    `row_numbers[i]` is the table row that shows setting i (its first row).
    """
    warnings = []
    for i, (a, timing_a) in enumerate(zip(settings, measured)):
        for j, (b, timing_b) in enumerate(zip(settings, measured)):
            if i == j or not (timing_a.fits and timing_b.fits):
                continue
            names = (f"row #{row_numbers[i]} ({a.describe()})", f"row #{row_numbers[j]} ({b.describe()})")
            warning = _pair_warning(a, timing_a, b, timing_b, device_type, names)
            if warning:
                warnings.append(warning)
    return warnings


def noise_note(rows: Sequence[EstimateRow], rounds: int, threshold: float = NOISE_SPREAD,
               shared_threads: bool = False) -> str | None:
    """The note for a machine too noisy to trust some rows, or None.

    `shared_threads`: timed on several CPU threads, which stall one another when other programs take cores;
    the note then suggests one thread.
    """
    noisy = noisy_rows(rows, threshold)
    if not noisy:
        return None
    names = ", ".join(f"#{row.index}" for row in noisy)
    worst = max(row.spread for row in noisy if row.spread is not None)
    return (f"this machine is too noisy for rows {names}: their {rounds} timing rounds spread by up to "
            f"{worst * 100:.0f}% (more than {threshold * 100:.0f}%), so their ratios are uncertain; close other "
            "programs, or rerun with more --rounds" + (" or --threads 1" if shared_threads else ""))
