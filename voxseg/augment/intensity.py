"""Intensity transforms (image only) with nnU-Net's default recipe, applied to the rows that drew them.

Each transform takes `rows` (N, 1, *S): the (sample, channel) images it fires for, gathered by the pipeline,
and one host parameter per row; it returns the transformed rows (in place where that is safe). Statistics
(mean, min, max, std) are per row, i.e. per sample and channel, computed on the device.

Speed on a CPU thread (what a 128^3 row costs): the statistics are plain sums, minima and maxima (a fused
`std_mean` or `aminmax` over a dimension is 5-20x slower than them), the variance is taken after the row has
been centred in place (two passes, no temporary); blur is a separable sum of shifted views (a 1-channel
convolution or a dense per-axis matrix costs 2-10x more); low resolution is two `F.interpolate` calls per row.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from voxseg.augment.draws import host_to_device


def _column(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row values (N,) as (N, 1, 1, ...), broadcasting against rows (N, 1, *S)."""
    return values.view(-1, *([1] * (rows.ndim - 1)))


def _per_row(values: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    """Host values (N,) as a device tensor (N, 1, 1, ...) that broadcasts against rows (N, 1, *S)."""
    return _column(host_to_device(values, rows.device, rows.dtype), rows)


def _flat(rows: torch.Tensor) -> torch.Tensor:
    return rows.reshape(rows.shape[0], -1)


def row_mean(rows: torch.Tensor) -> torch.Tensor:
    """(N,) mean of each row (a pairwise sum: accurate in float32)."""
    return _flat(rows).mean(dim=1)


def row_min_max(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,), (N,) minimum and maximum of each row."""
    flat = _flat(rows)
    return flat.amin(dim=1), flat.amax(dim=1)


def centred_std(rows: torch.Tensor) -> torch.Tensor:
    """(N,) root mean square of each row, i.e. its std once the row is centred (population std, no copy).

    Norms over the last axis, then a pairwise sum of their squares: a single norm over a whole 128^3 row
    accumulates a relative error of ~1e-4 in float32, this ~1e-7.
    """
    lines = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    return (torch.linalg.vector_norm(lines, dim=2).square().sum(dim=1) / (lines.shape[1] * lines.shape[2])).sqrt()


def gaussian_noise(sample: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """In place: add N(0, std^2) noise to one sample (1, C, *S), drawn on its device from its own seed."""
    generator = torch.Generator(device=sample.device).manual_seed(int(seed))
    noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    return sample.add_(noise, alpha=float(std))


def blur_kernel(sigma: float, radius: int) -> list[float]:
    """Normalised 1D Gaussian of `sigma` with taps -radius..radius (host floats: no device work)."""
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (kernel / kernel.sum()).tolist()


def _convolve_axis(source: torch.Tensor, target: torch.Tensor, weights: list[float], axis: int) -> None:
    """target = source convolved along spatial `axis` with `weights` (2r + 1 taps), borders replicated.

    A sum of shifted views of `source` into `target`, with the taps that fall past an edge reading the edge
    slice (broadcast): no padded copy.
    """
    dim, size, radius = 2 + axis, source.shape[2 + axis], len(weights) // 2
    torch.mul(source, weights[radius], out=target)
    for shift in range(1, radius + 1):
        inside, edge = max(0, size - shift), min(shift, size)
        ahead, behind = weights[radius + shift], weights[radius - shift]
        if inside:  # target[i] += w * source[i + shift] and w' * source[i - shift] where those exist
            target.narrow(dim, 0, inside).add_(source.narrow(dim, shift, inside), alpha=ahead)
            target.narrow(dim, edge, inside).add_(source.narrow(dim, 0, inside), alpha=behind)
        target.narrow(dim, size - edge, edge).add_(source.narrow(dim, size - 1, 1), alpha=ahead)
        target.narrow(dim, 0, edge).add_(source.narrow(dim, 0, 1), alpha=behind)


def gaussian_blur(rows: torch.Tensor, sigma: np.ndarray, radius: int) -> torch.Tensor:
    """In place: blur each row with its sigma, separable, same sigma on every axis, borders replicated."""
    spare = torch.empty_like(rows)
    for index, value in enumerate(np.asarray(sigma, dtype=np.float64).tolist()):
        weights = blur_kernel(value, radius)
        source, target = rows[index:index + 1], spare[index:index + 1]
        for axis in range(rows.ndim - 2):  # ping-pong between the row and its spare
            _convolve_axis(source, target, weights, axis)
            source, target = target, source
        if source.data_ptr() != rows[index:index + 1].data_ptr():
            rows[index:index + 1] = source
    return rows


def blur_radius(sigma_range: tuple[float, float]) -> int:
    """Kernel radius: ceil(3 * the largest sigma), the same for every row."""
    return max(1, math.ceil(3.0 * sigma_range[1]))


def brightness(rows: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """In place: multiply each row by its factor."""
    return rows.mul_(_per_row(factor, rows))


def contrast(rows: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """In place: scale each row's deviation from its mean, then clip to the row's original [min, max]."""
    mean = _column(row_mean(rows), rows)
    low, high = (_column(v, rows) for v in row_min_max(rows))
    rows.sub_(mean).mul_(_per_row(factor, rows)).add_(mean)
    return rows.clamp_(low, high)


def coarse_size(size: int, zoom: float) -> int:
    """Voxels along an axis of `size` after downsampling by `zoom`: round(zoom * size) in float32, at least 1."""
    return max(1, int(np.round(np.float32(zoom) * np.float32(size))))


def simulate_low_resolution(rows: torch.Tensor, zoom: np.ndarray) -> torch.Tensor:
    """In place: downsample each row (nearest) by its zoom, same for all axes, and upsample back (linear).

    The coarse size is host arithmetic (no device read); nearest reads fine voxel floor(j * n / m), linear
    (align_corners=False) reads coarse coordinate (i + 0.5) * m / n - 0.5, as F.interpolate does.
    """
    spatial = tuple(rows.shape[2:])
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    for index, value in enumerate(np.asarray(zoom, dtype=np.float64).tolist()):
        coarse = [coarse_size(n, value) for n in spatial]
        small = F.interpolate(rows[index:index + 1], size=coarse, mode="nearest")
        rows[index:index + 1] = F.interpolate(small, size=spatial, mode=mode, align_corners=False)
    return rows


def gamma(rows: torch.Tensor, exponent: np.ndarray, invert: bool) -> torch.Tensor:
    """In place: gamma on each row rescaled to [0, 1], then mean and std restored (nnU-Net's retain_stats).

    `invert` applies it to the negated image (brightens dark regions instead of bright ones).
    With z = ((x - min) / (span + 1e-7)) ** e the result is (z * span + min) restandardised to the row's mean
    and std, i.e. (z - mean_z) * span * std / (span * std_z + 1e-8) + mean: the rescaling back to
    [min, max] folds into the final affine map.
    """
    if invert:
        rows.neg_()
    mean = row_mean(rows)
    low, high = row_min_max(rows)
    span = high - low
    rows.sub_(_column(mean, rows))
    std = centred_std(rows)
    # x ** e as exp(e log x): half the time of pow on a CPU; x = 0 gives exp(-inf) = 0 = 0 ** e (e > 0)
    rows.sub_(_column(low - mean, rows)).div_(_column(span + 1e-7, rows)).clamp_(0.0, 1.0).log_()
    rows.mul_(_per_row(exponent, rows)).exp_()
    rows.sub_(_column(row_mean(rows), rows))
    scale = span * std / (span * centred_std(rows) + 1e-8)
    rows.mul_(_column(scale, rows)).add_(_column(mean, rows))
    return rows.neg_() if invert else rows
