"""Segmentation losses: Dice, cross-entropy, focal, Tversky and their sums, label- or region-based, with
deep-supervision weighting.

    loss = build_loss("dice_ce", plan)                  # deep supervision on by default
    total, parts = loss(outputs, target)                # outputs: (B, K, *P) logits or [full, 1/2, ...]
    total.backward(); log(parts)                        # parts: {"dice": ..., "ce": ...} detached, on device

`target` is the (B, 1, *P) integer label map straight from the sampler: value -1 (outside the brain crop) is
background; `plan.ignore_label`, when the plan has one, is excluded from every term. Label-based plans use a
softmax over background + labels (Dice excludes background); region-based plans (`plan.is_region_based`) use
one sigmoid per region with region target r_k = isin(target, regions[k]), and "ce" is binary cross-entropy.
All terms are computed in float32 whatever the autocast dtype, and nothing syncs with the host.

Per-class weights (`class_weights`, one per network output: background then the labels for softmax, one per
region for sigmoid outputs) make CE and focal the weighted mean over the voxels, each voxel weighted by its class
(for regions: each region's term by its weight), as `torch.nn.CrossEntropyLoss(weight=...)` does, and Dice and
Tversky the weighted mean of the per-class scores (softmax: over the labels, background has no Dice).
Without them every term is exactly the unweighted mean:

    loss = build_loss("dice_ce", plan, class_weights=[1, 2, 2, 2], focal_gamma=3.0)

Two registries: `LOSS_TERMS` (term name -> function of `TermInputs` giving a scalar) and `LOSSES` (loss name ->
`LossSpec`, the terms it sums with their default weights). A new loss is a registered term and a spec:

    @LOSS_TERMS.register("false_positive", "mean probability given to the wrong classes")
    def false_positive(x: TermInputs) -> Tensor:            # a (0-d) tensor, differentiable
        return (x.probs * (1 - x.onehot)).mean()

    LOSSES.add("dice_fp", LossSpec({"dice": 1.0, "false_positive": 0.5}), "Dice + false positives")

and `loss.name=dice_fp` selects it; `loss.weights=false_positive=0.1` changes a default weight.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxseg.distributed import all_reduce_autograd, all_reduce_mean
from voxseg.errors import ConfigError
from voxseg.lossoptions import TermOptions, per_output
from voxseg.plans import Plan
from voxseg.registry import Registry, unknown_name_message


@dataclass
class TermInputs:
    """What a loss term sees for one output tensor; every tensor is float32 except `index`.

    Attributes:
        logits: (B, K, *P) network output.
        probs: (B, K, *P) softmax over the channels, or one sigmoid per region for region-based plans.
        onehot: (B, K, *P) targets: the one-hot softmax channel, or the membership of each region.
        index: (B, 1, *P) long softmax channel of every voxel; None for region-based plans.
        valid: (B, 1, *P) 1 where the voxel is not the ignore label; None when the plan has no ignore label.
        loss: the `SegmentationLoss` computing the terms, holding their options (smooth, batch_dice,
            class_weights, focal_gamma, focal_alpha, tversky_alpha, tversky_beta) and `region_based`.
    """

    logits: Tensor
    probs: Tensor
    onehot: Tensor
    index: Tensor | None
    valid: Tensor | None
    loss: "SegmentationLoss"

    def overlap(self) -> tuple[Tensor, Tensor, Tensor]:
        """Soft true positives, false positives, false negatives of the foreground classes: (K',) for batch
        Dice, else (B, K'); background is not part of Dice/Tversky for softmax outputs."""
        tp, fp, fn = _overlap_stats(self.probs, self.onehot, self.valid, self.loss.batch_dice)
        if self.loss.batch_dice and self.loss.sync_batch_dice and self.loss.training:
            # the global batch's Dice: sum the statistics of every rank's slice (gradients flow back through it)
            tp, fp, fn = all_reduce_autograd(torch.stack([tp, fp, fn])).unbind(0)
        if not self.loss.region_based:
            tp, fp, fn = tp[..., 1:], fp[..., 1:], fn[..., 1:]
        return tp, fp, fn

    def class_mean(self, score: Tensor) -> Tensor:
        """Mean of a per-class score from `overlap` ((K',) or (B, K')); with class weights the mean over the
        batch of the weighted mean over the classes."""
        weights = self.loss.overlap_weights  # (K',) or None
        if weights is None:
            return score.mean()
        return (score * weights).sum(-1).mean() / weights.sum()

    def voxel_mean(self, per_voxel: Tensor) -> Tensor:
        """Mean of (B, 1|K, *P) over the valid voxels; with class weights the weighted mean, each voxel (for
        regions: each region's channel) weighted by its class. In a distributed training step the normaliser is
        the global batch's, so DDP's gradient average gives the weighted mean of the global batch."""
        weights = self.loss.class_weights  # (K,) or None
        if weights is None:
            return _mean_valid(per_voxel, self.valid)
        if self.loss.region_based:
            voxel_weight = weights.view([1, -1] + [1] * (per_voxel.ndim - 2)).expand_as(per_voxel)
        else:
            voxel_weight = weights[self.index]  # (B, 1, *P) the weight of each voxel's class
        if self.valid is not None:
            voxel_weight = voxel_weight * self.valid
        total = voxel_weight.sum()
        if self.loss.sync_batch_dice and self.loss.training:
            # rank r returns sum_r / mean_r(total): DDP's mean over ranks is then sum / global total
            total = all_reduce_mean(total)
        return (per_voxel * voxel_weight).sum() / total.clamp_min(torch.finfo(torch.float32).tiny)


LossTerm = Callable[[TermInputs], Tensor]
LOSS_TERMS: Registry[LossTerm] = Registry("loss term")


@dataclass(frozen=True)
class LossSpec:
    """A loss: the registered terms it sums and their default weights (`{"dice": 1.0, "ce": 1.0}`)."""

    weights: dict[str, float]

    def __post_init__(self) -> None:
        for term in self.weights:
            LOSS_TERMS.get(term)  # a loss of unregistered terms fails when it is registered


LOSSES: Registry[LossSpec] = Registry("loss")


def loss_weights(name: str, weights: dict[str, float] | None = None) -> dict[str, float]:
    """Loss `name`'s default term weights updated with `weights`; a term the loss does not have is an error."""
    terms = dict(LOSSES.get(name).weights)
    for key, value in (weights or {}).items():
        if key not in terms:
            raise ConfigError(f"loss.weights: loss '{name}' has no term '{key}'; its terms are {', '.join(terms)}")
        terms[key] = float(value)
    return terms


# ----- targets ----------------------------------------------------------------------------------------------
def _lookup_tables(plan: Plan) -> tuple[Tensor, Tensor]:
    """Tables indexed by label value + 1 (so -1 sits at index 0), with one spare row at the end that values
    beyond the table are clamped to, so unknown values become background.

    Returns:
        channel: (V,) long, softmax channel of each label value (background and ignore -> 0).
        regions: (V, R) float, membership of each label value in each region.
    """
    values = [v for region in plan.regions for v in region]
    size = max(values + [plan.ignore_label or 0, 0]) + 3
    channel = torch.zeros(size, dtype=torch.long)
    regions = torch.zeros(size, len(plan.regions))
    for k, region in enumerate(plan.regions):
        channel[region[0] + 1] = k + 1
        for value in region:
            regions[value + 1, k] = 1.0
    return channel, regions


# ----- loss terms (all inputs float32) ----------------------------------------------------------------------
def _overlap_stats(probs: Tensor, onehot: Tensor, valid: Tensor | None, batch: bool) -> tuple[Tensor, Tensor, Tensor]:
    """True positives, false positives, false negatives per class: (K,) for batch Dice, else (B, K)."""
    if valid is not None:
        probs = probs * valid
        onehot = onehot * valid
    dims = [0] + list(range(2, probs.ndim)) if batch else list(range(2, probs.ndim))
    tp = (probs * onehot).sum(dims)
    fp = probs.sum(dims) - tp
    fn = onehot.sum(dims) - tp
    return tp, fp, fn


def _mean_valid(per_voxel: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of (B, 1|K, *P) over the valid voxels (all voxels when nothing is ignored)."""
    if valid is None:
        return per_voxel.mean()
    mask = valid.expand_as(per_voxel)
    return (per_voxel * mask).sum() / mask.sum().clamp_min(1.0)


@LOSS_TERMS.register("dice", "1 - soft Dice of the foreground classes (batch Dice by default)")
def dice(x: TermInputs) -> Tensor:
    tp, fp, fn = x.overlap()
    smooth = x.loss.smooth
    return 1.0 - x.class_mean((2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8))


@LOSS_TERMS.register("tversky", "1 - Tversky index: Dice with false positives / negatives weighted alpha / beta")
def tversky(x: TermInputs) -> Tensor:
    tp, fp, fn = x.overlap()
    smooth = x.loss.smooth
    denominator = tp + x.loss.tversky_alpha * fp + x.loss.tversky_beta * fn + smooth
    return 1.0 - x.class_mean((tp + smooth) / denominator.clamp_min(1e-8))


@LOSS_TERMS.register("ce", "cross-entropy (binary cross-entropy per region for region-based plans)")
def cross_entropy(x: TermInputs) -> Tensor:
    if x.loss.region_based:
        per_voxel = F.binary_cross_entropy_with_logits(x.logits, x.onehot, reduction="none")
    else:
        per_voxel = F.cross_entropy(x.logits, x.index[:, 0], reduction="none").unsqueeze(1)
    return x.voxel_mean(per_voxel)


@LOSS_TERMS.register("focal", "focal loss -alpha_t (1 - p_t)^gamma log p_t")
def focal(x: TermInputs) -> Tensor:
    """Per voxel -alpha_t (1 - p_t)^gamma log p_t: (B, 1, *P) softmax, (B, R, *P) sigmoid, then the mean."""
    logits, onehot, index = x.logits, x.onehot, x.index
    if x.loss.region_based:
        log_pt = -F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        pt = x.probs * onehot + (1 - x.probs) * (1 - onehot)
    else:
        log_pt = torch.log_softmax(logits, 1).gather(1, index)
        pt = x.probs.gather(1, index)
    loss = -((1 - pt) ** x.loss.focal_gamma) * log_pt
    alpha = x.loss.focal_alpha
    if alpha is not None:
        shape = [1, -1] + [1] * (logits.ndim - 2)
        if x.loss.region_based:
            a = alpha.view(shape) if alpha.ndim else alpha
            loss = loss * (a * onehot + (1 - a) * (1 - onehot))
        elif alpha.ndim:
            loss = loss * alpha[index]
        else:  # one float: weight alpha on foreground voxels, 1 - alpha on background
            loss = loss * torch.where(index > 0, alpha, 1 - alpha)
    return x.voxel_mean(loss)


LOSSES.add("dice_ce", LossSpec({"dice": 1.0, "ce": 1.0}), "Dice + cross-entropy (nnU-Net's default)")
LOSSES.add("dice", LossSpec({"dice": 1.0}), "soft Dice")
LOSSES.add("ce", LossSpec({"ce": 1.0}), "cross-entropy")
LOSSES.add("focal", LossSpec({"focal": 1.0}), "focal loss")
LOSSES.add("tversky", LossSpec({"tversky": 1.0}), "Tversky loss (alpha 0.3 on false positives, beta 0.7 on misses)")
LOSSES.add("dice_focal", LossSpec({"dice": 1.0, "focal": 1.0}), "Dice + focal loss")


class SegmentationLoss(nn.Module):
    """Weighted sum of registered terms for one output tensor; returns (total, {term: detached value}).

    Args:
        plan: gives label values / regions, the ignore label and whether outputs are sigmoid or softmax.
        weights: term name -> weight; the terms are those of the chosen loss (`LOSSES`, `loss_weights`).
        options: the terms' options (`voxseg.lossoptions.TermOptions`: smooth, batch_dice, class_weights,
            focal_gamma, focal_alpha, tversky_alpha, tversky_beta); per-output lists are checked against the
            plan's outputs here.
        sync_batch_dice: in a distributed run, all-reduce the batch Dice statistics over the ranks (in training
            mode only), so Dice/Tversky are those of the global batch as in a single process; mean-reduced
            terms (CE, focal) need nothing: DDP averages their gradients (with class weights, the normaliser of
            their weighted mean is all-reduced too). Training sets it under torchrun.
    """

    def __init__(self, plan: Plan, weights: dict[str, float], options: TermOptions | None = None,
                 sync_batch_dice: bool = False) -> None:
        super().__init__()
        options = options or TermOptions()
        self.weights = dict(weights)
        self.terms = {name: LOSS_TERMS.get(name) for name in self.weights}  # resolved once, at build time
        self.region_based = plan.is_region_based
        self.ignore_label = plan.ignore_label
        self.num_outputs = plan.num_outputs
        self.smooth, self.batch_dice = options.smooth, bool(options.batch_dice)
        self.sync_batch_dice = bool(sync_batch_dice)
        self.focal_gamma, self.tversky_alpha, self.tversky_beta = (options.focal_gamma, options.tversky_alpha,
                                                                   options.tversky_beta)
        channel_table, region_table = _lookup_tables(plan)
        self.register_buffer("channel_table", channel_table, persistent=False)
        self.register_buffer("region_table", region_table, persistent=False)
        class_weights = None if options.class_weights is None else torch.tensor(
            per_output(options.class_weights, plan, "loss.class_weights"))
        overlap_weights = class_weights if self.region_based or class_weights is None else class_weights[1:]
        if overlap_weights is not None and overlap_weights.sum() <= 0 and {"dice", "tversky"} & set(self.terms):
            raise ConfigError(f"loss.class_weights={list(options.class_weights)} gives every label weight 0: Dice "
                              "and Tversky average over the labels (background has no Dice); weight one > 0")
        self.register_buffer("class_weights", class_weights, persistent=False)  # (K,)
        self.register_buffer("overlap_weights", overlap_weights, persistent=False)  # (K',) the classes Dice sees
        alpha = options.focal_alpha
        if isinstance(alpha, tuple):
            alpha = per_output(alpha, plan, "loss.focal_alpha")
        self.register_buffer("focal_alpha", None if alpha is None else torch.tensor(alpha), persistent=False)

    def forward(self, output: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """output (B, K, *P) logits, target (B, 1, *P) integer labels."""
        if not isinstance(output, Tensor):
            raise TypeError("this loss takes one output tensor; build it with deep_supervision=True for a list")
        if output.shape[1] != self.num_outputs:
            raise ValueError(f"output has {output.shape[1]} channels; the plan's network has {self.num_outputs}")
        logits = output.float()  # float32 statistics even under bf16/fp16 autocast
        target = target.long()
        valid = None if self.ignore_label is None else (target != self.ignore_label).float()  # (B, 1, *P)
        row = (target + 1).clamp(0, len(self.channel_table) - 1)  # (B, 1, *P) table rows
        if self.region_based:
            onehot, index = self.region_table[row[:, 0]].movedim(-1, 1), None  # (B, R, *P) = isin per region
            probs = torch.sigmoid(logits)
        else:
            index = self.channel_table[row]  # (B, 1, *P) softmax channel of every voxel
            onehot = torch.zeros_like(logits).scatter_(1, index, 1.0)  # (B, K, *P)
            probs = torch.softmax(logits, 1)
        inputs = TermInputs(logits, probs, onehot, index, valid, self)
        parts = {name: term(inputs) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}


class DeepSupervisionLoss(nn.Module):
    """Applies a loss to every deep-supervision output with weights 1, 1/2, 1/4, ... (normalised to sum 1).

    The lowest-resolution output gets weight 0, as in nnU-Net: it is too coarse to help. It still takes part
    (times 0) so its head receives a (zero) gradient and DDP sees every parameter used. The target is
    downsampled to each output's shape by nearest-neighbour selection.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.fixed_weights = None if weights is None else [float(w) for w in weights]

    def output_weights(self, num_outputs: int) -> list[float]:
        if self.fixed_weights is not None:
            if len(self.fixed_weights) != num_outputs:
                raise ConfigError(
                    f"deep supervision weights have {len(self.fixed_weights)} entries but the network gives "
                    f"{num_outputs} outputs"
                )
            weights = list(self.fixed_weights)
        else:
            weights = [0.5**i for i in range(num_outputs)]
            if num_outputs > 1:
                weights[-1] = 0.0
        total = sum(weights)
        return [w / total for w in weights]

    def forward(self, output: Tensor | Sequence[Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(output, Tensor):
            return self.loss(output, target)
        weights = self.output_weights(len(output))
        total: Tensor | float = 0.0
        parts: dict[str, Tensor] = {}
        for w, out in zip(weights, output):
            value, components = self.loss(out, downsample_target(target, out.shape[2:]))
            total = total + w * value
            for name, v in components.items():
                parts[name] = parts[name] + w * v if name in parts else w * v
        return total, parts


def downsample_target(target: Tensor, shape: Sequence[int]) -> Tensor:
    """(B, 1, *P) labels -> (B, 1, *shape) by nearest neighbour; strided indexing when P divides evenly."""
    size = tuple(target.shape[2:])
    shape = tuple(int(s) for s in shape)
    if size == shape:
        return target
    if all(p % s == 0 for p, s in zip(size, shape)):
        # Picks voxel i * factor, exactly what nearest interpolation does, without a float round trip.
        return target[(slice(None), slice(None)) + tuple(slice(None, None, p // s) for p, s in zip(size, shape))]
    return F.interpolate(target.float(), size=shape, mode="nearest-exact").to(target.dtype)


def build_loss(
    name: str,
    plan: Plan,
    weights: dict[str, float] | None = None,
    deep_supervision: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Loss `name` (registered in `LOSSES`: "dice_ce", "dice", "ce", "focal", "tversky", "dice_focal", ...) for
    `plan`'s outputs.

    Args:
        weights: term weights, e.g. {"dice": 1.0, "ce": 0.5}; keys must be terms of the loss.
        deep_supervision: accept the network's list of outputs and weight them (a single tensor still works).
        **kwargs: the terms' options (`TermOptions`: smooth, batch_dice, class_weights, focal_gamma,
            focal_alpha, tversky_alpha, tversky_beta), `sync_batch_dice` (see `SegmentationLoss`) and
            `ds_weights` (explicit per-output deep-supervision weights).

    Raises:
        ConfigError: an unknown loss, term or option, an invalid value, or a per-output list (class_weights,
            focal_alpha) whose length is not the plan's number of outputs.
    """
    ds_weights = kwargs.pop("ds_weights", None)
    sync_batch_dice = kwargs.pop("sync_batch_dice", False)
    valid = [item.name for item in dataclasses.fields(TermOptions)]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(unknown_name_message("loss option", key, valid + ["sync_batch_dice", "ds_weights"]))
    loss: nn.Module = SegmentationLoss(plan, loss_weights(name, weights), TermOptions(**kwargs), sync_batch_dice)
    return DeepSupervisionLoss(loss, ds_weights) if deep_supervision else loss
