"""`augment_batch`: the augmentation recipe (`AugmentConfig`, voxseg.augment.config) applied to a batch on its device.

Defaults follow nnU-Net's default training recipe; every probability is per sample. Order: grid transform
(rotation x scaling x mirroring [+ elastic]) -> 90-degree turns -> noise -> blur -> brightness -> contrast
-> simulated low resolution -> inverted gamma -> gamma.

Two steps: `draw_params` draws every decision on the host (numpy Generator, no device work), then
`apply_augment` launches each transform only for the samples (or sample channels) it fires for: the rows are
gathered (a view when they are contiguous), transformed and written back. For data parallelism every rank
draws the same parameters for the global batch and applies its slice: `augment_batch(...,
rows=BatchRows(first_sample=rank * B, global_batch=G))`.

Cost on one CPU thread (2 x 4 channels x 128^3 from 192^3 crops, BENCHMARKS.md): the rotated samples are most
of it (the 3D grid_sample of their 4 channels), then the scaled-only samples, then the intensity transforms
(each ~10-30 ms per 128^3 channel it fires for).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from voxseg.augment import intensity
from voxseg.augment.config import AugmentConfig
from voxseg.augment.draws import AugmentParams, draw_params, host_to_device
from voxseg.augment.spatial import centre_crop, rotate90, source_size, spatial_transform
from voxseg.errors import ConfigError, InputError

__all__ = ["AugmentConfig", "BatchRows", "apply_augment", "augment_batch", "draw_batch_params", "source_size"]


@dataclass(frozen=True)
class BatchRows:
    """The samples one call augments out of a larger global batch (a data-parallel rank's rows): the decisions
    are drawn for all `global_batch` samples, so every rank's generator stays in step, and those of samples
    `first_sample` .. `first_sample` + B - 1 are applied."""

    first_sample: int
    global_batch: int


def _check_inputs(image: torch.Tensor, seg: torch.Tensor, patch_size: Sequence[int]) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    ndim = len(patch)
    if ndim not in (2, 3) or image.ndim != ndim + 2:
        raise InputError(f"augment_batch: image {tuple(image.shape)} must be (B, C, *S) with {ndim} spatial axes "
                         f"like patch_size {list(patch)}")
    if seg.shape[0] != image.shape[0] or seg.shape[1] != 1 or seg.shape[2:] != image.shape[2:]:
        raise InputError(f"augment_batch: seg {tuple(seg.shape)} must be (B, 1, *S) matching image "
                         f"{tuple(image.shape)}")
    if any(s < p for s, p in zip(image.shape[2:], patch)):
        raise InputError(f"augment_batch: source size {tuple(image.shape[2:])} is smaller than patch_size "
                         f"{list(patch)}; crop it with PatchSampler(source_size=source_size(patch_size, config))")
    if not image.is_floating_point():
        raise InputError(f"augment_batch: image must be a floating-point tensor, got {image.dtype}")
    return patch


def _axes(axes: tuple[int, ...] | None, ndim: int, name: str) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    if any(a >= ndim for a in axes):
        raise ConfigError(f"augment.{name}={list(axes)}: a {ndim}D patch has spatial axes 0..{ndim - 1}")
    return axes


def draw_batch_params(batch: int, channels: int, patch_size: Sequence[int], config: AugmentConfig,
                      generator: np.random.Generator | None) -> AugmentParams:
    """Every random decision of `config` for a (global) batch, drawn on the host from `generator`.

    Raises:
        InputError: the generator is not a numpy Generator.
    """
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise InputError(f"augment_batch: the generator must be a numpy Generator (np.random.default_rng(seed)), "
                         f"got {type(generator).__name__}: decisions are drawn on the host")
    rng = generator if generator is not None else np.random.default_rng()
    ndim = len(patch_size)
    return draw_params(batch, channels, patch_size, config, rng, _axes(config.mirror_axes, ndim, "mirror_axes"),
                       _axes(config.rot90_axes, ndim, "rot90_axes"))


@torch.no_grad()
def augment_batch(
    image: torch.Tensor,
    seg: torch.Tensor,
    config: AugmentConfig,
    generator: np.random.Generator | None,
    patch_size: Sequence[int],
    *,
    seg_fill: int = -1,
    rows: BatchRows | None = None,
    extra_channels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of crops and cut them to the patch size, on the batch's device.

    Args:
        image: (B, C, *S) float crops, S = `source_size(patch_size, config)` (any S >= patch works).
        seg: (B, 1, *S) integer label map (any integer dtype; kept).
        config: the recipe.
        generator: numpy Generator the decisions are drawn from (None = a fresh, unseeded one).
        patch_size: P, 2 or 3 entries.
        seg_fill: label written where a transform samples outside the crop (-1 = "outside", as in the store).
        rows: the batch is these rows of a larger global batch (a data-parallel rank's slice): the decisions are
            drawn for the global batch and those of its rows applied; None: the batch is the whole batch.
        extra_channels: the last channels of `image` are a cascade stage's one-hot first-stage segmentation:
            they are transformed spatially with the image and set back to 0/1 (>= 0.5) afterwards, like the
            labels, and get no intensity augmentation (nnU-Net transforms them as segmentation).

    Returns:
        (image (B, C, *P), seg (B, 1, *P)), new tensors; labels only take values in `seg` or `seg_fill`.
    """
    patch = _check_inputs(image, seg, patch_size)
    if not config.enabled:
        return centre_crop(image, patch).contiguous(), centre_crop(seg, patch).contiguous()
    batch = image.shape[0]
    total = batch if rows is None else int(rows.global_batch)
    first_sample = 0 if rows is None else int(rows.first_sample)
    if not 0 <= first_sample <= total - batch:
        raise InputError(f"augment_batch: samples {first_sample}..{first_sample + batch - 1} are not inside a "
                         f"global batch of {total}")
    if not 0 <= extra_channels < image.shape[1]:
        raise InputError(f"augment_batch: extra_channels={extra_channels} must leave at least one image channel "
                         f"of {image.shape[1]}")
    params = draw_batch_params(total, image.shape[1] - extra_channels, patch, config, generator)
    return apply_augment(image, seg, params.subset(first_sample, first_sample + batch), config, patch, seg_fill,
                         extra_channels)


@torch.no_grad()
def apply_augment(image: torch.Tensor, seg: torch.Tensor, params: AugmentParams, config: AugmentConfig,
                  patch_size: Sequence[int], seg_fill: int = -1,
                  extra_channels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn `params` (one per sample of image (B, C, *S), seg (B, 1, *S)) -> (B, C, *P), (B, 1, *P);
    the last `extra_channels` channels are one-hot masks (see `augment_batch`)."""
    patch = tuple(int(p) for p in patch_size)
    image, seg = spatial_transform(image, seg, patch, params, config, seg_fill)  # new tensors: safe in place
    rotate90(image, seg, params, patch, _axes(config.rot90_axes, len(patch), "rot90_axes"))
    if not extra_channels:
        _intensity(image, params, config)
        return image, seg
    channels = image.shape[1] - extra_channels
    intensities = image[:, :channels].contiguous()
    _intensity(intensities, params, config)
    masks = (image[:, channels:] >= 0.5).to(image.dtype)
    return torch.cat([intensities, masks], dim=1), seg


def on_rows(rows: torch.Tensor, index: np.ndarray, transform: Callable[..., torch.Tensor],
            *values: np.ndarray) -> None:
    """In place: rows[index] = transform(rows[index], *values[index]) for rows (N, 1, *P), index sorted.

    A contiguous run of rows is a view (no copy); otherwise the rows are gathered and scattered back.
    """
    if index.size == 0:
        return
    values = tuple(v[index] for v in values)
    start, stop = int(index[0]), int(index[-1]) + 1
    if stop - start == index.size:
        view = rows[start:stop]
        out = transform(view, *values)
        if out.data_ptr() != view.data_ptr():
            view.copy_(out)
        return
    positions = host_to_device(index, rows.device, torch.long)
    rows.index_copy_(0, positions, transform(rows.index_select(0, positions), *values))


def _intensity(image: torch.Tensor, params: AugmentParams, config: AugmentConfig) -> None:
    """In place on image (B, C, *P): each intensity transform on the rows that drew it, in the recipe's order."""
    channels = image.shape[1]
    rows = image.view(image.shape[0] * channels, 1, *image.shape[2:])  # (B*C, 1, *P)

    def per_sample(fired: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.repeat(fired, channels))

    for b in np.flatnonzero(params.noise).tolist():
        intensity.gaussian_noise(image[b:b + 1], params.noise_std[b], params.noise_seed[b])
    radius = intensity.blur_radius(config.blur_sigma)
    on_rows(rows, np.flatnonzero(params.blur), lambda r, s: intensity.gaussian_blur(r, s, radius),
            params.blur_sigma.ravel())
    on_rows(rows, per_sample(params.brightness), intensity.brightness, params.brightness_factor.ravel())
    on_rows(rows, per_sample(params.contrast), intensity.contrast, params.contrast_factor.ravel())
    on_rows(rows, np.flatnonzero(params.low_res), intensity.simulate_low_resolution, params.low_res_zoom.ravel())
    on_rows(rows, per_sample(params.inverted_gamma), lambda r, e: intensity.gamma(r, e, True),
            params.inverted_gamma_exponent.ravel())
    on_rows(rows, per_sample(params.gamma), lambda r, e: intensity.gamma(r, e, False),
            params.gamma_exponent.ravel())
