"""Batched intensity transforms (image only) with nnU-Net's default recipe.

Each function takes a (B, C, *S) float image and returns a new one. Per-sample (and where nnU-Net does so,
per-channel) decisions are masks; samples/channels that are not selected come back bit-identical. Statistics
(mean, min, max, std) are per sample and channel, computed on the device.
"""
from __future__ import annotations

import math

import torch

from voxseg.augment.draws import broadcast_mask, random_mask, random_uniform


def _spatial_dims(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, image.ndim))


def _split_uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """nnU-Net's way of drawing a factor around 1: half the draws below 1, half above (when the range spans 1).

    A plain uniform over (0.7, 1.5) would brighten/expand far more often than it darkens/compresses.
    """
    if high <= 1.0 or low >= 1.0:
        return random_uniform(low, high, shape, generator, device)
    below = random_uniform(low, 1.0, shape, generator, device)
    above = random_uniform(1.0, high, shape, generator, device)
    return torch.where(random_mask(0.5, shape, generator, device), below, above)


def gaussian_noise(
    image: torch.Tensor, p: float, variance_range: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Add N(0, var) noise, var ~ U(variance_range) per sample, with probability p per sample."""
    batch, device = image.shape[0], image.device
    selected = random_mask(p, (batch,), generator, device)
    std = torch.sqrt(random_uniform(*variance_range, (batch,), generator, device)) * selected
    noise = torch.randn(image.shape, generator=generator, device=device, dtype=image.dtype)
    return image + noise * broadcast_mask(std, image.ndim).to(image.dtype)


def _blur_operator(size: int, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-(sample, channel) banded matrix of a 1D Gaussian with replicated borders: sigma (B, C) -> (B, C, n, n).

    As a matrix the blur shares `_apply_along_axis` with the low-resolution transform: one batched matmul per
    axis whatever the sigmas are (a depthwise convolution with a different kernel per channel is slower on
    both CPU and GPU).
    """
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma[..., None]) ** 2)
    kernel = kernel / kernel.sum(dim=-1, keepdim=True)  # (B, C, K)
    fine = torch.arange(size, device=sigma.device)
    columns = torch.clamp(fine[:, None] + offsets.long()[None, :], 0, size - 1)  # (n, K): replicate borders
    operator = torch.zeros(*sigma.shape, size, size, device=sigma.device)
    weights = kernel[..., None, :].expand(*sigma.shape, size, kernel.shape[-1])
    operator.scatter_add_(-1, columns.expand(*sigma.shape, size, kernel.shape[-1]), weights)
    return operator


