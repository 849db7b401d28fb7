"""The augmentation recipe: `AugmentConfig`, one dataclass with nnU-Net's default training augmentation.

Every probability is per sample unless a field says otherwise; `augment_batch` (voxseg.augment.pipeline)
applies it. It lives apart from the transforms so that the training config can hold it and the transforms
can read it without importing each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from voxseg.errors import ConfigError

__all__ = ["AugmentConfig"]

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
