"""Overlap and surface metrics for binary masks: Dice, IoU, HD95, normalised surface Dice (NSD), volume.

All masks are boolean arrays in array axis order (D, H, W); `spacing` is the voxel size in mm in the same order.

Surface definition:
    The surface of a mask is the set of its voxels that have at least one background voxel among their 26
    neighbours: ``mask & ~binary_erosion(mask, structure=3x3x3 ones, border_value=0)``. Full connectivity
    makes edge and corner voxels part of the surface, so no thin diagonal gap is left in it; voxels on the
    image border count as surface (the outside of the image is background).

Surface distances:
    For each surface voxel of one mask, the Euclidean distance in mm to the nearest surface voxel of the other
    mask (the value `scipy.ndimage.distance_transform_edt` with ``sampling=spacing`` gives there). The symmetric
    set is the union of both directions (pred -> ref and ref -> pred).

    - HD95: 95th percentile (numpy's linear interpolation) of the symmetric set.
    - NSD (normalised surface Dice at tolerance tau): (#pred surface voxels within tau of the ref surface +
      #ref surface voxels within tau of the pred surface) / (#pred surface + #ref surface); "within" is <= tau.

Empty masks (also returned as a table by `conventions()`):

    ==================  ====  ====  ==================================  ====
    case                Dice  IoU   HD95                                NSD
    ==================  ====  ====  ==================================  ====
    both empty          1     1     0                                   1
    exactly one empty   0     0     NaN (default) or image diagonal mm  0
    ==================  ====  ====  ==================================  ====

    A NaN HD95 is excluded from means; evaluations report how many cases had one (`n_hd95_nan`). With
    ``one_empty_hd95="diagonal"`` the worst possible distance in the image (its diagonal in mm) is used instead.

Speed: surfaces are found only in the bounding box of both masks plus a one-voxel margin, which gives the same
surfaces as the full volume (every voxel of either mask lies inside that box); the distances come from a
nearest-neighbour search (a k-d tree) over the surface voxels' positions in mm, not from a distance transform of
the box, so their cost grows with the surfaces rather than the volume: a whole-body CT organ's box holds tens of
millions of voxels, its surface a few hundred thousand (BENCHMARKS.md "Surface distances"). Where the surfaces
fill half the box or more (a speckled prediction), two distance transforms of the box are cheaper and are used.
The values are the distance transform's, to rounding (tests/test_metrics.py). `surface_distances` is computed
once per class by `compute_case_metrics` and shared by HD95 and NSD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from voxseg.configtree import replace_fields
from voxseg.errors import ConfigError, InputError

HD95_ONE_EMPTY_CHOICES = ("nan", "diagonal")


def conventions(one_empty_hd95: str = "nan") -> dict[str, Any]:
    """The metric definitions and empty-mask values, as stored in every summary.json."""
    _check_one_empty(one_empty_hd95)
    hd95_one_empty = "NaN (excluded from means, counted)" if one_empty_hd95 == "nan" else "image diagonal in mm"
    return {
        "both_empty": {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0},
        "one_empty": {"dice": 0.0, "iou": 0.0, "hd95": hd95_one_empty, "nsd": 0.0},
        "surface": "mask minus its erosion with a 3x3x3 (26-neighbour) structure; image border is background",
        "hd95": "95th percentile (linear interpolation) of the union of both directed surface distance sets, mm",
        "nsd": "fraction of both surfaces' voxels within tolerance_mm (<=) of the other surface",
        "means": "NaN values are excluded from means; n_hd95_nan counts them",
    }


def _check_one_empty(one_empty_hd95: str) -> None:
    if one_empty_hd95 not in HD95_ONE_EMPTY_CHOICES:
        raise ConfigError(f"one_empty_hd95='{one_empty_hd95}' is not one of {', '.join(HD95_ONE_EMPTY_CHOICES)}")


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel counts (tp, fp, fn, tn) of two binary masks."""
    pred, ref = _as_masks(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    pred_count, ref_count = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fp, fn = pred_count - tp, ref_count - tp
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def _dice_from_counts(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def _iou_from_counts(tp: int, fp: int, fn: int) -> float:
    denominator = tp + fp + fn
    return 1.0 if denominator == 0 else tp / denominator


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P|+|R|); 1 when both are empty."""
    tp, fp, fn, _ = confusion(pred, ref)
    return _dice_from_counts(tp, fp, fn)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P∩R| / |P∪R|; 1 when both are empty."""
    tp, fp, fn, _ = confusion(pred, ref)
    return _iou_from_counts(tp, fp, fn)


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a mask in millilitres (1 ml = 1000 mm^3)."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the largest distance two voxels of it can have (about)."""
    return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing, float)) ** 2)))


