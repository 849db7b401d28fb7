"""Validation: pseudo-Dice on random validation patches during training, full volumes at the end.

Pseudo-Dice (as in nnU-Net) pools true/false positives and false negatives over all validation patches of
an epoch before dividing, so it is a cheap, smooth signal for choosing the best checkpoint; it is not the
per-case Dice that the full sliding-window validation reports.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from voxseg.plans import Plan
from voxseg.jsonio import write_json_atomic
from voxseg.data.io import Geometry, write_image
from voxseg.data.preprocess import restore_to_original
from voxseg.data.store import load_case
from voxseg.infer.postprocess import logits_to_labels
from voxseg.infer.sliding_window import sliding_window_inference


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


@torch.no_grad()
def pseudo_dice(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], plan: Plan,
                loss_fn: nn.Module | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Pooled Dice per class over validation batches (no augmentation, full-resolution output only).

    Counts and losses stay on the device until the end: one host read per validation.

    Returns:
        {"dice": [per class], "dice_mean": float (NaN-free classes), "val_loss": float (NaN without loss_fn)}
    """
    was_training = model.training
    model.eval()
    counts: Tensor | None = None
    loss_sum: Tensor | None = None
    num_batches = 0
    try:
        for image, seg in batches:
            with torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                output = model(image)
            logits = (output[0] if isinstance(output, (list, tuple)) else output).float()  # (B, K, *P)
            batch_counts = overlap_counts(*class_masks(logits, seg, plan))
            counts = batch_counts if counts is None else counts + batch_counts
            if loss_fn is not None:
                loss = loss_fn(logits, seg)[0].detach()
                loss_sum = loss if loss_sum is None else loss_sum + loss
            num_batches += 1
    finally:
        model.train(was_training)
    if counts is None:
        return {"dice": [math.nan] * len(plan.regions), "dice_mean": math.nan, "val_loss": math.nan}
    dice = dice_from_counts(counts)  # host-device sync point
    val_loss = float(loss_sum) / num_batches if loss_sum is not None else math.nan
    return {"dice": dice, "dice_mean": nanmean(dice), "val_loss": val_loss}


@torch.no_grad()
def full_validation(model: nn.Module, plan: Plan, preprocessed_dir: str | Path, names: Sequence[str],
                    out_dir: str | Path, device: torch.device | str, patch_size: Sequence[int],
                    amp_dtype: torch.dtype | None = None, step: float = 0.5, tile_batch: int = 2,
                    write: bool = True) -> dict[str, Any]:
    """Sliding-window prediction of each preprocessed validation case and its Dice on the preprocessed grid.

    Each prediction is mapped back to its raw image's grid (undo resampling and cropping) and written as
    `out_dir/CASE{plan.file_ending}` with the raw geometry, so `voxseg evaluate --crossval` can score the folds
    against labelsTr; the Dice table goes to `out_dir/summary.json` (when `write`).

    Returns:
        {"per_case": {case: {class: dice}}, "mean": {class: mean Dice over cases}, "mean_dice": float}
        where a class absent from a case's reference and prediction does not count towards its mean.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    per_case: dict[str, dict[str, float]] = {}
    try:
        for name in names:
            image, seg, properties = load_case(preprocessed_dir, name, mmap=True)
            x = torch.from_numpy(np.array(image, dtype=np.float32))[None].to(device)  # (1, C, d, h, w)
            logits = sliding_window_inference(model, x, patch_size, plan.num_outputs, step=step,
                                              tile_batch=tile_batch, amp_dtype=amp_dtype)  # (K, d, h, w)
            if seg is not None:
                ref = torch.from_numpy(np.array(seg)).to(logits.device)[None]  # (1, 1, d, h, w)
                counts = overlap_counts(*class_masks(logits[None], ref, plan))
                per_case[name] = dict(zip(plan.class_names, dice_from_counts(counts)))
            if write:
                labels, _ = logits_to_labels(logits, plan)
                write_image(out_dir / f"{name}{plan.file_ending}",
                            restore_to_original(labels, properties, is_label=True, device=labels.device),
                            Geometry.from_list(properties["affine"]))
    finally:
        model.train(was_training)
    mean = {c: nanmean([d[c] for d in per_case.values()]) for c in plan.class_names}
    result = {"per_case": per_case, "mean": mean, "mean_dice": nanmean(list(mean.values()))}
    if write:
        write_json_atomic(out_dir / "summary.json", _json_safe(result))
    return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
