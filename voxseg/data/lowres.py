"""The 3d_lowres configuration: nnU-Net's rule for images much larger than the full-resolution patch.

When the 3d_fullres patch covers less than a quarter of the median case's voxels, the network sees too
little context; a second configuration at a coarser spacing sees more of the image per patch (and is the
first stage of the 3d_cascade_fullres cascade). The spacing is made coarser by 3% per step (nnU-Net 2.8.1's
factor; earlier versions used 1%), first only along the axes finer than half the coarsest one (bringing an
anisotropic dataset towards isotropy), then along every axis, and the whole configuration (patch, network,
batch) is planned again at each step until its patch covers at least a quarter of the median case at that
spacing. The result is dropped when it shrinks the median case by less than half (not worth a stage).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from voxseg.plans import Plan

LOWRES_COVERAGE = 0.25  # plan 3d_lowres when the fullres patch holds less than 25% of the median case's voxels
LOWRES_SPACING_STEP = 1.03  # spacing increase per step
LOWRES_MIN_REDUCTION = 2.0  # keep 3d_lowres only if the median case has at least 2x fewer voxels than at fullres
FINE_AXIS_RATIO = 2.0  # axes finer than 1/2 of the coarsest spacing are made coarser first


def plan_lowres(
    fullres: Plan,
    plan_at: Callable[[list[float], list[int], float], Plan],
    dataset_voxels: float,
) -> Plan | None:
    """The 3d_lowres plan for a 3d_fullres plan, or None (`decide_lowres` says why)."""
    return decide_lowres(fullres, plan_at, dataset_voxels)[0]


def decide_lowres(
    fullres: Plan,
    plan_at: Callable[[list[float], list[int], float], Plan],
    dataset_voxels: float,
) -> tuple[Plan | None, str]:
    """The 3d_lowres plan for a 3d_fullres plan and "", or None and why it was not planned: the full-resolution
    patch is large enough, or the coarser spacing shrinks the median case too little.

    Args:
        fullres: the 3d_fullres plan (target spacing, median shape, patch).
        plan_at: plans a configuration for (spacing, median shape, dataset voxels) at that spacing.
        dataset_voxels: the dataset's voxels at the full-resolution spacing (the batch's 5% cap).

    Example (one CT channel, 3 outputs, 8 GiB; 2.5 x 0.8 x 0.8 mm, median 400 x 512 x 512 voxels): 3d_fullres
    is patch 112x128x128, 2% of the median case. The in-plane spacing (finer than half of 2.5) grows alone
    for 16 steps (0.8 -> 1.284 mm, when 2.5 / 1.284 <= 2), then every axis for 17 more (x 1.653): spacing
    4.13 x 2.12 x 2.12, median 242x193x193, patch 160x128x112 (25%), as nnU-Net 2.8.1 plans it.
    """
    full_spacing = np.asarray(fullres.target_spacing, dtype=np.float64)
    median = np.asarray(fullres.median_shape_after_resample, dtype=np.float64)
    median_voxels = float(np.prod(median))
    patch_voxels = float(math.prod(fullres.patch_size))
    spacing = full_spacing.copy()
    lowres = None
    while patch_voxels / median_voxels < LOWRES_COVERAGE:
        fine = spacing.max() / spacing > FINE_AXIS_RATIO
        if fine.any():
            spacing[fine] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        scaled = full_spacing / spacing * median  # the median case at this spacing (voxels, not rounded)
        median_voxels = float(np.prod(scaled))
        lowres = plan_at([float(s) for s in spacing], [int(round(s)) for s in scaled],
                         dataset_voxels * float(np.prod(full_spacing / spacing)))
        patch_voxels = float(math.prod(lowres.patch_size))
    full_coverage = float(math.prod(fullres.patch_size)) / float(np.prod(median))
    verb = "covers" if full_coverage < 1 else "has"  # a patch larger than the median case: its voxel ratio
    covers = f"the 3d_fullres patch {_fmt(fullres.patch_size)} {verb} {full_coverage:.0%} of " \
             f"{'the' if full_coverage < 1 else 'the voxels of the'} median case " \
             f"{_fmt(fullres.median_shape_after_resample)}"
    if lowres is None:
        return None, f"{covers} (>= {LOWRES_COVERAGE:.0%})"
    reduction = float(np.prod(median)) / median_voxels
    if reduction < LOWRES_MIN_REDUCTION:
        return None, (f"{covers} (< {LOWRES_COVERAGE:.0%}), but at the spacing where a patch covers "
                      f"{LOWRES_COVERAGE:.0%} of it ({_fmt(lowres.target_spacing)} mm, patch "
                      f"{_fmt(lowres.patch_size)}) the median case has only {reduction:.2f}x fewer voxels "
                      f"(< {LOWRES_MIN_REDUCTION:g}x): not worth a second stage")
    return lowres, ""


def _fmt(values: list[int] | list[float]) -> str:
    return "x".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)
