"""The planner's network and patch search: U-Net topology for a patch, largest patch and batch for a budget.

`voxseg.data.plan.make_plan` calls these; they are split out so the planner module stays readable. The memory
model they fit against lives in `voxseg.data.memory`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from voxseg.data.memory import estimate_memory_gb
from voxseg.errors import ConfigError
from voxseg.plans import NetworkPlan

__all__ = ["check_patch_divisible", "derive_topology", "fit_batch", "fit_patch", "initial_patch", "snap_to_topology"]

MIN_FEATURE_MAP = 4  # no axis is downsampled below this many voxels (nnU-Net: a feature map edge of 4)
SINGLE_AXIS_MIN_SIZE = 3 * MIN_FEATURE_MAP  # an axis downsampled alone needs 12 voxels (nnU-Net's rule)
SPACING_RATIO = 2.0  # an axis is downsampled only while its spacing is < 2x the finest one still downsampled
MAX_FEATURES = {3: 320, 2: 512}
BASE_FEATURES = 32
START_PATCH_VOXELS = {3: 256**3, 2: 2048**2}  # the search starts at most this large
MIN_PATCH_AXIS = 8  # the search never shrinks an axis below this
REFERENCE_BATCH = 2  # the patch is shrunk until this batch fits; more batch is added afterwards
MAX_DATASET_FRACTION_PER_BATCH = 0.05  # one batch covers at most 5% of the dataset's voxels (nnU-Net's rule)


def derive_topology(
    patch_size: list[int], spacing: list[float], **block: Any
) -> NetworkPlan:
    """U-Net topology for a patch: strides and kernels per stage, features per stage (nnU-Net's rules).

    Stage by stage, the axes halved next are those whose feature map has at least 8 voxels (so it keeps >= 4)
    and whose current spacing is less than 2x the finest current spacing among them; when that leaves one
    axis, it needs 12 voxels (halving a single axis of a small map is not worth a stage). Stages end when no
    axis may be halved (there is no fixed stage limit: the patch size decides). An axis's kernel is 3 once
    its spacing is within 2x of the finest current spacing (and stays 3), else 1; the bottom stage's kernel
    is always 3. Feature maps are rounded up when halved (an odd 35 becomes 18). Features start at 32 and
    double per stage up to 320 (3D) / 512 (2D).

    Example (isotropic 1 mm, patch 128^3): 128 -> 64 -> 32 -> 16 -> 8 -> 4: 6 stages, kernels [3,3,3],
    strides [1,1,1] then [2,2,2] x5, features [32, 64, 128, 256, 320, 320], total stride 32 per axis.
    Patch 112x160x128: axis 0 stops at 7 after 4 halvings, so the last stride is [1,2,2]; total [16,32,32].

    Example (5 x 0.8 x 0.8 mm, patch 20x320x320): stage 0 kernel [1,3,3] (5 >= 2 x 0.8); stages 1-2 halve
    only the in-plane axes (spacing 1.6, 3.2); then 5 < 2 x 3.2, so axis 0 is halved too (kernel 3 from
    stage 2 on) for two stages (20 -> 10 -> 5), then only in plane (20 -> 10 -> 5) -> strides [1,1,1],
    [1,2,2], [1,2,2], [2,2,2], [2,2,2], [1,2,2], [1,2,2]: total stride [4, 64, 64], 7 stages.

    Args:
        patch_size: patch in voxels (2 or 3 axes).
        spacing: voxel spacing of those axes in mm.
        **block: other NetworkPlan fields (name, conv_per_stage, residual, deep_supervision).
    """
    ndim = len(patch_size)
    size = [int(p) for p in patch_size]
    current = [float(s) for s in spacing]
    kernel = [1] * ndim
    kernels, strides = [], [[1] * ndim]
    while True:
        by_size = [a for a in range(ndim) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not by_size:
            break
        finest = min(current[a] for a in by_size)
        axes = [a for a in by_size if current[a] / finest < SPACING_RATIO]
        if len(axes) == 1 and size[axes[0]] < SINGLE_AXIS_MIN_SIZE:
            break
        smallest = min(current)
        kernel = [3 if k == 3 or c / smallest < SPACING_RATIO else 1 for k, c in zip(kernel, current)]
        kernels.append(list(kernel))
        strides.append([2 if a in axes else 1 for a in range(ndim)])
        for a in axes:
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    kernels.append([3] * ndim)  # the bottom stage
    features = [min(BASE_FEATURES * 2**s, MAX_FEATURES[ndim]) for s in range(len(strides))]
    return NetworkPlan(features=features, kernel_sizes=kernels, strides=strides, **block)


def snap_to_topology(
    patch: list[int], spacing: list[float], block: dict[str, Any], upward: bool
) -> tuple[list[int], NetworkPlan]:
    """Round the patch to a multiple of its network's total stride, re-deriving the network until stable."""
    for _ in range(16):
        network = derive_topology(patch, spacing, **block)
        total = network.total_stride
        if upward:
            snapped = [math.ceil(p / t) * t for p, t in zip(patch, total)]
        else:
            snapped = [max(t, p // t * t) for p, t in zip(patch, total)]
        if snapped == patch:
            return patch, network
        patch = snapped
    return patch, derive_topology(patch, spacing, **block)


def initial_patch(median_shape: list[int], spacing: list[float]) -> list[int]:
    """Where the patch search starts: the aspect ratio of 1/spacing (equal millimetres per axis) scaled to
    256^3 voxels (2048^2 in 2D), each axis clipped to the median shape (nnU-Net's start).

    Example: 1 mm isotropic, median 134x168x138 -> 256^3 clipped -> 134x168x138. At 3 x 1 x 1 mm with median
    60x400x400: 1/spacing (0.33, 1, 1) scaled to 256^3 voxels -> 123x369x369, clipped -> 60x369x369.
    """
    ndim = len(spacing)
    inverse = [1.0 / float(s) for s in spacing]
    scale = (START_PATCH_VOXELS[ndim] / math.prod(inverse)) ** (1.0 / ndim)
    return [max(1, min(int(round(i * scale)), int(m))) for i, m in zip(inverse, median_shape)]


def fit_patch(
    median_shape: list[int], spacing: list[float], budget_gb: float, block: dict[str, Any], channels: int,
    outputs: int, cube: bool = False,
) -> tuple[list[int], NetworkPlan]:
    """Largest patch (with its network) whose batch of 2 fits `budget_gb` (nnU-Net's search, voxseg's memory
    model).

    Start from `initial_patch`, rounded up to a multiple of its network's total stride. While the memory model
    says a batch of 2 does not fit, shrink the axis that is largest relative to the median shape (the last
    such axis on a tie), so the patch keeps the median case's aspect ratio. The step is the total stride that
    axis has once shrunk (128 -> 112 when 96 would need only 4 halvings, so no valid size is skipped); the
    network is re-derived each time (a smaller patch may lose a stage, which changes the strides).

    Example (BraTS-like, 4 channels, 4 outputs, 8 GiB, median 134x168x138): start 160x192x160 (15.1 GiB)
    -> axis 0: 128x192x160 -> axis 2: 128x192x128 -> axis 1: 128x160x128 (8.8 GiB) -> axis 0: 112x160x128
    (7.8 GiB, fits; strides end with [1,2,2]). nnU-Net 2.8.1 plans the same patch for this median. A median of
    140x170x140 ends at 128^3 instead (128/140 < 160/170 at the last step, so axis 1 shrinks).

    `cube=True` keeps the earlier rule instead: start from the median shape and shrink the axis longest in mm
    by its total stride (the patch tends to equal millimetres per axis: 128^3 for both medians above). If
    even the smallest patch does not fit (a tiny budget), the smallest patch is returned and batch 2 is used
    anyway.
    """
    ndim = len(median_shape)
    median = [max(1, int(s)) for s in median_shape]
    if cube:
        scale = min(1.0, (START_PATCH_VOXELS[ndim] / float(np.prod(median))) ** (1.0 / ndim))
        start = [max(1, int(round(p * scale))) for p in median]
    else:
        start = initial_patch(median, spacing)
    patch, network = snap_to_topology(start, spacing, block, upward=True)
    while estimate_memory_gb(network, patch, REFERENCE_BATCH, channels, outputs) > budget_gb:
        total = network.total_stride
        shrinkable = [a for a in range(ndim) if patch[a] - total[a] >= MIN_PATCH_AXIS]
        if not shrinkable:
            break
        patch = list(patch)
        if cube:
            axis = max(shrinkable, key=lambda a: (patch[a] * spacing[a], -a))
            patch[axis] -= total[axis]
            patch, network = snap_to_topology(patch, spacing, block, upward=False)
            continue
        axis = max(shrinkable, key=lambda a: (patch[a] / median[a], a))
        trial = list(patch)
        trial[axis] -= total[axis]
        patch[axis] -= derive_topology(trial, spacing, **block).total_stride[axis]
        patch, network = snap_to_topology(patch, spacing, block, upward=True)
    return patch, network


def fit_batch(
    network: NetworkPlan, patch: list[int], budget_gb: float, channels: int, outputs: int, dataset_voxels: float
) -> int:
    """Largest batch within the budget, at most 5% of the dataset's voxels per batch, and at least 2.

    Example: a 128^3 patch costs ~7.3 GiB at batch 2 and ~2.9 GiB per extra sample, so 8 GiB -> 2 and
    16 GiB -> 4. With 40 GiB the BraTS patch is 160x192x160 (~8.3 GiB at batch 1, ~6.8 GiB per extra sample)
    -> 5. The 5% rule matters for small datasets: 40 cases of 3.3M voxels allow 0.05 x 1.3e8 / 4.9e6 = 1
    such patch per batch -> the minimum, 2.
    """
    one = estimate_memory_gb(network, patch, 1, channels, outputs)
    per_sample = estimate_memory_gb(network, patch, 2, channels, outputs) - one
    batch = int(math.floor((budget_gb - one) / per_sample + 1e-9)) + 1
    cap = int(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels / float(np.prod(patch)))
    return max(REFERENCE_BATCH, min(batch, cap))


def check_patch_divisible(patch: list[int], network: NetworkPlan) -> None:
    """Raise ConfigError (suggesting the nearest multiples) when the patch does not divide by the total stride."""
    for axis, (p, t) in enumerate(zip(patch, network.total_stride)):
        if p % t:
            low, high = max(t, p // t * t), (p // t + 1) * t
            raise ConfigError(
                f"patch_size[{axis}]={p} is not divisible by {t}, the network's total stride along that axis; "
                f"use a multiple of {t} (e.g. {low} or {high})"
            )
