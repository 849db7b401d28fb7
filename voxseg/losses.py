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
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxseg.plans import Plan
from voxseg.errors import ConfigError
from voxseg.registry import Registry, unknown_name_message

LOSSES: Registry[nn.Module] = Registry("loss")

# Loss name -> default term weights. The terms a loss is made of are exactly the keys here.
LOSS_TERMS: dict[str, dict[str, float]] = {
    "dice_ce": {"dice": 1.0, "ce": 1.0},
    "dice": {"dice": 1.0},
    "ce": {"ce": 1.0},
    "focal": {"focal": 1.0},
    "tversky": {"tversky": 1.0},
    "dice_focal": {"dice": 1.0, "focal": 1.0},
}


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


def region_targets(target: Tensor, regions: Sequence[Sequence[int]]) -> Tensor:
    """(B, 1, *P) label map -> (B, R, *P) float32 with r_k = isin(target, regions[k]).

    Comparisons with Python ints: `torch.tensor(values, device=cuda)` would be a blocking copy per region.
    """
    masks = [functools.reduce(torch.logical_or, [target == int(v) for v in r]) for r in regions]
    return torch.cat(masks, 1).float()


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


class SegmentationLoss(nn.Module):
    """Weighted sum of named terms for one output tensor; returns (total, {term: detached value}).

    Args:
        plan: gives label values / regions, the ignore label and whether outputs are sigmoid or softmax.
        weights: term name -> weight; the terms are those of the chosen loss (`LOSS_TERMS`).
        smooth: added to Dice/Tversky numerator and denominator.
        batch_dice: Dice statistics summed over the batch (nnU-Net's batch Dice) instead of per sample.
        focal_gamma, focal_alpha: focal loss focusing exponent and optional class weight (float: weight of the
            positive/foreground side; list: one weight per output channel).
        tversky_alpha, tversky_beta: Tversky weights of false positives and false negatives.
    """

    def __init__(
        self,
        plan: Plan,
        weights: dict[str, float],
        smooth: float = 1e-5,
        batch_dice: bool = True,
        focal_gamma: float = 2.0,
        focal_alpha: float | Sequence[float] | None = None,
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
    ) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.region_based = plan.is_region_based
        self.ignore_label = plan.ignore_label
        self.num_outputs = plan.num_outputs
        self.smooth, self.batch_dice = float(smooth), bool(batch_dice)
        self.focal_gamma, self.tversky_alpha, self.tversky_beta = float(focal_gamma), tversky_alpha, tversky_beta
        channel_table, region_table = _lookup_tables(plan)
        self.register_buffer("channel_table", channel_table, persistent=False)
        self.register_buffer("region_table", region_table, persistent=False)
        alpha = None if focal_alpha is None else torch.as_tensor(focal_alpha, dtype=torch.float32)
        if alpha is not None and alpha.ndim == 1 and len(alpha) != self.num_outputs:
            raise ConfigError(f"focal_alpha has {len(alpha)} entries; the network has {self.num_outputs} outputs")
        self.register_buffer("focal_alpha", alpha, persistent=False)

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
        parts = {}
        for name in self.weights:
            parts[name] = self._term(name, logits, probs, onehot, index, valid)
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}

    def _term(
        self, name: str, logits: Tensor, probs: Tensor, onehot: Tensor, index: Tensor | None, valid: Tensor | None
    ) -> Tensor:
        if name == "ce":
            if self.region_based:
                per_voxel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            else:
                per_voxel = F.cross_entropy(logits, index[:, 0], reduction="none").unsqueeze(1)
            return _mean_valid(per_voxel, valid)
        if name == "focal":
            return _mean_valid(self._focal(logits, probs, onehot, index), valid)
        tp, fp, fn = _overlap_stats(probs, onehot, valid, self.batch_dice)
        if not self.region_based:  # background is not part of the Dice/Tversky average
            tp, fp, fn = tp[..., 1:], fp[..., 1:], fn[..., 1:]
        if name == "dice":
            score = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth).clamp_min(1e-8)
        else:  # tversky
            denominator = tp + self.tversky_alpha * fp + self.tversky_beta * fn + self.smooth
            score = (tp + self.smooth) / denominator.clamp_min(1e-8)
        return 1.0 - score.mean()

    def _focal(self, logits: Tensor, probs: Tensor, onehot: Tensor, index: Tensor | None) -> Tensor:
        """Per-voxel focal loss -alpha_t (1 - p_t)^gamma log p_t: (B, 1, *P) softmax, (B, R, *P) sigmoid."""
        if self.region_based:
            log_pt = -F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            pt = probs * onehot + (1 - probs) * (1 - onehot)
        else:
            log_pt = torch.log_softmax(logits, 1).gather(1, index)
            pt = probs.gather(1, index)
        loss = -((1 - pt) ** self.focal_gamma) * log_pt
        alpha = self.focal_alpha
        if alpha is not None:
            shape = [1, -1] + [1] * (logits.ndim - 2)
            if self.region_based:
                a = alpha.view(shape) if alpha.ndim else alpha
                loss = loss * (a * onehot + (1 - a) * (1 - onehot))
            elif alpha.ndim:
                loss = loss * alpha[index]
            else:  # one float: weight alpha on foreground voxels, 1 - alpha on background
                loss = loss * torch.where(index > 0, alpha, 1 - alpha)
        return loss


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


# ----- registry ---------------------------------------------------------------------------------------------
def _register(name: str) -> None:
    def factory(plan: Plan, weights: dict[str, float] | None = None, **kwargs: Any) -> SegmentationLoss:
        terms = dict(LOSS_TERMS[name])
        for key, value in (weights or {}).items():
            if key not in terms:
                raise ConfigError(
                    f"loss '{name}': weight for unknown term '{key}'; its terms are {', '.join(terms)}"
                )
            terms[key] = float(value)
        return SegmentationLoss(plan, terms, **kwargs)

    LOSSES.register(name)(factory)


for _name in LOSS_TERMS:
    _register(_name)


def build_loss(
    name: str,
    plan: Plan,
    weights: dict[str, float] | None = None,
    deep_supervision: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Loss `name` ("dice_ce", "dice", "ce", "focal", "tversky", "dice_focal") for `plan`'s outputs.

    Args:
        weights: term weights, e.g. {"dice": 1.0, "ce": 0.5}; keys must be terms of the loss.
        deep_supervision: accept the network's list of outputs and weight them (a single tensor still works).
        **kwargs: options of `SegmentationLoss` (smooth, batch_dice, focal_gamma, focal_alpha, tversky_alpha,
            tversky_beta) and `ds_weights` (explicit per-output deep-supervision weights).
    """
    ds_weights = kwargs.pop("ds_weights", None)
    valid = [p for p in inspect.signature(SegmentationLoss.__init__).parameters if p not in ("self", "plan", "weights")]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(unknown_name_message("loss option", key, valid + ["ds_weights"]))
    loss: nn.Module = LOSSES.build(name, plan, weights, **kwargs)
    return DeepSupervisionLoss(loss, ds_weights) if deep_supervision else loss

