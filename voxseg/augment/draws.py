"""Every random decision and parameter of the augmentation, drawn on the host for a whole (global) batch.

`draw_params` reads only a numpy Generator, never a tensor, so drawing costs no device work and no sync, and
the pipeline knows on the host which samples each transform fires for (it launches work only for those).
The draws for a global batch are identical on every process that uses the same generator state; a rank takes
its samples with `AugmentParams.subset`. Image-sized randomness (Gaussian noise) is drawn on the device from a
per-sample seed, so it too depends only on the sample, not on the slice it travels in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from voxseg.augment.config import AugmentConfig

__all__ = ["AugmentParams", "draw_params", "elastic_control_shape", "host_to_device", "rot90_planes",
           "rotation_planes"]


def rotation_planes(ndim: int, config: AugmentConfig) -> list[tuple[int, int]]:
    """Planes (pairs of array axes) the random rotation acts in.

    3D: rotations about each axis, i.e. in the planes (1,2), (0,2), (0,1); with `rotation_coarse_axis_only`
    only about `coarse_axis` (in-plane rotation of an anisotropic patch). 2D: the single plane (0, 1).
    """
    if ndim == 2:
        return [(0, 1)]
    about = [config.coarse_axis] if config.rotation_coarse_axis_only else [0, 1, 2]
    return [tuple(a for a in range(3) if a != axis) for axis in about]  # type: ignore[misc]


def rot90_planes(patch_size: Sequence[int], axes: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs of the given axes with equal patch size (the only planes a 90-degree turn keeps the shape in)."""
    axes = sorted(axes)
    return [(a, b) for i, a in enumerate(axes) for b in axes[i + 1:] if patch_size[a] == patch_size[b]]


def elastic_control_shape(patch_size: Sequence[int], sigma: float) -> tuple[int, ...]:
    """The coarse control grid of the elastic deformation: one point every `sigma` voxels, at least 2 per axis."""
    return tuple(max(2, math.ceil(p / sigma) + 1) for p in patch_size)


