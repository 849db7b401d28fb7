"""From per-round step timings to epochs, whole trainings and speed-ups against a baseline (pure arithmetic).

An epoch of setting s (nnU-Net's and `voxseg train`'s rule, see `voxseg.train.loop.resolve`):

    iterations(s) = data.iterations_per_epoch (default 250), or with 0 one pass: ceil(cases x patches/case / batch)
    epoch(s)      = iterations(s) x step(s) + val_iterations / val_freq x validation batch(s)
    total(s, E)   = E x epoch(s)

Every figure is computed per round, and rounds are paired: round r of the baseline with round r of the row,
which in an interleaved schedule were timed within seconds of each other, so load that hit both cancels in
their ratio. A ratio is reported as median (min-max) over the rounds.

    speed-up(row)   = total(baseline) / total(row)               (> 1: the row trains faster)
    per sample(row) = samples/s(row) / samples/s(baseline)       (batch / step; equal samples seen)

Anchored (`current_epoch_s`, the baseline's epoch as the user's run logs it): a row's epoch is the anchor x
its median epoch ratio to the baseline here; ratios transfer between machines far better than seconds do.
Unanchored, epochs and totals are this machine's own.

Example: baseline batch 2 at 0.20 s/step, 250 iterations, 50 validation batches at 0.06 s: epoch 53 s; batch 4 at
0.38 s/step and 0.11 s: epoch 100.5 s, speed-up 0.53x, per sample 1.05x; anchored at 302 s the batch-4 epoch
is 302 x 100.5 / 53 = 573 s, and 1000 epochs take 6.6 days.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from voxseg.bench.rowtiming import Measured, Setting
from voxseg.bench.timing import NOISE_SPREAD


@dataclass(frozen=True)
class EpochShape:
    """What one epoch consists of."""

    iterations_per_epoch: int
    """Fixed optimiser steps per epoch; 0 = one pass over the training cases."""
    num_cases: int
    """Training cases (what one pass covers)."""
    val_iterations: int = 50
    val_freq: int = 1

    def iterations(self, setting: Setting) -> int:
        return epoch_iterations(self.iterations_per_epoch, self.num_cases, setting.num_samples,
                                setting.batch_size)

    def epoch_s(self, setting: Setting, step_s: float, val_batch_s: float) -> float:
        return self.iterations(setting) * step_s + self.val_iterations / self.val_freq * val_batch_s


def epoch_iterations(fixed: int, num_cases: int, num_samples: int, batch_size: int) -> int:
    """`fixed` when > 0, else one pass over the cases: ceil(cases x patches per case / batch)."""
    return fixed if fixed > 0 else max(1, math.ceil(num_cases * num_samples / batch_size))


def summary(values: Sequence[float]) -> list[float]:
    """[median, min, max]."""
    return [float(np.median(values)), float(min(values)), float(max(values))]


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median; infinite for a non-positive median."""
    median = float(np.median(values))
    return math.inf if median <= 0 else (max(values) - min(values)) / median


def round_epochs(setting: Setting, measured: Measured, shape: EpochShape) -> list[float]:
    """Epoch seconds of each round (validation batches count 0 s where none were timed)."""
    val = measured.val_batch_s or [0.0] * len(measured.step_s)
    return [shape.epoch_s(setting, step, batch) for step, batch in zip(measured.step_s, val)]


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """numerator_r / denominator_r for each round r both have."""
    return [a / b for a, b in zip(numerators, denominators) if b > 0]


@dataclass
class EstimateRow:
    """One line of the table: a setting trained for `epochs` epochs."""

    index: int
    """1-based row number, as the table and its warnings name it."""
    setting_index: int
    batch_size: int
    num_samples: int
    patch_size: list[int]
    epochs: int
    iterations_per_epoch: int
    baseline: bool = False
    fits: bool = True
    note: str = ""
    step_ms: float | None = None
    """Median end-to-end step on this machine (never anchored)."""
    epoch_s: float | None = None
    total_s: float | None = None
    speedup: list[float] | None = None
    """[median, min, max] of total(baseline) / total(row) over the rounds."""
    per_sample: list[float] | None = None
    """[median, min, max] of samples/s(row) / samples/s(baseline) over the rounds."""
    spread: float | None = None
    """Relative spread of the row's paired epoch ratios to the baseline over the rounds (of its own step
    rounds when the baseline has no timing)."""
    memory_gb: float | None = None
    model_memory_gb: float | None = None


def project(settings: Sequence[Setting], measured: Sequence[Measured], shape: EpochShape, epochs: Sequence[int],
            current_epoch_s: float | None = None) -> list[EstimateRow]:
    """The table's rows: every setting x every epochs value, the first (settings[0], epochs[0]) the baseline."""
    base_setting, base = settings[0], measured[0]
    base_ok = base.fits and bool(base.step_s)
    baseline = _Baseline(base_setting, base, round_epochs(base_setting, base, shape) if base_ok else [], epochs[0],
                         current_epoch_s)
    rows = []
    for setting_index, (setting, timing) in enumerate(zip(settings, measured)):
        own = round_epochs(setting, timing, shape) if timing.fits and timing.step_s else []
        for epoch_count in epochs:
            row = EstimateRow(
                index=len(rows) + 1, setting_index=setting_index, batch_size=setting.batch_size,
                num_samples=setting.num_samples, patch_size=list(setting.patch_size), epochs=int(epoch_count),
                iterations_per_epoch=shape.iterations(setting), baseline=not rows, fits=timing.fits,
                note=timing.note, memory_gb=timing.memory_gb)
            if own:
                _fill(row, setting, timing, own, baseline)
            rows.append(row)
    return rows


@dataclass
class _Baseline:
    """What every row is set against: the baseline setting, its timing and epochs per round, its epoch count, and
    the user's own epoch time in that setting (None: this machine's times)."""

    setting: Setting
    timing: Measured
    epochs_per_round: list[float]
    epoch_count: int
    current_epoch_s: float | None


def _fill(row: EstimateRow, setting: Setting, timing: Measured, own: list[float], baseline: _Baseline) -> None:
    base_epochs = baseline.epochs_per_round
    row.step_ms = float(np.median(timing.step_s)) * 1000
    row.spread = relative_spread(timing.step_s)  # without a baseline to pair with, the raw rounds' spread
    if base_epochs:
        epoch_ratio = paired_ratios(own, base_epochs)
        row.speedup = summary([baseline.epoch_count / (row.epochs * r) for r in epoch_ratio])
        rate = [setting.batch_size / step for step in timing.step_s]
        base_rate = [baseline.setting.batch_size / step for step in baseline.timing.step_s]
        row.per_sample = summary(paired_ratios(rate, base_rate))
        row.spread = relative_spread(epoch_ratio)  # load that hit both rows in a round cancels here
    if baseline.current_epoch_s is not None:
        row.epoch_s = (baseline.current_epoch_s * float(np.median(paired_ratios(own, base_epochs)))
                       if base_epochs else None)
    else:
        row.epoch_s = float(np.median(own))
    row.total_s = None if row.epoch_s is None else row.epoch_s * row.epochs


def noisy_rows(rows: Sequence[EstimateRow], threshold: float = NOISE_SPREAD) -> list[EstimateRow]:
    """Rows whose paired ratios (or, without a baseline, timing rounds) spread by more than `threshold`."""
    return [row for row in rows if row.spread is not None and row.spread > threshold]
