"""`augment_batch`: the augmentation recipe (`AugmentConfig`, voxseg.augment.config) applied to a batch on its device.

Defaults follow nnU-Net's default training recipe; every probability is per sample. Order: grid transform
(rotation x scaling x mirroring [+ elastic]) -> 90-degree turns -> noise -> blur -> brightness -> contrast
-> simulated low resolution -> inverted gamma -> gamma.
"""
from __future__ import annotations

from typing import Sequence

import torch

from voxseg.augment import intensity
from voxseg.augment.config import AugmentConfig
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