SURFACE_CONNECTIVITY = ("full", "face")  # erosion neighbourhood: 26 (3D) / 8 (2D) neighbours, or 6 / 4
HD95_MODES = ("pooled", "max_directed")
# a k-d tree search costs about twice per surface voxel what a distance transform costs per voxel of the box
# (measured on a 300 x 512 x 512 CT case, BENCHMARKS.md "Surface distances"): the tree is used while the surfaces
# hold fewer voxels than half the box
KDTREE_COST_RATIO = 2.0  # percentile of both directions together, or the larger directed one


def surface(mask: np.ndarray, connectivity: str = "full") -> np.ndarray:
    """Surface voxels of a mask: the mask minus its erosion (see the module docstring).

    Args:
        connectivity: "full" erodes with every neighbour (voxseg's surface, no diagonal gaps), "face" with the
            face neighbours only (scipy's default structure, the surface MONAI's `get_mask_edges` uses).
    """
    mask = np.asarray(mask, dtype=bool)
    if connectivity not in SURFACE_CONNECTIVITY:
        raise ValueError(f"surface connectivity '{connectivity}' is unknown; use {' or '.join(SURFACE_CONNECTIVITY)}")
    rank = mask.ndim if connectivity == "full" else 1
    structure = ndimage.generate_binary_structure(mask.ndim, rank)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_bbox(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks grown by one voxel (clipped to the image), as slices."""
    either = pred | ref
    slices = []
    for axis in range(either.ndim):
        other_axes = tuple(a for a in range(either.ndim) if a != axis)
        present = np.flatnonzero(np.any(either, axis=other_axes))
        slices.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, either.shape[axis])))
    return tuple(slices)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], connectivity: str = "full"
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm (surfaces by `surface(mask, connectivity)`).

    Returns:
        (pred_to_ref, ref_to_pred): for every surface voxel of `pred` the distance to the nearest surface voxel of
        `ref`, and the other way round. Both are empty arrays when either mask is empty.
    """
    pred, ref = _as_masks(pred, ref)
    if len(spacing) != pred.ndim:
        raise InputError(f"spacing {tuple(spacing)} must have one entry per array axis of shape {pred.shape}")
    if not pred.any() or not ref.any():
        return np.zeros(0), np.zeros(0)
    # the crop keeps every surface voxel and, thanks to the margin, the same erosion at the crop edges
    box = _union_bbox(pred, ref)
    pred_surface, ref_surface = surface(pred[box], connectivity), surface(ref[box], connectivity)
    sampling = np.asarray([float(s) for s in spacing])
    surface_voxels = np.count_nonzero(pred_surface) + np.count_nonzero(ref_surface)
    if surface_voxels * KDTREE_COST_RATIO >= pred_surface.size:
        # surfaces that fill much of their box (speckled predictions): two distance transforms of the box are cheaper
        return (ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface],
                ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface])
    # nearest-neighbour search among the surface voxels (in mm): the distance transform's values, at a cost that
    # grows with the surfaces, not with the volume they enclose
    pred_points, ref_points = np.argwhere(pred_surface) * sampling, np.argwhere(ref_surface) * sampling
    distance_to_ref = cKDTree(ref_points).query(pred_points, k=1)[0]
    distance_to_pred = cKDTree(pred_points).query(ref_points, k=1)[0]
    return distance_to_ref, distance_to_pred


def _hd95_from_distances(
    pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, pred_empty: bool, ref_empty: bool, diagonal_mm: float,
    one_empty_hd95: str, mode: str = "pooled",
) -> float:
    if pred_empty and ref_empty:
        return 0.0
    if pred_empty or ref_empty:
        return float("nan") if one_empty_hd95 == "nan" else diagonal_mm
    if mode == "max_directed":  # MONAI's symmetric HD95: the larger of the two directed 95th percentiles
        return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))
    return float(np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95))


def _nsd_from_distances(
    pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, pred_empty: bool, ref_empty: bool, tolerance_mm: float
) -> float:
    if pred_empty and ref_empty:
        return 1.0
    if pred_empty or ref_empty:
        return 0.0
    within = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)
    return float(within) / float(pred_to_ref.size + ref_to_pred.size)


