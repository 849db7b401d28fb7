"""Intensity transforms (image only) with nnU-Net's default recipe, applied to the rows that drew them.

Each transform takes `rows` (N, 1, *S): the (sample, channel) images it fires for, gathered by the pipeline,
and one host parameter per row; it returns the transformed rows (in place where that is safe). Statistics
(mean, min, max, std) are per row, i.e. per sample and channel, computed on the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from voxseg.augment.draws import host_to_device


def _spatial_dims(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, image.ndim))


def _per_row(values: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    """Host values (N,) as a device tensor (N, 1, 1, ...) that broadcasts against rows (N, 1, *S)."""
    return host_to_device(values, rows.device, rows.dtype).view(-1, *([1] * (rows.ndim - 1)))


def gaussian_noise(sample: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """In place: add N(0, std^2) noise to one sample (1, C, *S), drawn on its device from its own seed."""
    generator = torch.Generator(device=sample.device).manual_seed(int(seed))
    noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    return sample.add_(noise, alpha=float(std))


def _blur_operator(size: int, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-row banded matrix of a 1D Gaussian with replicated borders: sigma (N, 1) -> (N, 1, n, n).

    As a matrix the blur shares `_apply_along_axis` with the low-resolution transform: one batched matmul per
    axis whatever the sigmas are (a depthwise convolution with a different kernel per channel is slower on
    both CPU and GPU).
    """
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma[..., None]) ** 2)
    kernel = kernel / kernel.sum(dim=-1, keepdim=True)  # (N, 1, K)
    fine = torch.arange(size, device=sigma.device)
    columns = torch.clamp(fine[:, None] + offsets.long()[None, :], 0, size - 1)  # (n, K): replicate borders
    operator = torch.zeros(*sigma.shape, size, size, device=sigma.device)
    weights = kernel[..., None, :].expand(*sigma.shape, size, kernel.shape[-1])
    operator.scatter_add_(-1, columns.expand(*sigma.shape, size, kernel.shape[-1]), weights)
    return operator


def gaussian_blur(rows: torch.Tensor, sigma: np.ndarray, radius: int) -> torch.Tensor:
    """Blur each row with its sigma: separable, same sigma on every axis, borders replicated."""
    sigmas = host_to_device(sigma, rows.device).view(-1, 1)
    for axis, size in enumerate(rows.shape[2:]):
        rows = _apply_along_axis(rows, _blur_operator(size, sigmas, radius), axis)
    return rows


def blur_radius(sigma_range: tuple[float, float]) -> int:
    """Kernel radius: ceil(3 * the largest sigma), the same for every row."""
    return max(1, math.ceil(3.0 * sigma_range[1]))


def brightness(rows: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """In place: multiply each row by its factor."""
    return rows.mul_(_per_row(factor, rows))


def contrast(rows: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """In place: scale each row's deviation from its mean, then clip to the row's original [min, max]."""
    dims = _spatial_dims(rows)
    mean = rows.mean(dim=dims, keepdim=True)
    low, high = rows.amin(dim=dims, keepdim=True), rows.amax(dim=dims, keepdim=True)
    rows.sub_(mean).mul_(_per_row(factor, rows)).add_(mean)
    return rows.clamp_(low, high)


def _low_res_operator(size: int, zoom: torch.Tensor) -> torch.Tensor:
    """Per-row matrix of "nearest downsample by `zoom`, then linear upsample" along one axis.

    zoom (N, C) -> (N, C, size, size). Built from index arithmetic, so a different coarse size per row costs
    nothing extra. The indexing reproduces F.interpolate: nearest reads fine voxel floor(j * n / m), linear
    (align_corners=False) reads coarse coordinate (i + 0.5) * m / n - 0.5, clamped at 0.
    """
    coarse = torch.clamp(torch.round(zoom * size), min=1.0)[..., None]  # (N, C, 1)
    fine = torch.arange(size, device=zoom.device, dtype=torch.float32)
    position = torch.clamp((fine + 0.5) * coarse / size - 0.5, min=0.0)  # (N, C, n)
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


def simulate_low_resolution(rows: torch.Tensor, zoom: np.ndarray) -> torch.Tensor:
    """Downsample each row (nearest) by its zoom, same for all axes, and upsample back (linear)."""
    zooms = host_to_device(zoom, rows.device).view(-1, 1)
    for axis, size in enumerate(rows.shape[2:]):
        rows = _apply_along_axis(rows, _low_res_operator(size, zooms), axis)
    return rows


def _row_stats(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row (mean, std, min, max) of rows (N, 1, *S), each (N, 1, 1, ...), in two passes over the data."""
    flat = rows.reshape(rows.shape[0], -1)
    std, mean = torch.std_mean(flat, dim=1, correction=0)
    low, high = torch.aminmax(flat, dim=1)
    shape = (-1, *([1] * (rows.ndim - 1)))
    return mean.view(shape), std.view(shape), low.view(shape), high.view(shape)


def gamma(rows: torch.Tensor, exponent: np.ndarray, invert: bool) -> torch.Tensor:
    """In place: gamma on each row rescaled to [0, 1], then mean and std restored (nnU-Net's retain_stats).

    `invert` applies it to the negated image (brightens dark regions instead of bright ones).
    """
    if invert:
        rows.neg_()
    mean, std, low, high = _row_stats(rows)
    span = high - low
    # x ** e as exp(e log x): half the time of pow on a CPU; x = 0 gives exp(-inf) = 0 = 0 ** e (e > 0)
    rows.sub_(low).div_(span + 1e-7).clamp_(0.0, 1.0).log_().mul_(_per_row(exponent, rows)).exp_()
    rows.mul_(span).add_(low)
    y_mean, y_std, _, _ = _row_stats(rows)
    rows.sub_(y_mean).div_(y_std + 1e-8).mul_(std).add_(mean)
    return rows.neg_() if invert else rows
