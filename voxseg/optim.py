"""Optimisers and learning-rate schedules, chosen by name from the config through the `OPTIMIZERS` and
`SCHEDULES` registries; this component also owns its settings (`OptimConfig`, `ScheduleConfig`).

Schedules step once per epoch: `scheduler.step()` at the end of epoch e sets the learning rate of epoch e + 1
(`lr_at(e + 1)`); the plateau schedule reads the validation metric passed to `step(metric)` instead.

Adding one is a registered function plus a config value (`optim.name=rmsprop`, `schedule.name=linear`):

    @OPTIMIZERS.register("rmsprop", "RMSprop with momentum")
    def rmsprop(params, config):                      # params: list of tensors or parameter groups
        return torch.optim.RMSprop(params, lr=config.lr, momentum=config.momentum)

    @SCHEDULES.register("linear", "linear decay to min_lr", anneal=True)
    def linear(scheduler, epoch):                     # the factor of the base lr at `epoch`
        return 1.0 - min(epoch, scheduler.total_epochs) / scheduler.total_epochs
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from voxseg.configtree import check, check_choice
from voxseg.registry import Registry

OptimizerBuilder = Callable[[list, "OptimConfig"], torch.optim.Optimizer]
ScheduleFactor = Callable[["EpochScheduler", int], float]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
# metadata anneal=True: lr = min_lr + (base - min_lr) * factor; otherwise lr = max(min_lr, base * factor)
SCHEDULES: Registry[ScheduleFactor] = Registry("schedule")


@dataclass
class OptimConfig:
    """The optimiser."""

    name: str = field(default="sgd", metadata={"choices": OPTIMIZERS})
    """the optimiser: "sgd" (nnU-Net's default: SGD with Nesterov momentum), "adam" or "adamw" (`OPTIMIZERS`)."""
    lr: float = 1e-2
    """initial learning rate (the schedule scales it per epoch)."""
    momentum: float = 0.99
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for SGD."""
    weight_decay: float = 3e-5
    """L2 penalty (decoupled for adamw)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/AdamW (beta1, beta2)."""

    def __post_init__(self) -> None:
        check_choice(self, "optim.name")
        check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        check(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(not (self.name == "sgd" and self.nesterov and self.momentum == 0), "optim.nesterov",
              "needs optim.momentum > 0")


@dataclass
class ScheduleConfig:
    """How the learning rate changes from epoch to epoch (set at the start of every epoch)."""

    name: str = field(default="poly", metadata={"choices": SCHEDULES})
    """the schedule: "poly" lr * (1 - epoch/epochs)^exponent (nnU-Net's default); "cosine" half cosine to min_lr after
    a linear warm-up of warmup_epochs; "step" lr * gamma^(epoch // step_size); "exponential" lr * gamma^epoch;
    "plateau" multiplies the lr by factor when the validation EMA pseudo-Dice has not improved for more than patience
    validations in a row (`SCHEDULES`)."""
    exponent: float = 0.9
    """poly exponent."""
    warmup_epochs: int = 0
    """cosine linear warm-up length in epochs (0 = none)."""
    step_size: int = 100
    """step schedule period in epochs."""
    gamma: float | None = None
    """step / exponential decay factor; None = 0.1 for step, 0.99 for exponential."""
    factor: float = 0.5
    """plateau decay factor."""
    patience: int = 10
    """plateau patience: validations without improvement tolerated before the lr is decayed."""
    min_lr: float = 0.0
    """the lr never goes below this (cosine decays to it; the others are floored at it)."""

    def __post_init__(self) -> None:
        check_choice(self, "schedule.name")
        check(self.exponent > 0, "schedule.exponent", "must be positive")
        check(self.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
        check(self.step_size >= 1, "schedule.step_size", "must be >= 1")
        check(self.gamma is None or 0 < self.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
        check(0 < self.factor < 1, "schedule.factor", "must be in (0, 1)")
        check(self.patience >= 0, "schedule.patience", "must be >= 0")
        check(self.min_lr >= 0, "schedule.min_lr", "must be >= 0")

    @property
    def resolved_gamma(self) -> float:
        if self.gamma is not None:
            return self.gamma
        return 0.1 if self.name == "step" else 0.99


# ----- optimisers -------------------------------------------------------------------------------------------
def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict],
                    config: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser registered as `config.name` (SGD, Adam, AdamW, ...) over `params` (tensors or groups)."""
    # generators (model.parameters(), a group's params) are read more than once: make them lists
    params = [dict(p, params=_tensors(p["params"])) if isinstance(p, dict) else p for p in params]
    return OPTIMIZERS.get(config.name)(params, config)


@OPTIMIZERS.register("sgd", "SGD with (Nesterov) momentum, nnU-Net's default")
def sgd(params: list, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


@OPTIMIZERS.register("adam", "Adam (L2 weight decay); fused kernel on CUDA")
def adam(params: list, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, **_adam_options(params, config))


@OPTIMIZERS.register("adamw", "AdamW (decoupled weight decay); fused kernel on CUDA")
def adamw(params: list, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **_adam_options(params, config))


def _adam_options(params: list, config: OptimConfig) -> dict[str, Any]:
    """Adam/AdamW settings. The fused CUDA kernel is used when every parameter is a floating-point CUDA tensor
    (one kernel launch for the whole update instead of several per parameter group); on the CPU torch's
    default (foreach where it applies)."""
    betas = (float(config.betas[0]), float(config.betas[1]))
    fused = True if _all_cuda(params) else None
    return {"lr": config.lr, "betas": betas, "weight_decay": config.weight_decay, "fused": fused}


def _all_cuda(params: list[torch.nn.Parameter] | list[dict]) -> bool:
    """True when there are parameters and all are floating-point CUDA tensors (what fused Adam accepts)."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


def _tensors(params: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


# ----- schedules --------------------------------------------------------------------------------------------
class EpochScheduler:
    """Sets every parameter group's learning rate from the epoch index (or, for plateau, from the metric).

    The factor is relative to the lr each group had when the scheduler was built (its base lr):
    lr(e) = min_lr + (base - min_lr) * factor(e) for annealing schedules (poly/cosine),
    max(min_lr, base * factor(e)) for the others (step/exponential/plateau).

    Args:
        optimizer: the optimiser whose groups are updated.
        config: the schedule settings.
        total_epochs: length of the run (poly and cosine reach their end at this epoch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_epochs: int) -> None:
        self.optimizer = optimizer
        self.config = config
        self.total_epochs = max(1, int(total_epochs))
        self._factor = SCHEDULES.get(config.name)
        self.anneal = bool(SCHEDULES.metadata(config.name).get("anneal", False))
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
        """The multiplier of the base lr at `epoch` (0-based), from the registered schedule."""
        return float(self._factor(self, epoch))

    def lr_at(self, epoch: int, base_lr: float) -> float:
        factor = self.factor(epoch)
        min_lr = self.config.min_lr
        if self.anneal:
            return min_lr + (base_lr - min_lr) * factor
        return max(min_lr, base_lr * factor)

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(self.epoch, base)

    def step(self, metric: float | None = None) -> None:
        """End of an epoch: move to the next epoch's lr. `metric` (higher is better) drives plateau."""
        self.epoch += 1
        if metric is not None and math.isfinite(metric):  # counted for every schedule; plateau reads it
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


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_epochs: int) -> EpochScheduler:
    """The epoch-stepped schedule named by `config.name` over a run of `total_epochs` epochs."""
    return EpochScheduler(optimizer, config, total_epochs)


@SCHEDULES.register("poly", "lr * (1 - epoch/epochs)^exponent, nnU-Net's default", anneal=True)
def poly(scheduler: EpochScheduler, epoch: int) -> float:
    progress = min(epoch, scheduler.total_epochs) / scheduler.total_epochs
    return (1.0 - progress) ** scheduler.config.exponent


@SCHEDULES.register("cosine", "half cosine to min_lr after a linear warm-up of warmup_epochs", anneal=True)
def cosine(scheduler: EpochScheduler, epoch: int) -> float:
    warmup = scheduler.config.warmup_epochs
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)  # linear ramp that is never 0
    span = max(1, scheduler.total_epochs - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - warmup) / span)))


@SCHEDULES.register("step", "lr * gamma^(epoch // step_size)")
def step(scheduler: EpochScheduler, epoch: int) -> float:
    return scheduler.config.resolved_gamma ** (epoch // scheduler.config.step_size)


@SCHEDULES.register("exponential", "lr * gamma^epoch")
def exponential(scheduler: EpochScheduler, epoch: int) -> float:
    return scheduler.config.resolved_gamma ** epoch


@SCHEDULES.register("plateau", "lr * factor each time the validation EMA pseudo-Dice stops improving")
def plateau(scheduler: EpochScheduler, epoch: int) -> float:
    return scheduler.config.factor ** scheduler.num_decays
