"""Patch sampler: batches of random / foreground-centred crops from a `CaseCache`, on the training device.

Positions are host integers drawn from a NumPy generator (positions must be host values to slice with, and
drawing them on the host is no device sync); crops are copied into one preallocated batch per call.

Foreground oversampling: over many batches exactly `foreground_fraction` of the patches are forced to be
centred on a foreground voxel. Each batch forces floor(credit + B * f) - floor(credit) patches (the last ones
of the batch, like nnU-Net), with a running credit that starts at a random phase. nnU-Net's per-batch rule
round(B * (1 - f)) random patches would give 1/2 instead of 0.33 for B = 2; this rule has no such bias and
each batch still forces floor(B f) or ceil(B f) patches.

Placement (nnU-Net's rule): a random patch starts uniformly where the final patch P, centred in the crop S,
lies inside the case; a case smaller than P along an axis is centred and padded (image 0, labels -1 =
"outside"). A forced patch picks a class uniformly among the classes present in the case (per-class balance),
a stored voxel of that class uniformly, and is centred on it (clamped to the same range, so the voxel is
always inside the final patch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from voxseg.errors import ConfigError
from voxseg.train.cache import CaseCache

_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


@dataclass
class Draw:
    """Where one patch of the last batch came from."""

    case: int
    start: tuple[int, ...]
    forced: bool
    """Whether the patch was forced to contain foreground."""
    label: int | None
    """Class it was centred on: a label value, or a region index when `regions` is given; None if random."""


def _one_slice(plane: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """A 2D patch as a 3D crop one voxel thick along `axis`: (h, w) along axis 1 -> (h, 1, w)."""
    return (*plane[:axis], 1, *plane[axis:])


@dataclass(frozen=True)
class ForegroundSampling:
    """Which patches are forced to contain foreground, and what counts as foreground (the plan says both)."""

    fraction: float = 0.33
    """Long-run fraction of patches forced to be centred on a foreground voxel (the plan's
    foreground_oversampling)."""
    regions: Sequence[Sequence[int]] | None = None
    """Foreground classes as lists of label values (region-based datasets); None: each label value > 0 present in
    the case's foreground file is its own class."""
    ignore_label: int | None = None
    """A label value never used as a foreground class."""


