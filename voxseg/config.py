"""The training run's settings: one tree of small dataclasses, written to `config.json` and into checkpoints.

Each component owns its dataclass; fields carry their documentation and `__post_init__` validates them, so a
bad value fails when the config is built (from defaults, JSON or `--set section.field=value` overrides) with a
message that names the option and the allowed values.

Example:
    >>> config = apply_overrides(TrainConfig(), ["optim.lr=3e-4", "loop.epochs=10"])
    >>> config.optim.lr
    0.0003

The generic parts (building dataclasses from dicts, locating and parsing dotted options, the `choices`
metadata convention) live in `voxseg.configtree`; `parse_value` is re-exported here. `OptimConfig` and
`ScheduleConfig` live with their registries in `voxseg.optim` and are re-exported here.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxseg.augment.config import AugmentConfig
from voxseg.configtree import build_dataclass, dotted_names, locate_option, parse_value
from voxseg.configtree import check as _check
from voxseg.configtree import check_choice as _choice
from voxseg.errors import ConfigError
from voxseg.jsonio import write_json_atomic
from voxseg.losses import LOSSES, loss_weights
from voxseg.lossoptions import TermOptions
from voxseg.optim import OptimConfig, ScheduleConfig  # owned by the optimiser component, part of this tree
from voxseg.plans import TRAINING_OVERRIDES, parse_overrides


@dataclass
class LossConfig:
    """The loss."""

    name: str = field(default="dice_ce", metadata={"choices": LOSSES})
    """dice_ce (default), dice, ce, focal, tversky or dice_focal (`voxseg.losses.LOSSES`)."""
    weights: dict[str, float] | None = None
    """per-term weights, e.g. {"dice": 1.0, "ce": 1.0}; None = the loss's defaults. Keys must be terms of the chosen
    loss."""
    class_weights: list[float] | None = None
    """one weight >= 0 per network output, in output order: background then each label for softmax plans, one per
    region for region-based plans (e.g. 1,2,2,2); None = all equal. CE and focal become weighted means over the voxels
    (each voxel weighted by its class, as torch's CrossEntropyLoss weight; each region's term by its weight), Dice and
    Tversky the weighted mean of the per-class scores (softmax: background has no Dice, so its weight only counts in
    CE and focal). Only ratios matter. The count is checked against the plan when training starts."""
    focal_gamma: float = 2.0
    """focal loss exponent in (1 - p_t)^gamma, >= 0; 0 with no alpha is cross-entropy."""
    focal_alpha: float | list[float] | None = None
    """focal loss alpha_t factor: None = none; a number in [0, 1] weights foreground voxels (for regions: region
    members) by alpha and the rest by 1 - alpha; a list gives one factor per output, in class_weights' order. Unlike
    class_weights it scales the loss (it is not normalised)."""
    tversky_alpha: float = 0.3
    """Tversky loss weight of false positives, >= 0 (alpha = beta = 0.5 is Dice)."""
    tversky_beta: float = 0.7
    """Tversky loss weight of false negatives, >= 0; beta > alpha favours recall."""

    def __post_init__(self) -> None:
        _choice(self, "loss.name")
        # caught here, not minutes later when the loss is built
        loss_weights(self.name, self.weights)
        options = TermOptions(**self.term_options())  # validated; kept as floats and lists (JSON has no tuples)
        self.class_weights = None if options.class_weights is None else list(options.class_weights)
        alpha = options.focal_alpha
        self.focal_alpha = list(alpha) if isinstance(alpha, tuple) else alpha
        self.focal_gamma, self.tversky_alpha, self.tversky_beta = (options.focal_gamma, options.tversky_alpha,
                                                                   options.tversky_beta)

    def term_options(self) -> dict[str, Any]:
        """The options of `voxseg.losses.build_loss` this config sets (`voxseg.lossoptions.TermOptions`)."""
        return dict(class_weights=self.class_weights, focal_gamma=self.focal_gamma, focal_alpha=self.focal_alpha,
                    tversky_alpha=self.tversky_alpha, tversky_beta=self.tversky_beta)


@dataclass
class DataConfig:
    """How training patches are drawn."""

    num_samples: int = 1
    """patches cut from each drawn case (several patches per case amortise loading it)."""
    cache: str = field(default="auto", metadata={"choices": ("auto", "gpu", "pinned", "mmap")})
    """where preprocessed cases live during training: "auto" (on the training device when they fit in cache_budget_gb,
    else, for CUDA, pinned host memory when they fit in half the host RAM, counted as the pinned allocator rounds each
    case up to a power of two, else "mmap"), "gpu", "pinned" or "mmap" (memory-mapped files, read on demand). The
    training cache is placed first, the validation cache in what it left."""
    cache_budget_gb: float | None = None
    """GiB the "auto" caches (training and validation together) may use on the device; None = on CUDA 0.8 x (free
    memory after the model is built - 1.2 x the plan's estimated_memory_gb), on a CPU half the host RAM."""
    iterations_per_epoch: int = 250
    """optimiser steps per epoch; 0 = one pass over the training cases."""
    prefetch: int = -1
    """batches prepared ahead by a background thread (0 = prepare in the training thread; -1 = auto: 0 when the cache
    lives on the training device, where preparing a batch only queues device work, 2 for pinned or memory-mapped
    caches, whose host-side reads would otherwise stall the step)."""
    num_threads: int = 4
    """CPU threads torch may use (intra-op); capped at the machine's core count."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "data.num_samples", "must be >= 1")
        _choice(self, "data.cache")
        _check(self.cache_budget_gb is None or self.cache_budget_gb > 0, "data.cache_budget_gb", "must be > 0")
        _check(self.iterations_per_epoch >= 0, "data.iterations_per_epoch", "must be >= 0 (0 = one pass)")
        _check(self.prefetch >= -1, "data.prefetch", "must be >= 0, or -1 for auto")
        _check(self.num_threads >= 1, "data.num_threads", "must be >= 1")


@dataclass
class LoopConfig:
    """The epoch loop."""

    epochs: int = 1000
    """number of epochs."""
    val_freq: int = 1
    """validate (pseudo-Dice on patches) every this many epochs."""
    val_iterations: int = 50
    """validation batches per validation."""
    grad_accum: int = 1
    """micro-batches accumulated per optimiser step."""
    grad_clip: float = 12.0
    """gradient norm clip (0 = off)."""
    amp: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp16", "off")})
    """mixed precision: "auto" (bf16 where supported, else fp16 with a GradScaler, on CUDA; float32 on CPU), "bf16",
    "fp16" (CUDA only) or "off"."""
    compile: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    """torch.compile: "auto" (model + loss on CUDA only), "on" (also on CPU) or "off"."""
    patience: int = 0
    """stop after this many epochs without EMA pseudo-Dice improvement (0 = never)."""
    ema_alpha: float = 0.9
    """smoothing of the pseudo-Dice EMA: ema = alpha * ema + (1 - alpha) * dice."""
    save_freq: int = 1
    """write checkpoint_latest every this many epochs (and always at the end); the default, every epoch, lets a killed
    run resume from its last completed epoch."""
    snapshot_freq: int = 50
    """with keep_snapshots > 0, write a checkpoint_epoch_E.pt every this many epochs."""
    keep_snapshots: int = 0
    """keep the newest this many checkpoint_epoch_E.pt snapshots (0 = none; checkpoint_latest, _best and _final are
    always kept)."""
    seed: int = 12345
    """random seed, the same on every rank of a distributed run (each rank slices the global batch)."""
    deterministic: bool = False
    """deterministic algorithms (slower on CUDA; resumed runs reproduce exactly)."""
    device: str = "auto"
    """the training device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    full_val: bool = True
    """sliding-window validation of the whole validation cases after training."""
    save_val_probabilities: bool = False
    """full validation also writes each case's probabilities on the raw grid (validation/CASE.npz, as `voxseg predict
    --save-probabilities`), which `voxseg evaluate --crossval WORKDIR --configurations all` needs to compare ensembles
    of configurations."""
    dist_timeout_min: float = 30.0
    """under torchrun, a collective waiting longer than this fails, so a rank that died or hangs does not leave the
    others blocked forever."""

    def __post_init__(self) -> None:
        for name in ("epochs", "val_freq", "grad_accum", "save_freq", "snapshot_freq"):
            _check(getattr(self, name) >= 1, f"loop.{name}", "must be >= 1")
        _check(self.val_iterations >= 0, "loop.val_iterations", "must be >= 0")
        _check(self.keep_snapshots >= 0, "loop.keep_snapshots", "must be >= 0 (0 = none)")
        _check(self.grad_clip >= 0, "loop.grad_clip", "must be >= 0 (0 = off)")
        _choice(self, "loop.amp")
        _choice(self, "loop.compile")
        _check(self.patience >= 0, "loop.patience", "must be >= 0 (0 = off)")
        _check(self.dist_timeout_min > 0, "loop.dist_timeout_min", "must be > 0")
        _check(0 <= self.ema_alpha < 1, "loop.ema_alpha", "must be in [0, 1)")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                        and self.device[5:].isdigit())
        _check(ok, "loop.device", f"='{self.device}' is not allowed; use auto, cpu, cuda or cuda:N")