def hausdorff95(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], one_empty_hd95: str = "nan"
) -> float:
    """95th percentile Hausdorff distance in mm (symmetric surface distances; see the module docstring).

    Args:
        one_empty_hd95: value when exactly one mask is empty: "nan" or "diagonal" (the image diagonal in mm).
    """
    _check_one_empty(one_empty_hd95)
    pred, ref = _as_masks(pred, ref)
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    diagonal = image_diagonal_mm(pred.shape, spacing)
    return _hd95_from_distances(pred_to_ref, ref_to_pred, not pred.any(), not ref.any(), diagonal, one_empty_hd95)


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 1.0) -> float:
    """Normalised surface Dice: fraction of both surfaces within `tolerance_mm` of the other surface."""
    pred, ref = _as_masks(pred, ref)
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    return _nsd_from_distances(pred_to_ref, ref_to_pred, not pred.any(), not ref.any(), tolerance_mm)


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    one_empty_hd95: str = "nan",
    surface_connectivity: str = "full",
    hd95_mode: str = "pooled",
) -> dict[str, float | int]:
    """All metrics of one pair of binary masks, computing the surface distances once.

    Args:
        surface_connectivity: "full" or "face" (see `surface`).
        hd95_mode: "pooled" (percentile of both directions together) or "max_directed" (the larger directed
            percentile, as MONAI computes it).

    Returns:
        dict with dice, iou, hd95, nsd, tp, fp, fn, tn, pred_volume_ml, ref_volume_ml.
    """
    _check_one_empty(one_empty_hd95)
    pred, ref = _as_masks(pred, ref)
    tp, fp, fn, tn = confusion(pred, ref)
    pred_empty, ref_empty = tp + fp == 0, tp + fn == 0
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95 mode '{hd95_mode}' is unknown; use {' or '.join(HD95_MODES)}")
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing, surface_connectivity)
    diagonal = image_diagonal_mm(pred.shape, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "dice": _dice_from_counts(tp, fp, fn),
        "iou": _iou_from_counts(tp, fp, fn),
        "hd95": _hd95_from_distances(pred_to_ref, ref_to_pred, pred_empty, ref_empty, diagonal, one_empty_hd95,
                                     hd95_mode),
        "nsd": _nsd_from_distances(pred_to_ref, ref_to_pred, pred_empty, ref_empty, tolerance_mm),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "pred_volume_ml": (tp + fp) * voxel_ml,
        "ref_volume_ml": (tp + fn) * voxel_ml,
    }


@dataclass(frozen=True)
class MetricOptions:
    """How the distance metrics of one case are computed (the defaults: voxseg's convention)."""

    tolerance_mm: float = 1.0
    """NSD tolerance in mm."""
    one_empty_hd95: str = "nan"
    """HD95 when exactly one mask is empty: "nan" or "diagonal", see `hausdorff95`."""
    surface_connectivity: str = "full"
    """"full" or "face" surface voxels (see `surface`; set by the evaluation convention)."""
    hd95_mode: str = "pooled"
    """"pooled" or "max_directed" (see `binary_metrics`; set by the evaluation convention)."""


def compute_case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float],
    classes: dict[str, list[int]],
    options: MetricOptions | None = None,
    ignore_value: int | None = None,
    **fields: Any,
) -> dict[str, dict[str, float | int]]:
    """Metrics of every class (a label or a region) of one case.

    Args:
        pred_labels, ref_labels: (D, H, W) integer label maps.
        spacing: voxel size in mm, array axis order.
        classes: name -> label values forming the class, e.g. {"liver": [1], "whole_tumor": [1, 2, 3]}.
        options, fields: how distances are scored (`MetricOptions`); `fields` replace single ones, e.g.
            `tolerance_mm=2.0`.
        ignore_value: label value in the reference whose voxels are left out of every metric (treated as
            background in both masks), like nnU-Net's ignore label.

    Returns:
        name -> `binary_metrics` dict.
    """
    options = replace_fields(options or MetricOptions(), "metric option", **fields)
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise InputError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}")
    valid = None if ignore_value is None else ref_labels != ignore_value
    out = {}
    for name, values in classes.items():
        pred_mask, ref_mask = np.isin(pred_labels, values), np.isin(ref_labels, values)
        if valid is not None:
            pred_mask &= valid
            ref_mask &= valid
        out[name] = binary_metrics(pred_mask, ref_mask, spacing, options.tolerance_mm, options.one_empty_hd95,
                                   options.surface_connectivity, options.hd95_mode)
    return out
