"""How long a training run will take: the expected duration printed when it starts and the running estimate.

A run is its epochs (iterations x the time of one training step), a pseudo-Dice validation every `val_freq`
epochs (`val_iterations` forward passes of one batch) and, at the end, the full sliding-window validation of the
validation cases (one forward pass per tile). Before anything is measured, a forward pass is taken to cost
`FORWARD_SHARE` of a training step (forward + backward + optimiser); once an epoch has run, its measured wall
time (training, validation and checkpoints) replaces the estimate.

Example: 1000 epochs of 250 iterations at 0.4 s, a validation of 50 batches every epoch (~6.7 s estimated) and
2,000 tiles of full validation at batch 2 (~2.2 min) take 1000 x (100 + 6.7) s + 133 s = 29.7 hours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from voxseg.infer.config import InferConfig
from voxseg.infer.sliding_window import axis_starts

# a forward pass without gradients costs about a third of a training step (the backward pass costs about twice
# the forward); an estimate, used only until a validation has been timed
FORWARD_SHARE = 1 / 3


def format_duration(seconds: float) -> str:
    """'<1 s', '42 s', '3:07' (min:s), '5:12:00' (h:min:s) or '2 d 5:12:00'."""
    if 0 < seconds < 0.5:
        return "<1 s"
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds} s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes}:{secs:02d}"
    return f"{days} d {clock}" if days else clock


def count_tiles(shapes: Sequence[Sequence[int]], patch_size: Sequence[int], step: float | None = None,
                slice_axis: int | None = None) -> int:
    """Sliding-window tiles over cases of these spatial shapes (a 2D plan: tiles per slice x slices) at tile
    step `step` (None: the one full validation uses, `InferConfig`'s)."""
    step = InferConfig().step if step is None else step
    total = 0
    for shape in shapes:
        shape = list(shape)
        slices = 1
        if slice_axis is not None and len(patch_size) == len(shape) - 1:
            slices = shape.pop(slice_axis)
        # an axis shorter than the patch is padded to it: one tile
        total += slices * math.prod(len(axis_starts(max(size, patch), patch, step))
                                    for size, patch in zip(shape, patch_size))
    return total


@dataclass
class RunLength:
    """What a run has left to do.

    Attributes:
        start_epoch: the first epoch this process trains (0, or the epoch a resume continues from).
        epochs: the run's last epoch + 1.
        iterations: training iterations per epoch.
        val_freq: pseudo-Dice validation every this many epochs (0 = none).
        val_iterations: batches per validation.
        batch_size: patches per batch (training and validation).
        final_tiles: tiles of the final full validation (0 = none).
    """

    start_epoch: int
    epochs: int
    iterations: int
    val_freq: int
    val_iterations: int
    batch_size: int
    final_tiles: int

    @property
    def epochs_left(self) -> int:
        return max(0, self.epochs - self.start_epoch)

    def validations_left(self, from_epoch: int | None = None) -> int:
        """Validated epochs among those left (epoch e validates when (e + 1) % val_freq == 0)."""
        if not self.val_freq or not self.val_iterations:
            return 0
        first = self.start_epoch if from_epoch is None else from_epoch
        return max(0, self.epochs // self.val_freq - first // self.val_freq)

    def validation_seconds(self, step_seconds: float) -> float:
        """One pseudo-Dice validation, estimated from the training step."""
        return self.val_iterations * step_seconds * FORWARD_SHARE

    def final_seconds(self, step_seconds: float, tile_seconds: float | None = None) -> float:
        """The final full validation: its tiles at the measured time per tile, else estimated from the step."""
        per_tile = tile_seconds if tile_seconds is not None else step_seconds / self.batch_size * FORWARD_SHARE
        return self.final_tiles * per_tile

    def expected(self, step_seconds: float) -> str:
        """The whole remaining run from the time of one training step, as one line with its parts."""
        train = self.iterations * step_seconds
        validation = self.validation_seconds(step_seconds)
        final = self.final_seconds(step_seconds)
        total = self.epochs_left * train + self.validations_left() * validation + final
        every = "every epoch" if self.val_freq == 1 else f"every {self.val_freq} epochs"
        plural = "" if self.epochs_left == 1 else "s"
        parts = f"{self.epochs_left} epoch{plural} x ({self.iterations} iterations x {step_seconds:.3g} s"
        parts += f" + validation ~{format_duration(validation)} {every})" if self.validations_left() else ")"
        if self.final_tiles:
            parts += f" + final validation ~{format_duration(final)}"
        return f"expected duration: {parts} = {format_duration(total)}"

    def remaining(self, next_epoch: int, epoch_seconds: float, tile_seconds: float | None,
                  step_seconds: float) -> float:
        """Seconds left before epoch `next_epoch`: measured mean epoch wall time x epochs left + final validation."""
        return max(0, self.epochs - next_epoch) * epoch_seconds + self.final_seconds(step_seconds, tile_seconds)
