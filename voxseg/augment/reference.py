"""The simple path the fast pipeline replaces: every transform computed for every sample, `torch.where` keeps it
where it fired. Same draws (`AugmentParams`), same results as `apply_augment`; kept for the tests (a fast
path is checked against the simple one) and as the "compute everything" column of benchmarks/augment_bench.py.
Its warp is one plain grid_sample call per batch for image and labels, so the tests also hold the fast path's
tiled image sampling and gathered labels to it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from voxseg.augment import intensity
from voxseg.augment.config import AugmentConfig
from voxseg.augment.draws import AugmentParams, host_to_device
from voxseg.augment.spatial import centre_crop, mirror_dims, rotate90, sampling_grid

__all__ = ["augment_reference"]


def _where(fired: np.ndarray, changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Keep `changed` where fired (B,) or (B, C) is True, `original` elsewhere."""
    mask = host_to_device(fired, original.device, torch.bool)
    return torch.where(mask.view(*mask.shape, *([1] * (original.ndim - mask.ndim))), changed, original)


def _all_rows(image: torch.Tensor, fired: np.ndarray, transform: Callable[..., torch.Tensor],
              values: np.ndarray) -> torch.Tensor:
    """transform on every (sample, channel) row with its value (B, C); the result kept where fired (B,) / (B, C)."""
    batch, channels = image.shape[:2]
    rows = image.reshape(batch * channels, 1, *image.shape[2:]).clone()
    changed = transform(rows, values.ravel()).reshape(image.shape)
    return _where(fired, changed, image)


def _warp(image: torch.Tensor, seg: torch.Tensor, grid: torch.Tensor, seg_fill: int) -> tuple[torch.Tensor, ...]:
    """One whole-batch grid_sample each for image (linear, zeros outside) and labels (nearest, `seg_fill` outside)."""
    warped = F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(seg.to(torch.float32) - seg_fill, grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return warped, (labels + seg_fill).round().to(seg.dtype)


@torch.no_grad()
def augment_reference(image: torch.Tensor, seg: torch.Tensor, params: AugmentParams, config: AugmentConfig,
                      patch_size: Sequence[int], seg_fill: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, *S), seg (B, 1, *S) -> (B, C, *P), (B, 1, *P), computing every transform for every sample."""
    patch = tuple(patch_size)
    crop_image = torch.stack([centre_crop(image, patch)[b].flip([d - 1 for d in mirror_dims(params.flips[b])])
                              for b in range(image.shape[0])])
    crop_seg = torch.stack([centre_crop(seg, patch)[b].flip([d - 1 for d in mirror_dims(params.flips[b])])
                            for b in range(seg.shape[0])])
    grid = sampling_grid(params, config, image.shape[2:], patch, image.device)  # (B, *P, D)
    warped, labels = _warp(image, seg, grid, seg_fill)
    out_image = _where(params.grid, warped, crop_image).contiguous()
    out_seg = _where(params.grid, labels, crop_seg).contiguous()
    axes = config.rot90_axes if config.rot90_axes is not None else tuple(range(len(patch)))
    rotate90(out_image, out_seg, params, patch, axes)

    noisy = out_image.clone()
    for b in range(noisy.shape[0]):
        intensity.gaussian_noise(noisy[b:b + 1], params.noise_std[b], params.noise_seed[b])
    out = _where(params.noise, noisy, out_image)
    radius = intensity.blur_radius(config.blur_sigma)
    out = _all_rows(out, params.blur, lambda r, s: intensity.gaussian_blur(r, s, radius), params.blur_sigma)
    out = _all_rows(out, params.brightness, intensity.brightness, params.brightness_factor)
    out = _all_rows(out, params.contrast, intensity.contrast, params.contrast_factor)
    out = _all_rows(out, params.low_res, intensity.simulate_low_resolution, params.low_res_zoom)
    out = _all_rows(out, params.inverted_gamma, lambda r, e: intensity.gamma(r, e, True),
                    params.inverted_gamma_exponent)
    out = _all_rows(out, params.gamma, lambda r, e: intensity.gamma(r, e, False), params.gamma_exponent)
    return out, out_seg
