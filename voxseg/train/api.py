"""Training from Python the way `voxseg train` does it: where a run's config comes from, then the run.

The command line calls these two functions and only prints, so a run started from Python with the same
options gets the same config, resumes the same way and writes the same files.

Example:
    >>> config = build_train_config("work/synth", 0, recipe="fast", overrides=["optim.lr=1e-3"])
    >>> result = train_fold("work/synth", 0, start=RunStart(resume=True), overrides=["loop.epochs=1500"])
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

from voxseg.config import TrainConfig, apply_overrides, load_config_json
from voxseg.errors import ConfigError
from voxseg.train.recipes import apply_recipe
from voxseg.train.start import RunStart
from voxseg.workdir import WorkDir


def build_train_config(workdir: str | Path, fold: int | str = 0, config: TrainConfig | None = None,
                       config_file: str | Path | None = None, recipe: str | None = None,
                       overrides: Iterable[str] = (), start: RunStart = RunStart()) -> TrainConfig:
    """The config of a training run, built in a fixed order.

    1. The starting config: `config`, else `config_file`, else (resuming) the run's own
       training/fold_F/config.json with the changes of earlier resumes replayed, so a resumed run continues with
       the settings in force, else the defaults.
    2. The recipe (`voxseg.train.recipes`), so that everything after it wins.
    3. The dotted overrides, in order (`section.field=value`, `plan.key=value`).

    Args:
        workdir: the work directory (only read, for a resumed run's config.json).
        fold: fold index or "all".
        config: a starting config (not modified).
        config_file: a JSON config to start from (a saved config.json works).
        recipe: a recipe name, e.g. "fast".
        overrides: dotted overrides, validated like `voxseg.config.apply_overrides`.
        start: with `start.resume`, start from the fold's config.json when it exists (the run itself resumes in
            `train_fold`).

    Raises:
        ConfigError: both `config` and `config_file`, an unknown recipe or option, or an invalid value.
    """
    if config is not None and config_file is not None:
        raise ConfigError("give a config or a config file, not both")
    saved = WorkDir(workdir).fold(fold).config
    if config is not None:
        start = copy.deepcopy(config)
    elif config_file is not None:
        start = load_config_json(config_file)
    elif start.resume and saved.is_file():
        start = load_config_json(saved)
    else:
        start = TrainConfig()
    if recipe:
        start = apply_recipe(start, recipe)
    return apply_overrides(start, list(overrides))


def train_fold(workdir: str | Path, fold: int | str = 0, config: TrainConfig | None = None, *,
               config_file: str | Path | None = None, recipe: str | None = None, overrides: Iterable[str] = (),
               start: RunStart = RunStart(), test_only: bool | str = False) -> dict[str, Any]:
    """Train one fold with the config `build_train_config` builds, or with `test_only` evaluate its checkpoint.

    Args:
        workdir, fold, config, config_file, recipe, overrides: as in `build_train_config`.
        start: how the run starts (`voxseg.train.start.RunStart`): `resume` continues from
            training/fold_F/checkpoint_latest.pt, or from the checkpoint of the run it names (a changed effective
            plan, loss, optimiser or seed is refused; other changed options take effect from the next epoch and
            are recorded in config.json); `pretrained` initialises from a checkpoint's matching weights; `force`
            trains anew when the fold already holds a run, deleting it first (without it, refused).
        test_only: no training: validate on full volumes (`voxseg.train.testonly.evaluate_fold`): True =
            checkpoint_best.pt (else checkpoint_final.pt), or "final" / "best" / "latest" for that checkpoint.

    Returns:
        the metrics of `voxseg.train.loop.train`: {"epochs", "best_ema_dice", "stopped_early", "val_dice_mean",
        "val_dice", "seconds"}; with `test_only` those of `evaluate_fold`.
    """
    config = build_train_config(workdir, fold, config, config_file, recipe, overrides, start)
    if test_only:
        from voxseg.train.testonly import evaluate_fold  # torch and the network: only when a run starts

        return evaluate_fold(workdir, fold, config, test_only)
    from voxseg.train import loop

    return loop.train(workdir, fold, config, start=start)
