"""Resuming a run: which checkpoint it continues from, which settings may change on resume, how a change
reaches the restored optimiser and schedule, and the run's record of its changes.

A resumed run restores its whole state from the checkpoint (weights, optimiser, schedule, progress, random
generators). Options given on resume then take effect from the next epoch, the first one the resumed run
trains: the number of epochs, the learning rate (the schedule continues from the new base rate), schedule
parameters, patience, validation and save frequencies, augmentation, data and logging options. Options that
cannot change are refused before anything is written, with the reason (`FIXED_ON_RESUME`); a changed effective
plan is refused by the checkpointer.

config.json keeps the config the run started with, plus the list of changes and the epoch from which each took
effect; `voxseg.config.load_config_json` replays them, so a second resume starts from the settings in force:

    {"optim": {"lr": 0.01, ...}, ..., "changes": [{"epoch": 1, "options": {"optim.lr": [0.01, 5e-05]}}]}

`--resume` continues from checkpoint_latest.pt; `--resume PATH` from a given checkpoint of the same run
(checkpoint_best.pt, checkpoint_epoch_E.pt, ...) or the run's folder.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from voxseg.config import CHANGES_KEY, TrainConfig, option_names, saved_config
from voxseg.errors import ConfigError
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.workdir import FoldDir, checkpoint_tag

# option (or section, ending in ".") -> why it cannot change on resume
FIXED_ON_RESUME: dict[str, str] = {
    "optim.name": "the optimiser's saved state (momentum buffers, Adam moments) only fits the optimiser that wrote it",
    "loss.": "the logged losses and the pseudo-Dice history that chose checkpoint_best were computed with the "
             "run's loss",
    "loop.seed": "the random generators are restored from the checkpoint, so a new seed would be ignored",
}
# not compared as options: the effective plan is compared field by field by the checkpointer
NOT_SETTINGS = ("plan",)


def _value(data: dict[str, Any], name: str) -> Any:
    for part in name.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _normalised(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with every field present (defaults for fields an older version did not write, the keys it
    wrote that are no options dropped: `voxseg.config.saved_config`)."""
    try:
        with warnings.catch_warnings():  # comparing, not starting a run: whatever it drops concerns no change
            warnings.simplefilter("ignore")
            return saved_config({k: v for k, v in data.items() if k != CHANGES_KEY}, "a checkpoint's config").to_dict()
    except ConfigError:
        return data


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{option: (saved value, current value)} for every option whose value differs (JSON-comparable values)."""
    saved, current = _normalised(saved), _normalised(current)
    changes = {}
    for name in option_names():
        if name in NOT_SETTINGS:
            continue
        before, now = _value(saved, name), _value(current, name)
        if isinstance(before, tuple):
            before = list(before)
        if isinstance(now, tuple):
            now = list(now)
        if before != now:
            changes[name] = (before, now)
    return changes


def refuse_fixed(changes: dict[str, tuple[Any, Any]], checkpoint: Path) -> None:
    """Raise ConfigError naming every option that may not change on resume, with the reason and what to do."""
    refused = []
    for name, (before, now) in changes.items():
        for fixed, reason in FIXED_ON_RESUME.items():
            if name == fixed or (fixed.endswith(".") and name.startswith(fixed)):
                refused.append(f"{name} {before} -> {now} ({reason})")
    if refused:
        raise ConfigError(f"{checkpoint}: these options cannot change when resuming: {'; '.join(refused)}. Resume "
                          f"without them, or start a new run (--force replaces this one; --pretrained {checkpoint} "
                          "starts one from its weights)")


def apply_changes(changes: dict[str, tuple[Any, Any]], optimizer: torch.optim.Optimizer, scheduler: Any,
                  config: TrainConfig) -> None:
    """Make changed optimiser settings reach the restored state (the checkpoint's optimiser and schedule hold the
    old values): a new learning rate scales every group's base rate, from which the schedule continues."""
    if "optim.lr" in changes:
        before, now = changes["optim.lr"]
        # groups at the configured rate take the new rate exactly, others keep their ratio to it
        scheduler.base_lrs = [float(now) if base == float(before) else base * float(now) / float(before)
                              for base in scheduler.base_lrs]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base
    optim = config.optim
    for group in optimizer.param_groups:
        for option, key, value in (("optim.momentum", "momentum", optim.momentum),
                                   ("optim.nesterov", "nesterov", optim.nesterov),
                                   ("optim.weight_decay", "weight_decay", optim.weight_decay),
                                   ("optim.betas", "betas", tuple(optim.betas))):
            if option in changes and key in group:
                group[key] = value
    scheduler._apply()  # this epoch's rate from the (new) base rate, schedule and its parameters


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """'optim.lr 0.01 -> 5e-05, loop.epochs 1 -> 3'."""
    return ", ".join(f"{name} {before} -> {now}" for name, (before, now) in changes.items())


def record_changes(config_file: Path, started: dict[str, Any], epoch: int,
                   changes: dict[str, tuple[Any, Any]]) -> None:
    """Write config.json: the config the run started with (kept from the existing file, else `started`) and its
    changes, this resume's appended with the epoch (0-based) from which they take effect."""
    data = read_json(config_file, ConfigError) if config_file.is_file() else dict(started)
    if not isinstance(data, dict):
        data = dict(started)
    history = list(data.get(CHANGES_KEY) or [])
    if changes:
        history.append({"epoch": int(epoch), "options": {k: [before, now] for k, (before, now) in changes.items()}})
    if history:
        data[CHANGES_KEY] = history
    write_json_atomic(config_file, data)


def resume_tag(resume: bool | str | Path, out_dir: Path) -> str:
    """The checkpoint tag a resume continues from: "latest" for `--resume`, else the tag of PATH, which must be a
    checkpoint of this run (or its folder)."""
    if resume is True or resume in ("", "latest"):
        return "latest"
    path = Path(resume)
    if path.is_dir():
        folder, tag = path, "latest"
    else:
        folder, tag = path.parent, checkpoint_tag(path)
        if tag is None:
            raise ConfigError(f"--resume {path}: not a checkpoint of a voxseg run (checkpoint_latest.pt, "
                              "checkpoint_best.pt, checkpoint_final.pt or checkpoint_epoch_E.pt). To start a new run "
                              f"from another script's weights use --pretrained {path}")
        if not path.is_file():
            raise ConfigError(f"--resume {path}: the file does not exist")
    if folder.resolve() != out_dir.resolve():
        raise ConfigError(f"--resume {path}: that checkpoint belongs to the run in {folder}, not to {out_dir}; give "
                          "the work directory and --fold (and --configuration) of its run, or leave WORKDIR out: "
                          f"voxseg train --resume {path}")
    return tag


def run_of_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(work directory, fold) of a run's checkpoint or folder: WORKDIR/training/fold_F[/checkpoint_*.pt]."""
    path = Path(path)
    folder = FoldDir(path if path.is_dir() else path.parent)
    if not folder.in_workdir:
        raise ConfigError(f"--resume {path}: not inside a run folder (WORKDIR/training/fold_F); give WORKDIR and "
                          "--fold, or a checkpoint inside WORKDIR/training/fold_F")
    return folder.workdir.path, folder.fold