class PatchSampler:
    """Random and foreground-centred crops of size `source_size`, batched on the cache's device.

    Args:
        cache: the cases; batches are returned on its device.
        patch_size: final patch P (3 entries, or 2 for 2D training on slices along `slice_axis`).
        batch_size: B, patches per batch.
        foreground: how many patches are forced to contain foreground, and which classes count (default
            `ForegroundSampling()`: 0.33, every label value > 0).
        num_samples: k patches per drawn case (B / k cases per batch; B must be divisible by k).
        source_size: crop size S >= P (from `voxseg.augment.source_size`); default P.
        seed: a seed of the position generator, or a numpy Generator to draw positions from (numpy's
            `default_rng` convention; host ints: drawing them is no device sync).
        slice_axis: 2D patches only: the case axis the slices are taken along (the plan's `slice_axis`); the
            patch covers the other two axes in their order.
    """

    SEG_FILL = -1
    """Label value of padding outside the case: "outside", as in the case store."""

    def __init__(
        self,
        cache: CaseCache,
        patch_size: Sequence[int],
        batch_size: int,
        foreground: ForegroundSampling | None = None,
        num_samples: int = 1,
        source_size: Sequence[int] | None = None,
        seed: int | np.random.Generator | None = None,
        slice_axis: int = 0,
    ) -> None:
        foreground = foreground if foreground is not None else ForegroundSampling()
        self.cache = cache
        self.patch_size = tuple(int(p) for p in patch_size)
        self.source_size = tuple(int(s) for s in (source_size if source_size is not None else patch_size))
        self.batch_size, self.num_samples = int(batch_size), int(num_samples)
        self.foreground_fraction = float(foreground.fraction)
        self._validate()
        regions = foreground.regions
        self.regions = [tuple(int(v) for v in r) for r in regions] if regions is not None else None
        self.ignore_label = foreground.ignore_label
        self.device = cache.device
        self.seg_fill = self.SEG_FILL
        self.rng = np.random.default_rng(seed)  # a Generator given as the seed is used as it is
        self._credit = float(self.rng.random())  # random phase of the foreground schedule
        self.last_draws: list[Draw] = []
        # 2D patches are 3D crops one slice thick along the slice axis
        if not 0 <= int(slice_axis) <= 2:
            raise ConfigError(f"sampler: slice_axis {slice_axis} must be 0, 1 or 2")
        self.slice_axis = int(slice_axis)
        self._crop = self.source_size if len(self.patch_size) == 3 else _one_slice(self.source_size, self.slice_axis)
        self._final = self.patch_size if len(self.patch_size) == 3 else _one_slice(self.patch_size, self.slice_axis)

    def _validate(self) -> None:
        if len(self.patch_size) not in (2, 3) or len(self.source_size) != len(self.patch_size):
            raise ConfigError(f"sampler: patch_size {list(self.patch_size)} and source_size {list(self.source_size)} "
                              "must both have 2 or 3 entries")
        if any(p < 1 for p in self.patch_size) or any(s < p for s, p in zip(self.source_size, self.patch_size)):
            raise ConfigError(f"sampler: source_size {list(self.source_size)} must be >= patch_size "
                              f"{list(self.patch_size)} >= 1 on every axis")
        if self.batch_size < 1 or self.num_samples < 1 or self.batch_size % self.num_samples:
            raise ConfigError(f"sampler: batch_size {self.batch_size} must be a positive multiple of num_samples "
                              f"{self.num_samples} (each drawn case gives num_samples patches)")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"sampler: foreground_fraction {self.foreground_fraction} must be between 0 and 1")

    # ----- positions (host) ------------------------------------------------------------------------------------
    def _bounds(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """Per axis the inclusive range of crop starts that keeps the final patch inside the case."""
        bounds = []
        for extent, crop, final in zip(shape, self._crop, self._final):
            need = max(crop - final, crop - extent)
            low = -(need // 2)
            bounds.append((low, extent + need // 2 + need % 2 - crop))
        return bounds

    def _classes(self, case: int) -> list[tuple[int, list[np.ndarray]]]:
        """(class id, coordinate arrays) for each foreground class present in the case."""
        locations = self.cache.foreground(case)
        if self.regions is None:
            return [(value, [coords]) for value, coords in sorted(locations.items())
                    if value > 0 and value != self.ignore_label and len(coords)]
        present = []
        for index, region in enumerate(self.regions):
            arrays = [locations[v] for v in region if v in locations and len(locations[v])]
            if arrays:
                present.append((index, arrays))
        return present

    def _position(self, case: int, forced: bool) -> tuple[tuple[int, ...], int | None]:
        bounds = self._bounds(self.cache.shape(case))
        classes = self._classes(case) if forced else []
        if not classes:  # random patch (also for a forced patch of a case without foreground, like nnU-Net)
            return tuple(int(self.rng.integers(low, high + 1)) for low, high in bounds), None
        label, arrays = classes[int(self.rng.integers(len(classes)))]
        counts = np.cumsum([len(a) for a in arrays])
        pick = int(self.rng.integers(counts[-1]))
        member = int(np.searchsorted(counts, pick, side="right"))
        voxel = arrays[member][pick - (counts[member - 1] if member else 0)]
        start = tuple(int(np.clip(int(v) - crop // 2, low, high))
                      for v, crop, (low, high) in zip(voxel, self._crop, bounds))
        return start, label

    def draw(self) -> list[Draw]:
        """Choose the cases and crop positions of one batch (host only)."""
        self._credit += self.batch_size * self.foreground_fraction
        num_forced = int(np.floor(self._credit + 1e-9))
        self._credit -= num_forced
        draws = []
        for _ in range(self.batch_size // self.num_samples):
            case = int(self.rng.integers(len(self.cache)))
            for _ in range(self.num_samples):
                forced = len(draws) >= self.batch_size - num_forced
                start, label = self._position(case, forced)
                draws.append(Draw(case, start, forced, label))
        return draws

    # ----- crops (device) ----------------------------------------------------------------------------------
    def sample(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: image (B, C, *S) float32 and seg (B, 1, *S) int8 on `device` (S = source_size).

        Args:
            rows: cut only these samples of the drawn batch (a data-parallel rank's share); the whole batch is
                still drawn, so every rank's generator stays in step.
        """
        draws = self.draw()
        self.last_draws = draws
        if rows is not None:
            draws = draws[rows]
        shape = (len(draws), self.cache.num_channels, *self._crop)
        seg_shape = (len(draws), 1, *self._crop)
        if self.cache.on_device:
            image = torch.zeros(shape, dtype=torch.float32, device=self.device)
            seg = torch.full(seg_shape, self.seg_fill, dtype=torch.int8, device=self.device)
            self._fill(draws, image, seg)
        else:
            # crop on the host into (pinned) staging, then one asynchronous copy per tensor and a cast on device
            pinned = torch.cuda.is_available() and self.device.type == "cuda"
            dtype = _TORCH_DTYPES.get(np.dtype(self.cache.image_dtype), torch.float32)
            staging = torch.zeros(shape, dtype=dtype, pin_memory=pinned)
            seg_staging = torch.full(seg_shape, self.seg_fill, dtype=torch.int8, pin_memory=pinned)
            self._fill(draws, staging, seg_staging)
            image = staging.to(self.device, non_blocking=pinned).to(torch.float32)
            seg = seg_staging.to(self.device, non_blocking=pinned)
        if len(self.patch_size) == 2:
            image, seg = image.squeeze(2 + self.slice_axis), seg.squeeze(2 + self.slice_axis)
        return image, seg

    def _fill(self, draws: list[Draw], image: torch.Tensor, seg: torch.Tensor) -> None:
        for index, draw in enumerate(draws):  # B slice copies; no host-device sync
            self.cache.read_patch(draw.case, draw.start, image[index], seg[index])

    def __iter__(self) -> "PatchSampler":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample()

    # ----- resumable state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "credit": self._credit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._credit = float(state["credit"])
