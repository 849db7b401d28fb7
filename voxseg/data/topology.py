"""The planner's network and patch search: U-Net topology for a patch, largest patch and batch for a budget.

`voxseg.data.plan.make_plan` calls these; they are split out so the planner module stays readable. The memory
model they fit against lives in `voxseg.data.memory`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from voxseg.data.memory import estimate_memory_gb
from voxseg.plans import NetworkPlan
from voxseg.errors import ConfigError

__all__ = ["check_patch_divisible", "derive_topology", "fit_batch", "fit_patch", "snap_to_topology"]

MIN_FEATURE_MAP = 4  # no axis is downsampled below this many voxels
MAX_STAGES = {3: 6, 2: 7}
MAX_FEATURES = {3: 320, 2: 512}
BASE_FEATURES = 32
START_PATCH_VOXELS = {3: 256**3, 2: 2048**2}  # the search starts at most this large
MIN_PATCH_AXIS = 8  # the search never shrinks an axis below this
REFERENCE_BATCH = 2  # the patch is shrunk until this batch fits; more batch is added afterwards
MAX_DATASET_FRACTION_PER_BATCH = 0.05  # one batch covers at most 5% of the dataset's voxels (nnU-Net's rule)


def derive_topology(
    patch_size: list[int], spacing: list[float], **block: Any
) -> NetworkPlan:
    """U-Net topology for a patch: strides and kernels per stage, features per stage.

    An axis is downsampled by 2 at the next stage while (a) its feature map stays >= 4 voxels and (b) its
    current spacing is at most 2x the finest current spacing among the axes that can still be downsampled.
    Rule (b) makes a coarse axis wait until the others have caught up, and its kernel is 1 until then.
    Stages stop at 6 (3D) / 7 (2D) or when no axis can be downsampled; features start at 32 and double per
    stage up to 320 (3D) / 512 (2D).

    Example (isotropic 1 mm, patch 128^3): every axis halves 5 times (128 -> 4): 6 stages, kernels [3,3,3],
    strides [1,1,1] then [2,2,2] x5, features [32, 64, 128, 256, 320, 320], total stride 32 per axis.

    Example (5 x 0.8 x 0.8 mm, patch 20x320x320): stage 0 kernel [1,3,3] (5 > 2 x 0.8); stages 1-2 halve only
    the in-plane axes (spacing 1.6, 3.2); at stage 3 the in-plane spacing 3.2 is within 2x of 5, so axis 0 is
    halved too (kernel [3,3,3] from stage 2 on) -> strides [1,1,1],[1,2,2],[1,2,2],[2,2,2],[2,2,2],[1,2,2],
    total stride [4, 32, 32]: 2 downsamplings along axis 0 against 5 in-plane.

    Args:
        patch_size: patch in voxels (2 or 3 axes).
        spacing: voxel spacing of those axes in mm.
        **block: other NetworkPlan fields (name, conv_per_stage, residual, deep_supervision).
    """
    ndim = len(patch_size)
    shape = [float(p) for p in patch_size]
    current = [float(s) for s in spacing]
    kernels = [[3 if c <= 2 * min(current) else 1 for c in current]]
    strides = [[1] * ndim]
    while len(strides) < MAX_STAGES[ndim]:
        by_size = [a for a in range(ndim) if shape[a] / 2 >= MIN_FEATURE_MAP]
        if not by_size:
            break
        finest = min(current[a] for a in by_size)
        stride = [2 if a in by_size and current[a] <= 2 * finest else 1 for a in range(ndim)]
        shape = [s / t for s, t in zip(shape, stride)]
        current = [c * t for c, t in zip(current, stride)]
        kernels.append([3 if k == 3 or c <= 2 * min(current) else 1 for k, c in zip(kernels[-1], current)])
        strides.append(stride)
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


def fit_patch(
    median_shape: list[int], spacing: list[float], budget_gb: float, block: dict[str, Any], channels: int, outputs: int
) -> tuple[list[int], NetworkPlan]:
    """Largest patch (with its network) whose batch of 2 fits `budget_gb`.

    Start from the median case shape (already the aspect ratio of the median case in mm), scaled down to at
    most 256^3 voxels, rounded up to a multiple of the network's total stride. While the memory model says
    a batch of 2 does not fit, shrink the axis that is longest in mm by that axis' total stride and re-derive
    the network (a smaller patch may lose a downsampling step, which changes the stride).

    Example (BraTS-like, 4 outputs, 8 GiB): median 140x170x140 -> start 160x192x160 (multiples of 32, ~15 GiB)
    -> 160x160x160 -> 128x160x160 -> 128x128x160 (~8.8 GiB) -> 128x128x128 (~7.3 GiB, fits). If even the
    smallest patch does not fit (a tiny budget), the smallest patch is returned and batch 2 is used anyway.
    """
    ndim = len(median_shape)
    patch = [max(1, int(s)) for s in median_shape]
    scale = min(1.0, (START_PATCH_VOXELS[ndim] / float(np.prod(patch))) ** (1.0 / ndim))
    patch = [max(1, int(round(p * scale))) for p in patch]
    patch, network = snap_to_topology(patch, spacing, block, upward=True)
    while estimate_memory_gb(network, patch, REFERENCE_BATCH, channels, outputs) > budget_gb:
        total = network.total_stride
        shrinkable = [a for a in range(ndim) if patch[a] - total[a] >= MIN_PATCH_AXIS]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: (patch[a] * spacing[a], -a))
        patch = list(patch)
        patch[axis] -= total[axis]
        patch, network = snap_to_topology(patch, spacing, block, upward=False)
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
