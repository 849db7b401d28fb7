"""Batched spatial transforms on the tensors' device.

Rotation, scaling and mirroring are composed into one affine matrix per sample and applied, together with an
optional elastic displacement field, by a single `F.grid_sample` call for the whole batch; samples without a
grid transform are an exact (mirrored) crop, and 90-degree rotations are exact index permutations. Per-sample random decisions are masks combined with `torch.where`, so
nothing here reads a tensor value on the host (no device sync).

Coordinates: a sample maps output voxel `x` (patch P) to source voxel `c_S + M (x - c_P)` where `c_S`, `c_P`
are the centres of the source crop S and the patch, and `M = R * s` (rotation R, scale s). A scale s > 1
therefore samples a larger region (structures look smaller); s < 1 zooms in. Rotations act in voxel space,
like nnU-Net's.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from voxseg.augment.config import AugmentConfig
from voxseg.augment.draws import broadcast_mask, device_vector, random_mask, random_uniform


def centre_crop(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """The centred `patch_size` window of `x` (B, C, *S) (a view). S - P is split as (S - P) // 2 before."""
    slices = [slice(None), slice(None)]
    for size, patch in zip(x.shape[2:], patch_size):
        start = (size - patch) // 2
        slices.append(slice(start, start + patch))
    return x[tuple(slices)]


def mirrored_centre_crop(x: torch.Tensor, patch_size: Sequence[int], flips: torch.Tensor | None) -> torch.Tensor:
    """Centre crop of (B, C, *S) with the axes where flips (B, ndim) is True reversed, per sample.

    One gather (advanced indexing) instead of a flip and a select per axis; exact.
    """
    if flips is None:
        return centre_crop(x, patch_size)
    batch, channels, ndim = x.shape[0], x.shape[1], len(patch_size)
    index: list[torch.Tensor] = [
        torch.arange(batch, device=x.device).view(batch, *([1] * (ndim + 1))),
        torch.arange(channels, device=x.device).view(1, channels, *([1] * ndim)),
    ]
    for axis, (size, patch) in enumerate(zip(x.shape[2:], patch_size)):
        ramp = torch.arange(patch, device=x.device)
        positions = (size - patch) // 2 + torch.where(flips[:, axis:axis + 1], patch - 1 - ramp, ramp)  # (B, P)
        shape = [batch, 1] + [1] * ndim
        shape[2 + axis] = patch
        index.append(positions.view(shape))
    return x[tuple(index)]


# ----- rotation geometry -----------------------------------------------------------------------------------
def rotation_planes(ndim: int, config: AugmentConfig) -> list[tuple[int, int]]:
    """Planes (pairs of array axes) the random rotation acts in.

    3D: rotations about each axis, i.e. in the planes (1,2), (0,2), (0,1); with `rotation_coarse_axis_only`
    only about `coarse_axis` (in-plane rotation of an anisotropic patch). 2D: the single plane (0, 1).
    """
    if ndim == 2:
        return [(0, 1)]
    about = [config.coarse_axis] if config.rotation_coarse_axis_only else [0, 1, 2]
    return [tuple(a for a in range(3) if a != axis) for axis in about]  # type: ignore[misc]


