"""The augmentation recipe (`AugmentConfig`) and `augment_batch`, which applies it to a batch on its device.

Defaults follow nnU-Net's default training recipe; every probability is per sample. Order: grid transform
(rotation x scaling x mirroring [+ elastic]) -> 90-degree turns -> noise -> blur -> brightness -> contrast
-> simulated low resolution -> inverted gamma -> gamma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from voxseg.augment import intensity
from voxseg.augment.spatial import (
    centre_crop,
    draw_flips,
    rot90_planes,
    rotate90,
    source_size,
    spatial_transform,
)
from voxseg.errors import ConfigError, InputError

__all__ = ["AugmentConfig", "augment_batch", "source_size"]

_RANGES = (
    "scale_range", "elastic_alpha", "noise_variance", "blur_sigma", "brightness_range", "contrast_range",
    "low_res_zoom", "gamma_range",
)
_AXES = ("mirror_axes", "rot90_axes")


@dataclass
class AugmentConfig:
    """Training-time data augmentation. Probabilities are per sample unless a field says otherwise."""

    enabled: bool = True
    """Master switch; False returns the centre crop of every sample unchanged."""

    rotation_p: float = 0.2
    """Probability of a random rotation."""
    rotation_degrees: float = 30.0
    """Angles are drawn uniformly from [-rotation_degrees, +rotation_degrees], independently per axis (3D)."""
    rotation_coarse_axis_only: bool = False
    """Rotate only about `coarse_axis` (in-plane) — for anisotropic patches, like nnU-Net's dummy-2D aug."""
    coarse_axis: int = 0
    """The coarse (low-resolution) array axis used by `rotation_coarse_axis_only`."""

    scale_p: float = 0.2
    """Probability of a random isotropic scaling."""
    scale_range: tuple[float, float] = (0.7, 1.4)
    """Factor multiplying the sampling coordinates: >1 samples a larger region (structures look smaller)."""

    elastic_p: float = 0.0
    """Probability of an elastic deformation (off by default, as in nnU-Net)."""
    elastic_alpha: tuple[float, float] = (0.0, 5.0)
    """Range of the per-sample maximum displacement, in voxels."""
    elastic_sigma: float = 8.0
    """Spacing of the random control grid in voxels (larger = smoother deformation)."""

    max_source_factor: float = 1.5
    """Cap on the sampled crop size relative to the patch (see `source_size`); corners beyond it are padding."""

    mirror_p: float = 0.5
    """Probability of flipping each mirror axis (independently per axis and sample)."""
    mirror_axes: tuple[int, ...] | None = None
    """Spatial axes to mirror (0 = first spatial axis); None = all axes of the patch."""

    rot90_p: float = 0.0
    """Probability of 1-3 quarter turns in a random plane of equal-sized `rot90_axes` (off by default)."""
    rot90_axes: tuple[int, ...] | None = None
    """Axes whose equal-size pairs may be turned; None = all axes of the patch."""

    noise_p: float = 0.1
    """Probability of additive Gaussian noise."""
    noise_variance: tuple[float, float] = (0.0, 0.1)
    """Range of the noise variance (images are normalised, so this is relative to unit variance)."""

    blur_p: float = 0.2
    """Probability of Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    """Range of the blur sigma in voxels."""
    blur_per_channel_p: float = 0.5
    """Probability that a channel of a selected sample is blurred."""

    brightness_p: float = 0.15
    """Probability of multiplicative brightness (one factor per channel)."""
    brightness_range: tuple[float, float] = (0.75, 1.25)
    """Range of the brightness factor."""

    contrast_p: float = 0.15
    """Probability of a contrast change (range preserved: clipped to the channel's original min/max)."""
    contrast_range: tuple[float, float] = (0.75, 1.25)
    """Range of the contrast factor (half the draws below 1, half above)."""

    low_res_p: float = 0.25
    """Probability of simulated low resolution."""
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    """Range of the downsampling factor (nearest down, linear up)."""
    low_res_per_channel_p: float = 0.5
    """Probability that a channel of a selected sample is degraded."""

    gamma_p: float = 0.3
    """Probability of a gamma transform (statistics retained)."""
    gamma_range: tuple[float, float] = (0.7, 1.5)
    """Range of gamma (half the draws below 1, half above)."""
    inverted_gamma_p: float = 0.1
    """Probability of a gamma transform applied to the inverted image."""

    def __post_init__(self) -> None:
        for name in _RANGES:
            self._check_range(name)
        for name in _AXES:
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                if any(not isinstance(a, int) or a < 0 or a > 2 for a in value) or len(set(value)) != len(value):
                    raise ConfigError(f"augment.{name}={list(value)}: use distinct spatial axes among 0, 1, 2")
                setattr(self, name, value)
        for f in fields(self):
            if f.name.endswith("_p"):
                value = getattr(self, f.name)
                if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise ConfigError(f"augment.{f.name}={value!r}: a probability must be between 0 and 1")
        checks = [
            ("rotation_degrees", 0.0 <= self.rotation_degrees <= 180.0, "must be between 0 and 180"),
            ("coarse_axis", self.coarse_axis in (0, 1, 2), "must be 0, 1 or 2"),
            ("scale_range", self.scale_range[0] > 0, "must be positive"),
            ("elastic_alpha", self.elastic_alpha[0] >= 0, "must be >= 0 (voxels)"),
            ("elastic_sigma", self.elastic_sigma > 0, "must be positive (voxels)"),
            ("max_source_factor", self.max_source_factor >= 1.0, "must be >= 1"),
            ("noise_variance", self.noise_variance[0] >= 0, "must be >= 0"),
            ("blur_sigma", self.blur_sigma[0] > 0, "must be positive"),
            ("brightness_range", self.brightness_range[0] > 0, "must be positive"),
            ("contrast_range", self.contrast_range[0] > 0, "must be positive"),
            ("low_res_zoom", 0 < self.low_res_zoom[0] and self.low_res_zoom[1] <= 1, "must lie in (0, 1]"),
            ("gamma_range", self.gamma_range[0] > 0, "must be positive"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(f"augment.{name}={getattr(self, name)!r}: {message}")

    def _check_range(self, name: str) -> None:
        value = getattr(self, name)
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"augment.{name}={value!r}: give a [low, high] pair of numbers") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ConfigError(f"augment.{name}={[low, high]}: need finite low <= high")
        setattr(self, name, (low, high))


def _check_inputs(image: torch.Tensor, seg: torch.Tensor, patch_size: Sequence[int]) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    ndim = len(patch)
    if ndim not in (2, 3) or image.ndim != ndim + 2:
        raise InputError(f"augment_batch: image {tuple(image.shape)} must be (B, C, *S) with {ndim} spatial axes "
                         f"like patch_size {list(patch)}")
    if seg.shape[0] != image.shape[0] or seg.shape[1] != 1 or seg.shape[2:] != image.shape[2:]:
        raise InputError(f"augment_batch: seg {tuple(seg.shape)} must be (B, 1, *S) matching image {tuple(image.shape)}")
    if any(s < p for s, p in zip(image.shape[2:], patch)):
        raise InputError(f"augment_batch: source size {tuple(image.shape[2:])} is smaller than patch_size {list(patch)}; "
                         "crop it with PatchSampler(source_size=source_size(patch_size, config))")
    if not image.is_floating_point():
        raise InputError(f"augment_batch: image must be a floating-point tensor, got {image.dtype}")
    return patch


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    gen = torch.device(generator.device)
    if gen.type != device.type or (device.type == "cuda" and gen.index not in (None, device.index)):
        raise InputError(f"augment_batch: the generator is on {gen} but the batch is on {device}; create it with "
                         f"torch.Generator(device=batch.device)")


def _axes(axes: tuple[int, ...] | None, ndim: int, name: str) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    if any(a >= ndim for a in axes):
        raise ConfigError(f"augment.{name}={list(axes)}: a {ndim}D patch has spatial axes 0..{ndim - 1}")
    return axes


@torch.no_grad()
def augment_batch(
    image: torch.Tensor,
    seg: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None,
    patch_size: Sequence[int],
    *,
    seg_fill: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of crops and cut them to the patch size, entirely on the batch's device.

    Args:
        image: (B, C, *S) float crops, S = `source_size(patch_size, config)` (any S >= patch works).
        seg: (B, 1, *S) integer label map (any integer dtype; kept).
        config: the recipe.
        generator: torch.Generator on the batch's device (None = torch's default generator).
        patch_size: P, 2 or 3 entries.
        seg_fill: label written where a transform samples outside the crop (-1 = "outside", as in the store).

    Returns:
        (image (B, C, *P), seg (B, 1, *P)); labels only take values present in `seg` or `seg_fill`.
    """
    patch = _check_inputs(image, seg, patch_size)
    if not config.enabled:
        return centre_crop(image, patch).contiguous(), centre_crop(seg, patch).contiguous()
    _check_generator(generator, image.device)
    ndim = len(patch)
    flips = draw_flips(image.shape[0], ndim, _axes(config.mirror_axes, ndim, "mirror_axes"), config.mirror_p,
                       generator, image.device)
    image, seg = spatial_transform(image, seg, patch, config, generator, seg_fill, flips)
    image, seg = rotate90(image, seg, rot90_planes(patch, _axes(config.rot90_axes, ndim, "rot90_axes")),
                          config.rot90_p, generator)
    image = _intensity(image, config, generator)
    return image.contiguous(), seg.contiguous()


def _intensity(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    # a transform with p == 0 is skipped on the host (a config value, not a tensor value: no sync)
    if config.noise_p > 0:
        image = intensity.gaussian_noise(image, config.noise_p, config.noise_variance, generator)
    if config.blur_p > 0:
        image = intensity.gaussian_blur(image, config.blur_p, config.blur_sigma, config.blur_per_channel_p, generator)
    if config.brightness_p > 0:
        image = intensity.brightness(image, config.brightness_p, config.brightness_range, generator)
    if config.contrast_p > 0:
        image = intensity.contrast(image, config.contrast_p, config.contrast_range, generator)
    if config.low_res_p > 0:
        image = intensity.simulate_low_resolution(image, config.low_res_p, config.low_res_zoom,
                                                  config.low_res_per_channel_p, generator)
    if config.inverted_gamma_p > 0:
        image = intensity.gamma(image, config.inverted_gamma_p, config.gamma_range, True, generator)
    if config.gamma_p > 0:
        image = intensity.gamma(image, config.gamma_p, config.gamma_range, False, generator)
    return image
