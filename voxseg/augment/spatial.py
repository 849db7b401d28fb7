"""Spatial transforms that run only for the samples that drew them.

Rotation, scaling, mirroring and elastic deformation of one sample are fused into one sampling grid, read once
for the image (`F.grid_sample`, linear; on a CPU in 3D block by block of the output, see `CPU_TILE`) and once
for the labels (`nearest_labels`: grid_sample's nearest voxel by index arithmetic, gathered from the integer
crop). A sample that drew none of rotation, scaling and elastic deformation is not resampled at all: it is
its centre crop, flipped along its mirror axes (exact).
90-degree turns are exact index permutations. Every decision comes from `AugmentParams` (host arrays), so
nothing here reads a tensor on the host (no device sync).

Coordinates: a sample maps output voxel `x` (patch P) to source voxel `c_S + M (x - c_P)` where `c_S`, `c_P`
are the centres of the source crop S and the patch, and `M = R * s` (rotation R, scale s). A scale s > 1
therefore samples a larger region (structures look smaller); s < 1 zooms in. Rotations act in voxel space,
like nnU-Net's.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from voxseg.augment.config import AugmentConfig
from voxseg.augment.draws import AugmentParams, host_to_device, rot90_planes, rotation_planes


def centre_crop(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """The centred `patch_size` window of `x` (B, C, *S) (a view). S - P is split as (S - P) // 2 before."""
    slices = [slice(None), slice(None)]
    for size, patch in zip(x.shape[2:], patch_size):
        start = (size - patch) // 2
        slices.append(slice(start, start + patch))
    return x[tuple(slices)]


# ----- rotation geometry (host) ------------------------------------------------------------------------------
def rotation_matrices(angles: np.ndarray, planes: Sequence[tuple[int, int]], ndim: int) -> np.ndarray:
    """Compose plane rotations: angles (N, len(planes)) in radians -> (N, ndim, ndim), float64."""
    result = np.broadcast_to(np.eye(ndim), (angles.shape[0], ndim, ndim)).copy()
    for index, (i, j) in enumerate(planes):
        cos, sin = np.cos(angles[:, index]), np.sin(angles[:, index])
        plane = np.broadcast_to(np.eye(ndim), result.shape).copy()
        plane[:, i, i], plane[:, j, j], plane[:, i, j], plane[:, j, i] = cos, cos, -sin, sin
        result = result @ plane
    return result


def has_spatial(config: AugmentConfig) -> bool:
    """Whether any grid-based transform (rotation, scaling, elastic) can fire."""
    return config.rotation_p > 0 or config.scale_p > 0 or config.elastic_p > 0


def source_size(patch_size: Sequence[int], config: AugmentConfig) -> tuple[int, ...]:
    """Size of the crop to sample so that rotated/scaled/deformed patches stay inside it.

    The worst case over the rotation range (checked on a grid of angles), the largest scale and the largest
    elastic displacement, capped at `config.max_source_factor * patch`; beyond the cap the (rare) far corners
    are filled like the outside of the case. S - P is kept even so the patch sits exactly in the middle.
    Equal to `patch_size` when no grid transform is enabled.

    Example: patch 128^3 with +-30 degrees about all axes needs ~1.72x, with scale 1.4 ~2.4x; the default
    cap 1.5 gives a 192^3 crop.
    """
    patch = np.array([float(p) for p in patch_size])
    if not config.enabled or not has_spatial(config):
        return tuple(int(p) for p in patch_size)
    ndim = len(patch_size)
    half = patch / 2
    extent = half.copy()
    if config.rotation_p > 0 and config.rotation_degrees > 0:
        planes = rotation_planes(ndim, config)
        values = np.linspace(-1.0, 1.0, 9) * math.radians(config.rotation_degrees)
        angles = np.stack(np.meshgrid(*([values] * len(planes)), indexing="ij"), -1).reshape(-1, len(planes))
        matrices = np.abs(rotation_matrices(angles, planes, ndim))  # (N, ndim, ndim)
        extent = np.maximum(extent, (matrices @ half).max(axis=0))
    scale = max(1.0, config.scale_range[1]) if config.scale_p > 0 else 1.0
    extent = extent * scale + (config.elastic_alpha[1] if config.elastic_p > 0 else 0.0)
    needed = np.minimum(2 * extent, patch * config.max_source_factor)
    margin = np.ceil(np.clip(needed - patch, 0, None) / 2 - 1e-9)
    return tuple(int(p + 2 * m) for p, m in zip(patch, margin))


# ----- the sampling grid ----------------------------------------------------------------------------------------
def sample_matrices(params: AugmentParams, config: AugmentConfig) -> np.ndarray:
    """Per-sample M = R * s * diag(+-1 per mirrored output axis) in voxel units: (B, D, D), float64."""
    ndim = params.flips.shape[1]
    angles = params.angles * params.rotate[:, None]
    matrix = rotation_matrices(angles, rotation_planes(ndim, config), ndim)
    matrix = matrix * np.where(params.scaled, params.scale, 1.0)[:, None, None]
    return matrix * np.where(params.flips, -1.0, 1.0)[:, None, :]  # output axis a reversed: (x - c_P) -> -(x - c_P)