@dataclass
class LoggingConfig:
    """What the run writes besides checkpoints (log.jsonl is always written)."""

    tensorboard: bool = True
    """TensorBoard scalars in training/fold_F/tensorboard (skipped if tensorboard is missing)."""
    progress_png: bool = True
    """progress.png redrawn every epoch."""
    progress_bar: bool = True
    """a tqdm bar per epoch."""
    log_every_iter: int = 25
    """refresh the bar's loss every this many iterations; each refresh is a host-device sync (0 = only at the end of
    the epoch)."""

    def __post_init__(self) -> None:
        _check(self.log_every_iter >= 0, "logging.log_every_iter", "must be >= 0")


@dataclass
class TrainConfig:
    """The whole training run."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """the optimiser (`optim.*`)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """the learning-rate schedule (`schedule.*`)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """the loss (`loss.*`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """how training patches are drawn and where the cases are cached (`data.*`)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """the training augmentation (`augment.*`)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """the epoch loop: length, validation, precision, checkpoints, device (`loop.*`)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """what the run writes besides checkpoints (`logging.*`)."""
    plan: dict[str, Any] = field(default_factory=dict)
    """overrides of the work directory's plan for this run, as dotted plan keys: patch_size, batch_size,
    foreground_oversampling and network.<field> (residual, deep_supervision, ...), e.g. {"batch_size": 4,
    "network.residual": true}. The effective plan (plans.json + these) is written to training/fold_F/plans.json and is
    the one everything in the run reads."""

    def __post_init__(self) -> None:
        self.plan = parse_overrides(self.plan, allowed=TRAINING_OVERRIDES, prefix="plan.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return build_dataclass(cls, data, "")

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())


# config.json of a resumed run: the changes made on resume, replayed over the config the run started with
CHANGES_KEY = "changes"
# How a run starts is given with the run (--resume, --pretrained, --force: `voxseg.train.start.RunStart`), never a
# setting. Up to version 0.1.0 TrainConfig also had these two fields, so every config.json and checkpoint "config"
# written then holds "resume": false, "pretrained": null. `saved_config` is the one place that reads them.
FORMER_START_KEYS = ("resume", "pretrained")


def load_config_json(path: str | Path) -> TrainConfig:
    """Read a config written by `TrainConfig.save` (or by hand; missing fields take their defaults).

    A run's config.json holds the config the run started with and, under "changes", the options changed on
    resume (`voxseg.train.resume`): they are replayed in order, so the result is the config in force at the end.
    A file of an earlier version may hold "resume" and "pretrained" (`FORMER_START_KEYS`): see `saved_config`.
    """
    from voxseg.jsonio import read_json

    data = read_json(path, ConfigError, missing="give an existing config file (a saved config.json works)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return saved_config(data, f"config file {path}")


def saved_config(data: dict[str, Any], source: str) -> TrainConfig:
    """The config a saved dict holds (a config.json's object, a checkpoint's "config"), changes replayed.

    "resume" and "pretrained", written by versions up to 0.1.0 (`FORMER_START_KEYS`), are dropped: a resumed
    run is resumed by --resume, and its checkpoint holds its weights. A value other than the old default (a run
    started with `--set pretrained=FILE`) is dropped with a warning that says how to give it now.

    Args:
        data: the saved object (not modified).
        source: what it was read from, for messages ("config file PATH").
    """
    data = dict(data)
    for key in FORMER_START_KEYS:
        value = data.pop(key, None)
        if value not in (None, False):
            flag = "--resume" if key == "resume" else f"--pretrained {value}"
            warnings.warn(f"{source}: '{key}' is no longer a config option and is ignored; give {flag} with the "
                          "run instead", stacklevel=2)
    changes = data.pop(CHANGES_KEY, None) or []
    if not isinstance(changes, list):
        raise ConfigError(f"{source}: '{CHANGES_KEY}' must be a list of {{epoch, options}} records")
    config = TrainConfig.from_dict(data)
    for record in changes:
        options = record.get("options") if isinstance(record, dict) else None
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: each '{CHANGES_KEY}' record needs an 'options' object, got "
                              f"{record!r}")
        data = config.to_dict()
        for name, pair in options.items():
            if not isinstance(pair, list) or len(pair) != 2:
                raise ConfigError(f"{source}: change of '{name}' must be [before, after], got {pair!r}")
            _, parent, leaf = locate_option(TrainConfig, name, data)
            parent[leaf] = pair[1]
        config = TrainConfig.from_dict(data)
    return config


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Return a copy of `config` with dotted `section.field=value` overrides applied and validated.

    `plan.<key>=value` sets a plan override for the run (see `TrainConfig.plan`), e.g. `plan.batch_size=4`,
    `plan.network.residual=true`. Values are parsed by the field's type: bools accept true/false/1/0/yes/no/on/off;
    lists accept JSON (`[96,96,96]`) or commas (`96,96,96`); dicts accept JSON or pairs (`dice=1,ce=0.5`);
    `none`/`null` sets an optional field to None. An unknown option is refused with the nearest valid name.
    """
    data = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.field=value, e.g. optim.lr=3e-4")
        if key.startswith("plan."):  # plan overrides: one dict, keyed like the plan's own fields
            data["plan"][key[len("plan."):]] = text.strip()
            continue
        hint, parent, leaf = locate_option(TrainConfig, key, data)
        parent[leaf] = parse_value(text.strip(), hint, key)
    return TrainConfig.from_dict(data)


def option_names(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted option name, e.g. 'optim.lr', 'augment.rotation_p'."""
    return dotted_names(cls, prefix)