def rotation_matrices(angles: torch.Tensor, planes: Sequence[tuple[int, int]], ndim: int) -> torch.Tensor:
    """Compose plane rotations: angles (B, len(planes)) in radians -> (B, ndim, ndim)."""
    batch = angles.shape[0]
    result = torch.eye(ndim, dtype=angles.dtype, device=angles.device).expand(batch, ndim, ndim)
    for index, (i, j) in enumerate(planes):
        cos, sin = torch.cos(angles[:, index]), torch.sin(angles[:, index])
        plane = torch.eye(ndim, dtype=angles.dtype, device=angles.device).repeat(batch, 1, 1)
        plane[:, i, i] = cos
        plane[:, j, j] = cos
        plane[:, i, j] = -sin
        plane[:, j, i] = sin
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
    patch = torch.tensor([float(p) for p in patch_size], dtype=torch.float64)
    if not config.enabled or not has_spatial(config):
        return tuple(int(p) for p in patch_size)
    ndim = len(patch_size)
    half = patch / 2
    extent = half.clone()
    if config.rotation_p > 0 and config.rotation_degrees > 0:
        planes = rotation_planes(ndim, config)
        values = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64) * math.radians(config.rotation_degrees)
        angles = torch.cartesian_prod(*([values] * len(planes))).reshape(-1, len(planes))
        matrices = rotation_matrices(angles, planes, ndim).abs()  # (N, ndim, ndim)
        extent = torch.maximum(extent, (matrices @ half).amax(dim=0))
    scale = max(1.0, config.scale_range[1]) if config.scale_p > 0 else 1.0
    extent = extent * scale + (config.elastic_alpha[1] if config.elastic_p > 0 else 0.0)
    needed = torch.minimum(2 * extent, patch * config.max_source_factor)
    margin = torch.ceil(torch.clamp(needed - patch, min=0) / 2 - 1e-9)
    return tuple(int(p + 2 * m) for p, m in zip(patch.tolist(), margin.tolist()))


# ----- the grid transform -------------------------------------------------------------------------------------
def _elastic_offset(
    batch: int, patch: Sequence[int], source: Sequence[int], config: AugmentConfig, mask: torch.Tensor,
    generator: torch.Generator | None, device: torch.device,
) -> torch.Tensor:
    """Smooth random displacement in grid_sample's normalised (x, y, z) units: (B, *P, ndim).

    Uniform noise on a coarse control grid (one point every `elastic_sigma` voxels) upsampled linearly to the
    patch, scaled to a per-sample maximum displacement drawn from `elastic_alpha` (voxels).
    """
    ndim = len(patch)
    control = [max(2, math.ceil(p / config.elastic_sigma) + 1) for p in patch]
    noise = random_uniform(-1.0, 1.0, (batch, ndim, *control), generator, device)
    mode = "trilinear" if ndim == 3 else "bilinear"
    field = F.interpolate(noise, size=tuple(patch), mode=mode, align_corners=True)  # (B, ndim, *P)
    magnitude = random_uniform(*config.elastic_alpha, (batch,), generator, device) * mask
    to_normalised = device_vector([2.0 / s for s in source], device)
    field = field * broadcast_mask(magnitude, field.ndim) * broadcast_mask(to_normalised, field.ndim - 1)
    return field.movedim(1, -1).flip(-1)  # grid_sample wants (x, y, z) = reversed array axes