def sampling_grid(params: AugmentParams, config: AugmentConfig, source: Sequence[int], patch: Sequence[int],
                  device: torch.device) -> torch.Tensor:
    """grid_sample's grid (B, *P, D) in normalised (x, y, z) units (align_corners=False) for every sample."""
    batch, ndim = params.batch_size, len(patch)
    # voxel units -> normalised [-1, 1]: x_norm = (x - c) * 2 / size
    matrix = (2.0 / np.array(source, float))[:, None] * sample_matrices(params, config) * (np.array(patch) / 2.0)
    theta = np.concatenate([matrix[:, ::-1, ::-1], np.zeros((batch, ndim, 1))], axis=2)  # array axes -> (x, y, z)
    grid = affine_grid(host_to_device(theta, device), patch)  # (B, *P, D)
    if config.elastic_p > 0 and params.elastic.any():
        grid = grid + elastic_offset(params, patch, source, device)
    return grid


def affine_grid(theta: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """`F.affine_grid(theta, (N, 1, *patch), align_corners=False)` from broadcast sums of per-axis ramps.

    theta (N, D, D + 1) -> (N, *P, D); several times faster than F.affine_grid on a CPU (no (N, P, D+1) base
    grid, no batched matmul), equal to rounding.
    """
    batch, ndim = theta.shape[0], len(patch)
    out = torch.empty((batch, *patch, ndim), dtype=theta.dtype, device=theta.device)
    ramps = []
    for axis, size in enumerate(patch):  # normalised centre of voxel i: (2 i + 1) / n - 1
        shape = [batch] + [1] * ndim
        shape[1 + axis] = size
        ramp = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
        ramps.append(ramp.view([1] + shape[1:]))
    for k in range(ndim):
        acc = theta[:, k, ndim].view(batch, *([1] * ndim))
        for j in range(ndim):  # coordinate j of (x, y, z) runs along array axis ndim - 1 - j
            acc = acc + theta[:, k, j].view(batch, *([1] * ndim)) * ramps[ndim - 1 - j]
        out[..., k] = acc
    return out


def elastic_offset(params: AugmentParams, patch: Sequence[int], source: Sequence[int],
                   device: torch.device) -> torch.Tensor:
    """Smooth random displacement in grid_sample's normalised (x, y, z) units: (B, *P, D), zero where not drawn.

    The drawn uniform noise on the coarse control grid, upsampled linearly to the patch and scaled to the
    sample's maximum displacement (voxels).
    """
    mode = "trilinear" if len(patch) == 3 else "bilinear"
    noise = host_to_device(params.elastic_noise, device)  # (B, D, *control)
    field = F.interpolate(noise, size=tuple(patch), mode=mode, align_corners=True)  # (B, D, *P)
    scale = (params.elastic_magnitude * params.elastic)[:, None] * (2.0 / np.array(source, float))[None, :]
    field = field * host_to_device(scale, device).view(*scale.shape, *([1] * len(patch)))
    return field.movedim(1, -1).flip(-1)  # grid_sample wants (x, y, z) = reversed array axes


CPU_TILE = (16, 16, 64)
"""Output block of one 3D grid_sample call on a CPU. PyTorch's 3D CPU sampler walks the output row by row, so a
rotated grid reads the source along tilted lines whose neighbours are evicted before they are reused; a block of
16 x 16 x 64 output voxels reads a source region that stays in cache. Same values (the sampler is pointwise),
~2x faster for a rotated 128^3 patch of a 192^3 crop (one thread), no slower for an unrotated one."""


def grid_sample_into(out: torch.Tensor, source: torch.Tensor, grid: torch.Tensor, mode: str,
                     finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """out (N, C, *P) = finish(F.grid_sample(source, grid)) with zero padding and align_corners=False.

    On a CPU in 3D the output is sampled block by block (`CPU_TILE`); elsewhere in one call.
    """
    def sample(block: torch.Tensor) -> torch.Tensor:
        return finish(F.grid_sample(source, block, mode=mode, padding_mode="zeros", align_corners=False))

    if source.device.type != "cpu" or grid.ndim != 5:
        out.copy_(sample(grid))
        return out
    for z in range(0, grid.shape[1], CPU_TILE[0]):
        for y in range(0, grid.shape[2], CPU_TILE[1]):
            for x in range(0, grid.shape[3], CPU_TILE[2]):
                block = (slice(z, z + CPU_TILE[0]), slice(y, y + CPU_TILE[1]), slice(x, x + CPU_TILE[2]))
                out[(slice(None), slice(None), *block)] = sample(grid[(slice(None), *block)])
    return out


def nearest_labels(seg: torch.Tensor, grid: torch.Tensor, fill: int) -> torch.Tensor:
    """Labels (N, 1, *S) at the nearest source voxel of each grid point -> (N, 1, *P), `fill` outside; exact.

    What F.grid_sample(mode="nearest", align_corners=False) does, as index arithmetic and one gather from the
    integer labels: the same float32 unnormalisation ((g + 1) * size - 1) / 2 and round half to even, so the
    same voxels, without a float copy of the label crop. The flat index is built in float32 where it is exact
    (fewer than 2^24 voxels per crop), else in float64.
    """
    spatial = seg.shape[2:]
    exact = torch.float32 if math.prod(spatial) < 2 ** 24 else torch.float64
    index = inside = None
    for axis, size in enumerate(spatial):  # grid coordinate k runs along array axis ndim - 1 - k
        coordinate = grid[..., len(spatial) - 1 - axis].add(1.0).mul_(size).sub_(1.0).div_(2.0).round_()
        ok = (coordinate >= 0).logical_and_(coordinate <= size - 1)
        inside = ok if inside is None else inside.logical_and_(ok)
        coordinate = coordinate.clamp_(0, size - 1).to(exact)
        index = coordinate if index is None else index.mul_(size).add_(coordinate)
    flat = seg.reshape(seg.shape[0], -1)
    labels = torch.gather(flat, 1, index.reshape(index.shape[0], -1).long()).view(index.shape)
    return labels.masked_fill_(~inside, fill).unsqueeze(1)


def warp(image: torch.Tensor, seg: torch.Tensor, grid: torch.Tensor, seg_fill: int,
         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample image (N, C, *S) linearly (zero outside) and labels (N, 1, *S) nearest (`seg_fill` outside).

    `out`: the (image, labels) tensors to write into (N, C, *P), (N, 1, *P); new ones when None.
    """
    patch = tuple(grid.shape[1:-1])
    if out is None:
        out = (torch.empty((*image.shape[:2], *patch), dtype=image.dtype, device=image.device),
               torch.empty((*seg.shape[:2], *patch), dtype=seg.dtype, device=seg.device))
    grid_sample_into(out[0], image, grid.to(image.dtype), "bilinear")
    out[1].copy_(nearest_labels(seg, grid, seg_fill))
    return out


def mirror_dims(flips: np.ndarray) -> list[int]:
    """Tensor dims (B, C, *S layout) of the axes a sample's flips (D,) mirror."""
    return [2 + axis for axis in np.flatnonzero(flips).tolist()]


def spatial_transform(image: torch.Tensor, seg: torch.Tensor, patch_size: Sequence[int], params: AugmentParams,
                      config: AugmentConfig, seg_fill: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale/deform/mirror (B, C, *S) image and (B, 1, *S) labels into new (B, ·, *P) patches.

    Only samples with a grid transform are resampled (one grid_sample each for image and labels); the others
    are their centre crop, flipped where they drew mirroring. Image: (bi/tri)linear, zero outside the source.
    Labels: nearest neighbour (no new values), `seg_fill` outside the source.
    """
    patch = tuple(patch_size)
    out_image = torch.empty((*image.shape[:2], *patch), dtype=image.dtype, device=image.device)
    out_seg = torch.empty((*seg.shape[:2], *patch), dtype=seg.dtype, device=seg.device)
    crop_image, crop_seg = centre_crop(image, patch), centre_crop(seg, patch)
    gridded = np.flatnonzero(params.grid)
    for b in np.flatnonzero(~params.grid).tolist():
        dims = mirror_dims(params.flips[b])
        source_image, source_seg = crop_image[b:b + 1], crop_seg[b:b + 1]
        out_image[b:b + 1] = source_image.flip(dims) if dims else source_image
        out_seg[b:b + 1] = source_seg.flip(dims) if dims else source_seg
    for b in gridded.tolist():
        grid = sampling_grid(params.subset(b, b + 1), config, image.shape[2:], patch, image.device)  # (1, *P, D)
        warp(image[b:b + 1], seg[b:b + 1], grid, seg_fill, out=(out_image[b:b + 1], out_seg[b:b + 1]))
    return out_image, out_seg


# ----- exact 90-degree rotations ------------------------------------------------------------------------------
def rotate90(image: torch.Tensor, seg: torch.Tensor, params: AugmentParams, patch_size: Sequence[int],
             axes: Sequence[int]) -> None:
    """In place: each sample that drew it turns by its 1-3 quarter turns in its plane of `rot90_planes`."""
    planes = rot90_planes(patch_size, axes)
    for b in np.flatnonzero(params.rot90).tolist():
        a, c = planes[int(params.rot90_plane[b])]
        turns, dims = int(params.rot90_turns[b]), (2 + a, 2 + c)
        image[b:b + 1] = torch.rot90(image[b:b + 1], turns, dims)
        seg[b:b + 1] = torch.rot90(seg[b:b + 1], turns, dims)
