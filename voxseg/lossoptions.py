"""The options of the loss terms, validated once: smoothing, batch Dice, per-class weights, focal gamma/alpha,
Tversky alpha/beta.

`TermOptions` checks what can be checked without a plan when it is built (so `LossConfig` fails as soon as a
run's config is built); `per_output` checks a per-output list against the plan's network outputs when the loss
is built, and names the outputs in order:

    >>> TermOptions(class_weights=[1, 2, 2, 2]).class_weights
    (1.0, 2.0, 2.0, 2.0)
    >>> per_output([1, 2], plan, "loss.class_weights")   # a 4-output plan
    ConfigError: loss.class_weights has 2 entries; the network has 4 outputs (softmax): background, edema, ...

Messages name the options as `voxseg train --set` takes them (`loss.focal_gamma`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from voxseg.errors import ConfigError
from voxseg.plans import Plan


def _number(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {value!r}")
    return float(value)


def _numbers(values: Any, option: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{option} must be a list of numbers like 1,2,2,2, got {values!r}")
    return tuple(_number(v, option) for v in values)


@dataclass(frozen=True)
class TermOptions:
    """Options of the loss terms (`voxseg.config.LossConfig` documents each for users, as loss.<name>)."""

    smooth: float = 1e-5
    """added to Dice/Tversky numerator and denominator."""
    batch_dice: bool = True
    """Dice statistics summed over the batch (nnU-Net's batch Dice) instead of per sample."""
    class_weights: tuple[float, ...] | None = None
    """one weight >= 0 per network output (None = all equal): CE and focal become weighted means over the voxels, Dice
    and Tversky weighted means over the classes."""
    focal_gamma: float = 2.0
    """focal loss focusing exponent, >= 0 (0 = cross-entropy)."""
    focal_alpha: float | tuple[float, ...] | None = None
    """None, a number in [0, 1] (the weight of the foreground / region-member side, 1 - alpha on the other) or one
    factor >= 0 per output."""
    tversky_alpha: float = 0.3
    """Tversky weight (>= 0) of false positives."""
    tversky_beta: float = 0.7
    """Tversky weight (>= 0) of false negatives."""

    def __post_init__(self) -> None:
        store = self._store
        store("smooth", _number(self.smooth, "loss.smooth"))
        if self.smooth < 0:
            raise ConfigError(f"loss.smooth must be >= 0, got {self.smooth}")
        if self.class_weights is not None:
            store("class_weights", _numbers(self.class_weights, "loss.class_weights"))
            if min(self.class_weights) < 0 or max(self.class_weights) <= 0:
                raise ConfigError(f"loss.class_weights must be >= 0 with at least one > 0, got "
                                  f"{list(self.class_weights)}")
        for name in ("focal_gamma", "tversky_alpha", "tversky_beta"):
            store(name, _number(getattr(self, name), f"loss.{name}"))
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.tversky_alpha + self.tversky_beta <= 0:
            raise ConfigError("loss.tversky_alpha + loss.tversky_beta must be > 0 (0.5 and 0.5 is Dice)")
        self._check_focal_alpha()

    def _store(self, name: str, value: Any) -> None:
        """Keep the normalised value (floats, tuples) of a field of this frozen dataclass."""
        object.__setattr__(self, name, value)

    def _check_focal_alpha(self) -> None:
        alpha = self.focal_alpha
        if alpha is None:
            return
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self._store("focal_alpha", _number(alpha, "loss.focal_alpha"))
            if not 0 <= alpha <= 1:
                raise ConfigError(f"loss.focal_alpha={alpha}: a single alpha must be in [0, 1] (the foreground "
                                  "weight; background gets 1 - alpha), or give one factor per output")
            return
        self._store("focal_alpha", _numbers(alpha, "loss.focal_alpha"))
        if min(self.focal_alpha) < 0:
            raise ConfigError(f"loss.focal_alpha factors must be >= 0, got {list(self.focal_alpha)}")


def output_names(plan: Plan) -> list[str]:
    """The network's outputs in channel order: background then the labels (softmax), or the regions."""
    return list(plan.class_names) if plan.is_region_based else ["background", *plan.class_names]


def per_output(values: Sequence[float], plan: Plan, option: str) -> list[float]:
    """`values` when there is one per network output of `plan`, else a ConfigError naming `option`, the
    number of outputs and their names in order."""
    names = output_names(plan)
    if len(values) != len(names):
        kind = "one sigmoid per region" if plan.is_region_based else "softmax: background first"
        raise ConfigError(
            f"{option} has {len(values)} entries; the network has {len(names)} outputs ({kind}): "
            f"{', '.join(names)}. Give one value per output in this order, e.g. "
            f"{option}={','.join(['1'] * len(names))}")
    return [float(v) for v in values]
