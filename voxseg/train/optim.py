"""Optimisers and learning-rate schedules, chosen by name from the config.

Schedules step once per epoch: `scheduler.step()` at the end of epoch e sets the learning rate of epoch e + 1
(`lr_at(e + 1)`); the plateau schedule reads the validation metric passed to `step(metric)` instead.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from voxseg.config import OptimConfig, ScheduleConfig


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict],
                    config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum, nnU-Net's default), Adam or AdamW from the config.

    Adam and AdamW use the fused CUDA kernel when every parameter is a floating-point CUDA tensor (one
    kernel launch for the whole update instead of several per parameter group); on the CPU they are unchanged.
    """
    # generators (model.parameters(), a group's params) are read twice below: make them lists
    params = [dict(p, params=_tensors(p["params"])) if isinstance(p, dict) else p for p in params]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    betas = (float(config.betas[0]), float(config.betas[1]))
    fused = True if _all_cuda(params) else None  # None: torch's default (foreach where it applies)
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, fused=fused)


def _all_cuda(params: list[torch.nn.Parameter] | list[dict]) -> bool:
    """True when there are parameters and all are floating-point CUDA tensors (what fused Adam accepts)."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


def _tensors(params: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


class EpochScheduler:
    """Sets every parameter group's learning rate from the epoch index (or, for plateau, from the metric).

    The factor is relative to the lr each group had when the scheduler was built (its base lr):
    lr(e) = min_lr + (base - min_lr) * factor(e) for poly/cosine, max(min_lr, base * factor(e)) for
    step/exponential/plateau.

    Args:
        optimizer: the optimiser whose groups are updated.
        config: the schedule settings.
        total_epochs: length of the run (poly and cosine reach their end at this epoch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_epochs: int) -> None:
        self.optimizer = optimizer
        self.config = config
        self.total_epochs = max(1, int(total_epochs))
        self.base_lrs = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self.epoch = 0
        # plateau state: decay count, best metric and validations since it improved
        self.num_decays = 0
        self.best: float | None = None
        self.bad_steps = 0
        self._apply()

    def factor(self, epoch: int) -> float:
        """The multiplier of the base lr at `epoch` (0-based) for the epoch-driven schedules."""
        c = self.config
        progress = min(epoch, self.total_epochs) / self.total_epochs
        if c.name == "poly":
            return (1.0 - progress) ** c.exponent
        if c.name == "cosine":
            if epoch < c.warmup_epochs:
                return (epoch + 1) / (c.warmup_epochs + 1)  # linear ramp that is never 0
            span = max(1, self.total_epochs - c.warmup_epochs)
            t = min(1.0, (epoch - c.warmup_epochs) / span)
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if c.name == "step":
            return c.resolved_gamma ** (epoch // c.step_size)
        if c.name == "exponential":
            return c.resolved_gamma ** epoch
        return c.factor ** self.num_decays  # plateau

    def lr_at(self, epoch: int, base_lr: float) -> float:
        factor = self.factor(epoch)
        min_lr = self.config.min_lr
        if self.config.name in ("poly", "cosine"):
            return min_lr + (base_lr - min_lr) * factor
        return max(min_lr, base_lr * factor)

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(self.epoch, base)

    def step(self, metric: float | None = None) -> None:
        """End of an epoch: move to the next epoch's lr. `metric` (higher is better) drives plateau."""
        self.epoch += 1
        if self.config.name == "plateau" and metric is not None and math.isfinite(metric):
            if self.best is None or metric > self.best:
                self.best, self.bad_steps = float(metric), 0
            else:
                self.bad_steps += 1
                if self.bad_steps > self.config.patience:
                    self.num_decays += 1
                    self.bad_steps = 0
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "base_lrs": list(self.base_lrs), "num_decays": self.num_decays,
                "best": self.best, "bad_steps": self.bad_steps, "total_epochs": self.total_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.num_decays = int(state["num_decays"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_steps = int(state["bad_steps"])
        # total_epochs stays as built: resuming with more epochs stretches the schedule on purpose
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_epochs: int,
                    iterations_per_epoch: int | None = None) -> EpochScheduler:
    """The epoch-stepped schedule named by `config.name`.

    `iterations_per_epoch` is accepted for interface stability; every schedule steps per epoch.
    """
    del iterations_per_epoch
    return EpochScheduler(optimizer, config, total_epochs)
