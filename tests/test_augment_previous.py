"""The augmentation's faster transforms against the implementations they replaced (kept here, frozen).

The rewrites change only the order of float operations, so each must equal its predecessor to float32
rounding on random rows of every shape the pipeline feeds them: 3D and 2D, an axis shorter than the blur
radius, constant rows, rows with different parameters in one call.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxseg.augment import intensity


# ----- the previous implementations (dense per-axis operators, fused statistics) ---------------------------------
def _apply_along_axis(image: torch.Tensor, operator: torch.Tensor, axis: int) -> torch.Tensor:
    batch, channels, spatial = image.shape[0], image.shape[1], image.shape[2:]
    n = spatial[axis]
    before, after = math.prod(spatial[:axis]), math.prod(spatial[axis + 1:])
    matrix = operator.reshape(batch * channels, n, n).to(image.dtype)
    y = torch.matmul(matrix[:, None], image.reshape(batch * channels, before, n, after))
    return y.reshape(image.shape)


def previous_blur(rows: torch.Tensor, sigma: np.ndarray, radius: int) -> torch.Tensor:
    sigmas = torch.from_numpy(sigma).float().view(-1, 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigmas[..., None]) ** 2)
    kernel = kernel / kernel.sum(dim=-1, keepdim=True)
    for axis, size in enumerate(rows.shape[2:]):
        columns = torch.clamp(torch.arange(size)[:, None] + offsets.long()[None, :], 0, size - 1)
        operator = torch.zeros(*sigmas.shape, size, size)
        weights = kernel[..., None, :].expand(*sigmas.shape, size, kernel.shape[-1])
        operator.scatter_add_(-1, columns.expand(*sigmas.shape, size, kernel.shape[-1]), weights)
        rows = _apply_along_axis(rows, operator, axis)
    return rows


def previous_low_res(rows: torch.Tensor, zoom: np.ndarray) -> torch.Tensor:
    zooms = torch.from_numpy(zoom).float().view(-1, 1)
    for axis, size in enumerate(rows.shape[2:]):
        coarse = torch.clamp(torch.round(zooms * size), min=1.0)[..., None]
        position = torch.clamp((torch.arange(size, dtype=torch.float32) + 0.5) * coarse / size - 0.5, min=0.0)
        lower = torch.minimum(torch.floor(position), coarse - 1)
        weight_upper = torch.clamp(position - lower, 0.0, 1.0)
        upper = torch.minimum(lower + 1, coarse - 1)
        source_lower = torch.clamp(torch.floor(lower * size / coarse), max=size - 1).long()
        source_upper = torch.clamp(torch.floor(upper * size / coarse), max=size - 1).long()
        operator = torch.zeros(*zooms.shape, size, size)
        operator.scatter_add_(-1, source_lower[..., None], (1.0 - weight_upper)[..., None])
        operator.scatter_add_(-1, source_upper[..., None], weight_upper[..., None])
        rows = _apply_along_axis(rows, operator, axis)
    return rows


def _column(values: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(values).to(rows.dtype).view(-1, *([1] * (rows.ndim - 1)))


def _row_stats(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    flat = rows.reshape(rows.shape[0], -1)
    std, mean = torch.std_mean(flat, dim=1, correction=0)
    low, high = torch.aminmax(flat, dim=1)
    shape = (-1, *([1] * (rows.ndim - 1)))
    return mean.view(shape), std.view(shape), low.view(shape), high.view(shape)


def previous_gamma(rows: torch.Tensor, exponent: np.ndarray, invert: bool) -> torch.Tensor:
    if invert:
        rows.neg_()
    mean, std, low, high = _row_stats(rows)
    span = high - low
    rows.sub_(low).div_(span + 1e-7).clamp_(0.0, 1.0).log_().mul_(_column(exponent, rows)).exp_()
    rows.mul_(span).add_(low)
    y_mean, y_std, _, _ = _row_stats(rows)
    rows.sub_(y_mean).div_(y_std + 1e-8).mul_(std).add_(mean)
    return rows.neg_() if invert else rows


def previous_contrast(rows: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    dims = tuple(range(2, rows.ndim))
    mean = rows.mean(dim=dims, keepdim=True)
    low, high = rows.amin(dim=dims, keepdim=True), rows.amax(dim=dims, keepdim=True)
    rows.sub_(mean).mul_(_column(factor, rows)).add_(mean)
    return rows.clamp_(low, high)


# ----- the comparisons ------------------------------------------------------------------------------------------
SHAPES = [(24, 20, 18), (2, 9, 7), (30, 26)]


def assert_rounding_close(new: torch.Tensor, old: torch.Tensor, ulps: float = 20) -> None:
    """Equal to float32 rounding at the scale of each row (a few ulps of the row's largest magnitude)."""
    scale = old.reshape(old.shape[0], -1).abs().amax(dim=1).clamp(min=1.0)
    error = (new - old).reshape(old.shape[0], -1).abs().amax(dim=1)
    assert (error <= ulps * torch.finfo(torch.float32).eps * scale).all(), (error / scale).tolist()


def rows_of(shape: tuple[int, ...], count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, 1, *shape, generator=generator) * 3 + 1
    rows[1] = rows[1] ** 2  # a skewed row
    return rows


@pytest.mark.parametrize("shape", SHAPES)
def test_blur_equals_the_dense_operator_blur(shape):
    rows, sigma = rows_of(shape, 3), np.array([0.5, 0.83, 1.0])
    for radius in (1, 3):
        new = intensity.gaussian_blur(rows.clone(), sigma, radius)
        assert_rounding_close(new, previous_blur(rows.clone(), sigma, radius))
        assert not torch.allclose(new, rows, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_low_res_equals_the_dense_operator_low_res(shape):
    rows, zoom = rows_of(shape, 4), np.array([0.5, 0.61, 0.97, 0.3])
    new = intensity.simulate_low_resolution(rows.clone(), zoom)
    assert_rounding_close(new, previous_low_res(rows.clone(), zoom), ulps=64)  # weights rounded differently
    assert not torch.allclose(new, rows, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("invert", [False, True])
def test_gamma_equals_the_previous_gamma(shape, invert):
    rows, exponent = rows_of(shape, 4), np.array([0.7, 1.0, 1.5, 0.9])
    rows[3] = 2.5  # constant: zero span and zero std must give the row back, not NaN
    new = intensity.gamma(rows.clone(), exponent, invert)
    assert_rounding_close(new, previous_gamma(rows.clone(), exponent, invert), ulps=100)
    assert torch.isfinite(new).all() and torch.equal(new[3], rows[3])
    # statistics retained, and the transform did something
    torch.testing.assert_close(new.mean(dim=(1, 2, 3) if len(shape) == 2 else (1, 2, 3, 4)),
                               rows.mean(dim=(1, 2, 3) if len(shape) == 2 else (1, 2, 3, 4)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(new[0], rows[0], atol=1e-2)


@pytest.mark.parametrize("shape", SHAPES)
def test_contrast_equals_the_previous_contrast(shape):
    rows, factor = rows_of(shape, 3), np.array([0.75, 1.25, 1.0])
    new = intensity.contrast(rows.clone(), factor)
    assert_rounding_close(new, previous_contrast(rows.clone(), factor))
    assert not torch.allclose(new[0], rows[0], atol=1e-2)


def test_centred_std_is_accurate_on_large_rows():
    """A plain float32 norm over 2M values drifts by ~1e-4; the per-line norms stay at float rounding."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.rand(2, 1, 128, 128, 128, generator=generator) ** 3 * 0.1 + 0.9
    rows.sub_(rows.mean(dim=(1, 2, 3, 4), keepdim=True))
    exact = rows.double().reshape(2, -1).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(intensity.centred_std(rows).double(), exact, atol=0, rtol=1e-6)


def test_tiled_warp_equals_one_grid_sample_call():
    """On a CPU the 3D warp samples the output block by block (cache locality); the values are those of one
    grid_sample call over the whole patch, bit for bit, also where the blocks do not divide the patch."""
    from voxseg.augment import AugmentConfig, draw_batch_params, source_size
    from voxseg.augment.spatial import CPU_TILE, sampling_grid, warp

    config = AugmentConfig(rotation_p=1.0, scale_p=1.0)
    patch = (CPU_TILE[0] + 3, CPU_TILE[1] * 2, CPU_TILE[2] + 6)
    size = source_size(patch, config)
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(1, 2, *size, generator=generator)
    seg = torch.randint(0, 4, (1, 1, *size), generator=generator, dtype=torch.int8)
    params = draw_batch_params(1, 2, patch, config, np.random.default_rng(2))
    grid = sampling_grid(params, config, size, patch, torch.device("cpu"))
    out_image, out_seg = warp(image, seg, grid, seg_fill=-1)
    whole = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = torch.nn.functional.grid_sample(seg.float() + 1, grid, mode="nearest", padding_mode="zeros",
                                             align_corners=False) - 1
    assert torch.equal(out_image, whole)
    assert torch.equal(out_seg, labels.round().to(torch.int8))
    assert (out_seg == -1).any() and (out_seg >= 0).any()  # the rotated, scaled patch reaches past the crop


@pytest.mark.parametrize("size,patch", [((23, 30, 27), (16, 20, 18)), ((31, 26), (20, 17))])
def test_nearest_labels_equal_grid_sample_nearest(size, patch):
    """Labels are gathered by index arithmetic instead of grid_sample(nearest) on a float copy: the same voxels
    everywhere, including points past the crop (fill) and exact half-voxel ties (an odd S - P at scale 1)."""
    from voxseg.augment import AugmentConfig, draw_batch_params
    from voxseg.augment.spatial import nearest_labels, sampling_grid

    generator = torch.Generator().manual_seed(7)
    seg = torch.randint(0, 5, (1, 1, *size), generator=generator, dtype=torch.int8)
    configs = [AugmentConfig(rotation_p=1.0, scale_p=1.0, elastic_p=0.5, elastic_alpha=(1.0, 3.0)),
               AugmentConfig(rotation_p=0.0, scale_p=1.0, scale_range=(1.0, 1.0), mirror_p=0.5)]
    ties = 0
    for config in configs:
        params = draw_batch_params(6, 1, patch, config, np.random.default_rng(3))
        for b in range(6):
            grid = sampling_grid(params.subset(b, b + 1), config, size, patch, torch.device("cpu"))
            expected = torch.nn.functional.grid_sample(seg.float() + 2, grid, mode="nearest", padding_mode="zeros",
                                                       align_corners=False) - 2
            assert torch.equal(nearest_labels(seg, grid, -2), expected.round().to(torch.int8))
            unnormalised = ((grid + 1) * torch.tensor(size[::-1], dtype=torch.float32) - 1) / 2
            ties += int((unnormalised.frac().abs() == 0.5).any())
    assert ties > 0  # the odd S - P of the scale-1 grids put points exactly between two voxels
