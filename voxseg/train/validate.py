"""Validation during training: pseudo-Dice on random validation patches.

Pseudo-Dice (as in nnU-Net) pools true/false positives and false negatives over all validation patches of
an epoch before dividing, so it is a cheap, smooth signal for choosing the best checkpoint; it is not the
per-case Dice that the full sliding-window validation (`voxseg.infer.validation`) reports.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from voxseg.evaluate.overlap import class_masks, dice_from_counts, nanmean, overlap_counts
from voxseg.plans import Plan


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
