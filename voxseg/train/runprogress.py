"""Where a training run stands (epoch, the pseudo-Dice EMA, the best of it): what a checkpoint restores besides
the modules."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Progress:
    """Where the run stands: everything besides the modules that a checkpoint must restore."""

    epoch: int = 0  # epochs completed = the next epoch to run
    ema: float | None = None
    best_metric: float | None = None
    best_epoch: int = -1

    def update(self, dice_mean: float, alpha: float) -> bool:
        """Fold a validation's mean pseudo-Dice into the EMA; True when the EMA reaches a new best."""
        if math.isnan(dice_mean):
            return False
        self.ema = dice_mean if self.ema is None else alpha * self.ema + (1 - alpha) * dice_mean
        if self.best_metric is None or self.ema > self.best_metric:
            self.best_metric, self.best_epoch = self.ema, self.epoch
            return True
        return False

    def epochs_without_improvement(self) -> int:
        return self.epoch - 1 - self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ema": self.ema, "best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.best_epoch = int(state["epoch"]), int(state["best_epoch"])
        self.ema, self.best_metric = state["ema"], state["best_metric"]