def host_to_device(values: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A host array on `device` without a sync.

    `torch.tensor(values, device=cuda)` is a blocking copy, and a non_blocking copy from pageable memory may
    synchronise too (CUDA stages it). From pinned memory the copy is truly asynchronous; PyTorch's caching host
    allocator keeps the pinned block alive until the copy has run.
    """
    host = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@dataclass
class AugmentParams:
    """Per-sample draws; every array has the sample as its first axis (B, C = channels, D = spatial axes)."""

    flips: np.ndarray             # (B, D) bool: mirror this output axis
    rotate: np.ndarray            # (B,) bool
    angles: np.ndarray            # (B, planes) radians (drawn for every sample; used where rotate)
    scaled: np.ndarray            # (B,) bool
    scale: np.ndarray             # (B,)
    elastic: np.ndarray           # (B,) bool
    elastic_magnitude: np.ndarray  # (B,) voxels
    elastic_noise: np.ndarray     # (B, D, *control) in [-1, 1), or (B, 0) when elastic is off
    rot90: np.ndarray             # (B,) bool
    rot90_plane: np.ndarray       # (B,) index into rot90_planes
    rot90_turns: np.ndarray       # (B,) 1..3
    noise: np.ndarray             # (B,) bool
    noise_std: np.ndarray         # (B,)
    noise_seed: np.ndarray        # (B,) int64 seed of the sample's noise
    blur: np.ndarray              # (B, C) bool
    blur_sigma: np.ndarray        # (B, C)
    brightness: np.ndarray        # (B,) bool
    brightness_factor: np.ndarray  # (B, C)
    contrast: np.ndarray          # (B,) bool
    contrast_factor: np.ndarray   # (B, C)
    low_res: np.ndarray           # (B, C) bool
    low_res_zoom: np.ndarray      # (B, C)
    inverted_gamma: np.ndarray    # (B,) bool
    inverted_gamma_exponent: np.ndarray  # (B, C)
    gamma: np.ndarray             # (B,) bool
    gamma_exponent: np.ndarray    # (B, C)

    @property
    def batch_size(self) -> int:
        return int(self.flips.shape[0])

    @property
    def grid(self) -> np.ndarray:
        """(B,) bool: the sample needs a sampling grid (rotation, scaling or elastic deformation)."""
        return self.rotate | self.scaled | self.elastic

    def subset(self, start: int, stop: int) -> "AugmentParams":
        """The draws of samples start..stop-1 (a rank's slice of the global batch)."""
        return replace(self, **{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def _uniform(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
    return low + (high - low) * rng.random(shape)


def _split_uniform(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's way of drawing a factor around 1: half the draws below 1, half above (when the range spans 1).

    A plain uniform over (0.7, 1.5) would brighten/expand far more often than it darkens/compresses.
    """
    if high <= 1.0 or low >= 1.0:
        return _uniform(rng, low, high, shape)
    below, above = _uniform(rng, low, 1.0, shape), _uniform(rng, 1.0, high, shape)
    return np.where(rng.random(shape) < 0.5, below, above)


def _mask(rng: np.random.Generator, p: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape) < p


def draw_params(batch: int, channels: int, patch_size: Sequence[int], config: AugmentConfig,
                rng: np.random.Generator, mirror_axes: Sequence[int], rot90_axes: Sequence[int]) -> AugmentParams:
    """Draw every decision of `config` for `batch` samples of `channels` channels (probabilities per sample).

    A transform with p == 0 draws nothing and never fires.
    """
    ndim, b, bc = len(patch_size), (batch,), (batch, channels)
    flips = np.zeros((batch, ndim), dtype=bool)
    if config.mirror_p > 0 and mirror_axes:
        flips[:, list(mirror_axes)] = _mask(rng, config.mirror_p, (batch, len(mirror_axes)))
    limit = math.radians(config.rotation_degrees)
    planes = rotation_planes(ndim, config)
    control = elastic_control_shape(patch_size, config.elastic_sigma)
    turn_planes = rot90_planes(patch_size, rot90_axes)
    off = np.zeros(b, dtype=bool)

    def fires(p: float, shape: tuple[int, ...] = b) -> np.ndarray:
        return _mask(rng, p, shape) if p > 0 else np.zeros(shape, dtype=bool)

    return AugmentParams(
        flips=flips,
        rotate=fires(config.rotation_p), angles=_uniform(rng, -limit, limit, (batch, len(planes))),
        scaled=fires(config.scale_p), scale=_uniform(rng, *config.scale_range, b),
        elastic=fires(config.elastic_p), elastic_magnitude=_uniform(rng, *config.elastic_alpha, b),
        elastic_noise=(_uniform(rng, -1.0, 1.0, (batch, ndim, *control)).astype(np.float32)
                       if config.elastic_p > 0 else np.zeros((batch, 0), np.float32)),
        rot90=fires(config.rot90_p) if turn_planes else off,
        rot90_plane=rng.integers(0, max(1, len(turn_planes)), b), rot90_turns=rng.integers(1, 4, b),
        noise=fires(config.noise_p), noise_std=np.sqrt(_uniform(rng, *config.noise_variance, b)),
        noise_seed=rng.integers(0, 2 ** 62, b, dtype=np.int64),
        blur=fires(config.blur_p)[:, None] & fires(config.blur_per_channel_p if config.blur_p > 0 else 0.0, bc),
        blur_sigma=_uniform(rng, *config.blur_sigma, bc),
        brightness=fires(config.brightness_p), brightness_factor=_uniform(rng, *config.brightness_range, bc),
        contrast=fires(config.contrast_p), contrast_factor=_split_uniform(rng, *config.contrast_range, bc),
        low_res=fires(config.low_res_p)[:, None] & fires(config.low_res_per_channel_p if config.low_res_p > 0
                                                          else 0.0, bc),
        low_res_zoom=_uniform(rng, *config.low_res_zoom, bc),
        inverted_gamma=fires(config.inverted_gamma_p),
        inverted_gamma_exponent=_split_uniform(rng, *config.gamma_range, bc),
        gamma=fires(config.gamma_p), gamma_exponent=_split_uniform(rng, *config.gamma_range, bc),
    )
