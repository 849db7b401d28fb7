"""Overlap counts on the device: predicted and reference masks per class or region, TP/FP/FN, Dice.

Shared by training's pseudo-Dice and the full sliding-window validation; nothing here reads the host until
`dice_from_counts` (one sync per call).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from voxseg.plans import Plan


def class_masks(logits: Tensor, seg: Tensor, plan: Plan) -> tuple[Tensor, Tensor, Tensor | None]:
    """Predicted and reference masks per foreground class (label) or region.

    Args:
        logits: (B, K, *S) network output.
        seg: (B, 1, *S) label values; -1 (outside the crop) is background.
        plan: labels/regions and the ignore label.

    Returns:
        pred, ref: (B, N, *S) bool with N = number of foreground classes/regions; valid: (B, 1, *S) bool or
        None, False on ignore-labelled voxels (excluded from every count).
    """
    seg = seg.long()
    regions = plan.regions
    if plan.is_region_based:
        pred = logits > 0  # sigmoid > 0.5
    else:
        labels = logits.argmax(1, keepdim=True)  # (B, 1, *S) softmax channel; channel i+1 is regions[i]
        channels = torch.arange(1, len(regions) + 1, device=logits.device).view(1, -1, *[1] * (seg.ndim - 2))
        pred = labels == channels
    # comparisons with Python ints: no small host-to-device copies (each would wait for the stream)
    ref = torch.cat([functools.reduce(torch.logical_or, [seg == v for v in r]) for r in regions], dim=1)
    ignore = plan.ignore_label
    valid = None if ignore is None else seg != ignore
    return pred, ref, valid


def overlap_counts(pred: Tensor, ref: Tensor, valid: Tensor | None) -> Tensor:
    """(3, N) true positives, false positives, false negatives per class, summed over batch and space."""
    if valid is not None:
        pred, ref = pred & valid, ref & valid
    dims = [0] + list(range(2, pred.ndim))
    tp = (pred & ref).sum(dims)
    fp = (pred & ~ref).sum(dims)
    fn = (~pred & ref).sum(dims)
    return torch.stack([tp, fp, fn])  # int64: exact for any volume


def dice_from_counts(counts: Tensor | np.ndarray) -> list[float]:
    """2TP / (2TP + FP + FN) per class; NaN where a class is absent from both prediction and reference."""
    tp, fp, fn = (np.asarray(c, dtype=np.float64) for c in torch.as_tensor(counts).cpu().numpy())
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)
    return [float(v) for v in dice]


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