def gaussian_blur(
    image: torch.Tensor, p: float, sigma_range: tuple[float, float], per_channel_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Blur selected samples' channels (each with probability per_channel_p) with sigma ~ U(sigma_range).

    Separable, same sigma on every axis, borders replicated, kernel radius ceil(3 * max sigma).
    """
    batch, channels, device = image.shape[0], image.shape[1], image.device
    selected = random_mask(p, (batch, 1), generator, device) & random_mask(per_channel_p, (batch, channels), generator, device)
    sigma = random_uniform(*sigma_range, (batch, channels), generator, device)
    radius = max(1, math.ceil(3.0 * sigma_range[1]))
    out = image
    for axis, size in enumerate(image.shape[2:]):
        out = _apply_along_axis(out, _blur_operator(size, sigma, radius), axis)
    return torch.where(broadcast_mask(selected, image.ndim), out, image)


def brightness(
    image: torch.Tensor, p: float, factor_range: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Multiply each channel of selected samples by its own factor ~ U(factor_range)."""
    batch, channels, device = image.shape[0], image.shape[1], image.device
    selected = random_mask(p, (batch, 1), generator, device)
    factor = random_uniform(*factor_range, (batch, channels), generator, device)
    factor = torch.where(selected, factor, torch.ones_like(factor))
    return image * broadcast_mask(factor, image.ndim).to(image.dtype)


def contrast(
    image: torch.Tensor, p: float, factor_range: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Scale each channel's deviation from its mean, then clip to the channel's original [min, max]."""
    batch, channels, device = image.shape[0], image.shape[1], image.device
    selected = random_mask(p, (batch, 1), generator, device)
    factor = broadcast_mask(_split_uniform(*factor_range, (batch, channels), generator, device), image.ndim)
    dims = _spatial_dims(image)
    mean = image.mean(dim=dims, keepdim=True)
    low, high = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
    changed = torch.clamp((image - mean) * factor.to(image.dtype) + mean, low, high)
    return torch.where(broadcast_mask(selected, image.ndim), changed, image)


def _low_res_operator(size: int, zoom: torch.Tensor) -> torch.Tensor:
    """Per-(sample, channel) matrix of "nearest downsample by `zoom`, then linear upsample" along one axis.

    zoom (B, C) -> (B, C, size, size). Built from index arithmetic, so a different coarse size per sample costs
    nothing extra. The indexing reproduces F.interpolate: nearest reads fine voxel floor(j * n / m), linear
    (align_corners=False) reads coarse coordinate (i + 0.5) * m / n - 0.5, clamped at 0.
    """
    coarse = torch.clamp(torch.round(zoom * size), min=1.0)[..., None]  # (B, C, 1)
    fine = torch.arange(size, device=zoom.device, dtype=torch.float32)
    position = torch.clamp((fine + 0.5) * coarse / size - 0.5, min=0.0)  # (B, C, n)
    lower = torch.minimum(torch.floor(position), coarse - 1)
    weight_upper = torch.clamp(position - lower, 0.0, 1.0)
    upper = torch.minimum(lower + 1, coarse - 1)
    source_lower = torch.clamp(torch.floor(lower * size / coarse), max=size - 1).long()
    source_upper = torch.clamp(torch.floor(upper * size / coarse), max=size - 1).long()
    operator = torch.zeros(*zoom.shape, size, size, device=zoom.device)
    operator.scatter_add_(-1, source_lower[..., None], (1.0 - weight_upper)[..., None])
    operator.scatter_add_(-1, source_upper[..., None], weight_upper[..., None])
    return operator


def _apply_along_axis(image: torch.Tensor, operator: torch.Tensor, axis: int) -> torch.Tensor:
    """y[..., i, ...] = sum_j operator[b, c, i, j] x[..., j, ...] along spatial `axis`, as one batched matmul.

    The image is viewed as (B*C, before, n, after): the first and last axes need no copy of the image.
    """
    batch, channels, spatial = image.shape[0], image.shape[1], image.shape[2:]
    n = spatial[axis]
    before, after = math.prod(spatial[:axis]), math.prod(spatial[axis + 1:])
    matrix = operator.reshape(batch * channels, n, n).to(image.dtype)
    x = image.reshape(batch * channels, before, n, after)
    if before == 1:
        y = torch.bmm(matrix, x[:, 0])  # (BC, n, after)
    elif after == 1:
        y = torch.bmm(x[..., 0], matrix.transpose(1, 2))  # (BC, before, n)
    else:
        y = torch.matmul(matrix[:, None], x)  # (BC, before, n, after)
    return y.reshape(image.shape)


def simulate_low_resolution(
    image: torch.Tensor, p: float, zoom_range: tuple[float, float], per_channel_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Downsample (nearest) by zoom ~ U(zoom_range), same for all axes, and upsample back (linear).

    Per selected sample each channel is degraded with probability per_channel_p and its own zoom.
    """
    batch, channels, device = image.shape[0], image.shape[1], image.device
    selected = random_mask(p, (batch, 1), generator, device) & random_mask(per_channel_p, (batch, channels), generator, device)
    zoom = random_uniform(*zoom_range, (batch, channels), generator, device)
    out = image
    for axis, size in enumerate(image.shape[2:]):
        out = _apply_along_axis(out, _low_res_operator(size, zoom), axis)
    return torch.where(broadcast_mask(selected, image.ndim), out, image)


def gamma(
    image: torch.Tensor, p: float, gamma_range: tuple[float, float], invert: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Gamma on each channel rescaled to [0, 1], then mean and std restored (nnU-Net's retain_stats).

    `invert` applies it to the negated image (brightens dark regions instead of bright ones).
    """
    batch, channels, device = image.shape[0], image.shape[1], image.device
    selected = random_mask(p, (batch, 1), generator, device)
    exponent = broadcast_mask(_split_uniform(*gamma_range, (batch, channels), generator, device), image.ndim)
    x = -image if invert else image
    dims = _spatial_dims(image)
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True, correction=0)
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    span = high - low
    y = torch.clamp((x - low) / (span + 1e-7), 0.0, 1.0) ** exponent.to(image.dtype) * span + low
    y_mean, y_std = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True, correction=0)
    y = (y - y_mean) / (y_std + 1e-8) * std + mean
    y = -y if invert else y
    return torch.where(broadcast_mask(selected, image.ndim), y, image)
