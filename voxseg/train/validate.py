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

from voxseg.distributed import all_reduce_sum
from voxseg.evaluate.overlap import class_masks, dice_from_counts, nanmean, overlap_counts
from voxseg.plans import Plan


@torch.no_grad()
def pseudo_dice(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], plan: Plan,
                loss_fn: nn.Module | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Pooled Dice per class over validation batches (no augmentation, full-resolution output only).

    Counts and losses stay on the device until the end: one host read per validation. In a distributed run
    each rank passes its share of the batches and the counts, loss sums and batch counts are summed over the
    ranks before dividing, so every rank gets the same metric (and takes the same best-model, schedule and
    early-stopping decisions). The loss runs in eval mode: each validation batch is whole on its rank.

    Returns:
        {"dice": [per class], "dice_mean": float (NaN-free classes), "val_loss": float (NaN without loss_fn)}
    """
    modules = [m for m in (model, loss_fn) if m is not None]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(3, len(plan.regions), dtype=torch.int64, device=device)  # tp, fp, fn per class
    loss_sum = torch.zeros((), device=device)
    num_batches = 0
    try:
        for image, seg in batches:
            with torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                output = model(image)
            logits = (output[0] if isinstance(output, (list, tuple)) else output).float()  # (B, K, *P)
            counts = counts + overlap_counts(*class_masks(logits, seg, plan))
            if loss_fn is not None:
                loss_sum = loss_sum + loss_fn(logits, seg)[0].detach()
            num_batches += 1
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    counts = all_reduce_sum(counts)
    totals = all_reduce_sum(torch.stack([loss_sum, torch.full((), float(num_batches), device=device)]))
    loss_total, total_batches = totals.cpu().tolist()  # host-device sync point (with dice_from_counts)
    if total_batches == 0:
        return {"dice": [math.nan] * len(plan.regions), "dice_mean": math.nan, "val_loss": math.nan}
    dice = dice_from_counts(counts)
    val_loss = loss_total / total_batches if loss_fn is not None else math.nan
    return {"dice": dice, "dice_mean": nanmean(dice), "val_loss": val_loss}