def _affine_matrices(
    batch: int, ndim: int, config: AugmentConfig, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample M = R * s in voxel units (B, ndim, ndim) and the mask of samples that got either."""
    matrix = torch.eye(ndim, device=device).expand(batch, ndim, ndim)
    applied = torch.zeros(batch, dtype=torch.bool, device=device)
    if config.rotation_p > 0:
        planes = rotation_planes(ndim, config)
        rotate = random_mask(config.rotation_p, (batch,), generator, device)
        limit = math.radians(config.rotation_degrees)
        angles = random_uniform(-limit, limit, (batch, len(planes)), generator, device) * rotate[:, None]
        matrix = rotation_matrices(angles, planes, ndim)
        applied = applied | rotate
    if config.scale_p > 0:
        scaled = random_mask(config.scale_p, (batch,), generator, device)
        factor = random_uniform(*config.scale_range, (batch,), generator, device)
        matrix = matrix * torch.where(scaled, factor, torch.ones_like(factor))[:, None, None]
        applied = applied | scaled
    return matrix, applied


def spatial_transform(
    image: torch.Tensor, seg: torch.Tensor, patch_size: Sequence[int], config: AugmentConfig,
    generator: torch.Generator | None, seg_fill: int = -1, flips: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale/deform/mirror (B, C, *S) image and (B, 1, *S) labels into (B, ·, *P) patches.

    `flips` (B, ndim) bool mirrors output axes: built into the affine matrix of grid-transformed samples and
    into the crop indices of the others, so mirroring costs no extra pass. Samples that draw no grid
    transform are the exact (mirrored) centre crop. Image: (bi/tri)linear, zero outside the source. Labels:
    nearest neighbour (no new values), `seg_fill` outside the source.
    """
    batch, ndim, device = image.shape[0], len(patch_size), image.device
    crop_image = mirrored_centre_crop(image, patch_size, flips)
    crop_seg = mirrored_centre_crop(seg, patch_size, flips)
    if not has_spatial(config):
        return crop_image, crop_seg
    source = image.shape[2:]
    matrix, applied = _affine_matrices(batch, ndim, config, generator, device)
    if flips is not None:  # output axis a reversed: (x - c_P) -> -(x - c_P) along a, i.e. M diag(+-1)
        matrix = matrix * torch.where(flips, -1.0, 1.0)[:, None, :]
    # voxel units -> normalised [-1, 1] units (align_corners=False): x_norm = (x - c) * 2 / size
    to_source = device_vector([2.0 / s for s in source], device)[:, None]
    from_patch = device_vector([p / 2.0 for p in patch_size], device)[None, :]
    theta = (to_source * matrix * from_patch).flip(-1).flip(-2)  # array axes -> (x, y, z)
    theta = torch.cat([theta, torch.zeros(batch, ndim, 1, device=device)], dim=2)  # no translation
    grid = F.affine_grid(theta, [batch, 1, *patch_size], align_corners=False)  # (B, *P, ndim)
    if config.elastic_p > 0:
        deform = random_mask(config.elastic_p, (batch,), generator, device)
        grid = grid + _elastic_offset(batch, patch_size, source, config, deform, generator, device)
        applied = applied | deform
    warped = F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    # shift labels so that zero padding means `seg_fill`; nearest sampling of exact small integers stays exact
    shifted = seg.to(torch.float32) - seg_fill
    labels = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    labels = (labels + seg_fill).round().to(seg.dtype)
    image_out = torch.where(broadcast_mask(applied, image.ndim), warped, crop_image)
    seg_out = torch.where(broadcast_mask(applied, seg.ndim), labels, crop_seg)
    return image_out, seg_out


# ----- mirroring decisions and exact 90-degree rotations ---------------------------------------------------
def draw_flips(
    batch: int, ndim: int, axes: Sequence[int], p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """(B, ndim) bool: mirror each listed axis with probability p, independently per sample and axis."""
    if p <= 0 or not axes:
        return None
    drawn = random_mask(p, (batch, len(axes)), generator, device)
    never = torch.zeros(batch, dtype=torch.bool, device=device)
    # stacked columns rather than flips[:, axes] = drawn: a list index becomes a host tensor copied with a sync
    return torch.stack([drawn[:, list(axes).index(a)] if a in axes else never for a in range(ndim)], dim=1)


def rot90_planes(patch_size: Sequence[int], axes: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs of the given axes with equal patch size (the only planes a 90-degree turn keeps the shape in)."""
    axes = sorted(axes)
    return [(a, b) for i, a in enumerate(axes) for b in axes[i + 1:] if patch_size[a] == patch_size[b]]


def rotate90(
    image: torch.Tensor, seg: torch.Tensor, planes: Sequence[tuple[int, int]], p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability p per sample, turn by 1, 2 or 3 quarter turns in one random plane of `planes`."""
    if not planes or p <= 0:
        return image, seg
    batch, device = image.shape[0], image.device
    selected = random_mask(p, (batch,), generator, device)
    plane_index = torch.randint(0, len(planes), (batch,), generator=generator, device=device)
    turns = torch.randint(1, 4, (batch,), generator=generator, device=device)
    out_image, out_seg = image, seg
    for index, (a, b) in enumerate(planes):
        for k in (1, 2, 3):
            take = selected & (plane_index == index) & (turns == k)
            dims = (2 + a, 2 + b)
            out_image = torch.where(broadcast_mask(take, image.ndim), torch.rot90(image, k, dims), out_image)
            out_seg = torch.where(broadcast_mask(take, seg.ndim), torch.rot90(seg, k, dims), out_seg)
    return out_image, out_seg
