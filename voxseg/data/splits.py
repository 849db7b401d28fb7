"""Train/validation splits: `WORKDIR/splits.json` is a list of `{"train": [...], "val": [...]}`, one per fold.

`voxseg plan` writes seeded 5-fold splits unless `splits.json` already exists, so a split written by hand (or
copied from another tool) is kept and respected; `get_fold` checks it against the cases that actually exist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from voxseg.errors import ConfigError, VoxsegError
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.workdir import WorkDir

NNUNET_SPLITS_FILE = "splits_final.json"  # nnU-Net's split file: the same list of {"train", "val"} folds


def trained_folds(workdir: str | Path, checkpoint: str | None = None) -> list[int]:
    """The numbered folds of a work directory (or model folder), sorted; fold_all is not a numbered fold.

    Args:
        workdir: the work directory.
        checkpoint: None counts every WORKDIR/training/fold_N folder (a run was started there); a name such as
            "final" counts only folds with `checkpoint_{checkpoint}.pt` or its weights file (a run got that far, or
            the fold was installed from an archive).

    Example: training/fold_0/checkpoint_final.pt, training/fold_2/ (still running), training/fold_all/
    -> [0, 2], or [0] with checkpoint="final".
    """
    return [number for number, folder in WorkDir(workdir).numbered_folds().items()
            if checkpoint is None or folder.has_model(checkpoint)]


def make_kfold_splits(names: list[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Seeded k-fold cross-validation: every case is in exactly one fold's validation set.

    Cases are sorted first, so the result depends only on the set of names, the fold count and the seed.
    Fold sizes differ by at most one case.
    """
    names = sorted(set(names))
    if num_folds < 2:
        raise ConfigError(f"num_folds={num_folds}: k-fold splitting needs at least 2 folds (voxseg plan --folds N, "
                          "or a single split with --val-fraction)")
    if len(names) < num_folds:
        raise ConfigError(
            f"{len(names)} case(s) cannot be split into {num_folds} folds; use fewer folds (voxseg plan --folds N) "
            "or a single split (--val-fraction)"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    chunks = np.array_split(order, num_folds)
    splits = []
    for chunk in chunks:
        val = {names[i] for i in chunk}
        splits.append({"train": [n for n in names if n not in val], "val": sorted(val)})
    return splits


def make_fraction_split(names: list[str], val_fraction: float, seed: int = 12345) -> list[dict[str, list[str]]]:
    """One split holding out `val_fraction` of the cases (at least one case each side), seeded."""
    names = sorted(set(names))
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.2 "
                          "(voxseg plan --val-fraction)")
    if len(names) < 2:
        raise ConfigError(f"{len(names)} case(s) cannot be split into training and validation; add cases")
    num_val = min(max(1, int(round(val_fraction * len(names)))), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    val = {names[i] for i in order[:num_val]}
    return [{"train": [n for n in names if n not in val], "val": sorted(val)}]


def save_splits(workdir: str | Path, splits: list[dict[str, list[str]]]) -> Path:
    """Write `WORKDIR/splits.json` atomically; returns its path."""
    path = WorkDir(workdir).splits
    _validate_structure(splits, path)
    write_json_atomic(path, [{"train": list(s["train"]), "val": list(s["val"])} for s in splits])
    return path


def splits_file(workdir: str | Path) -> Path:
    """WORKDIR/splits.json; for a configuration folder without one (WORKDIR/configs/NAME), the parent work
    directory's, so that every configuration uses the same folds."""
    path = WorkDir(workdir).splits
    parent = WorkDir(workdir).parent
    return parent.splits if parent is not None and not path.exists() else path


def load_splits(workdir: str | Path) -> list[dict[str, list[str]]]:
    """Read `splits_file(workdir)`, checking it is a list of {"train": [...], "val": [...]}."""
    path = splits_file(workdir)
    splits = read_json(path, ConfigError, missing=f"run 'voxseg plan DATASET -o {workdir}' first or write it by hand",
                       invalid="fix it or delete it and re-run 'voxseg plan'")
    _validate_structure(splits, path)
    return splits


def read_nnunet_splits(path: str | Path, names: list[str]) -> list[dict[str, list[str]]]:
    """An nnU-Net `splits_final.json`, checked: every fold's cases must be cases of the dataset.

    Raises:
        ConfigError: the file is not a list of {"train": [...], "val": [...]} folds, or names unknown cases.
    """
    path = Path(path)
    splits = read_json(path, ConfigError, invalid="fix it or remove it to let 'voxseg plan' make the folds")
    _validate_structure(splits, path)
    known = set(names)
    for index, split in enumerate(splits):
        unknown = sorted(n for n in split["train"] + split["val"] if n not in known)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ConfigError(f"{path}: fold {index} names case(s) that are not in the dataset: {shown}; "
                              "fix the file or remove it to let 'voxseg plan' make the folds")
    return [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]


def _validate_structure(splits: Any, path: Path) -> None:
    if not isinstance(splits, list) or not splits:
        raise ConfigError(f"{path}: expected a non-empty list of {{\"train\": [...], \"val\": [...]}} entries")
    for index, split in enumerate(splits):
        if not isinstance(split, dict) or set(split) != {"train", "val"}:
            raise ConfigError(f"{path}: fold {index} must be an object with exactly the keys 'train' and 'val'")
        for key in ("train", "val"):
            if not isinstance(split[key], list) or not all(isinstance(n, str) for n in split[key]):
                raise ConfigError(f"{path}: fold {index} '{key}' must be a list of case names (strings)")
        if not split["train"]:
            raise ConfigError(f"{path}: fold {index} has no training cases")


def get_fold(
    workdir: str | Path, fold: int | str, available: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Training and validation case names of one fold.

    Args:
        workdir: work directory holding splits.json.
        fold: fold index (an int or a digit string from the CLI), or "all" to train on every case and validate
            on every case (no held-out data; useful for a final model after cross-validation).
        available: names of the cases that exist; by default the preprocessed cases in WORKDIR/preprocessed, or
            the cases of fingerprint.json when nothing is preprocessed yet. Names in the split that are not
            available raise a ConfigError (a typo in a hand-written splits.json is caught before training).

    Returns:
        (train_names, val_names), both sorted.
    """
    workdir = Path(workdir)
    splits = load_splits(workdir)
    if str(fold).lower() == "all":
        names = sorted({n for s in splits for key in ("train", "val") for n in s[key]})
        train, val = names, list(names)
    else:
        index = _fold_index(fold, len(splits), workdir)
        train, val = sorted(splits[index]["train"]), sorted(splits[index]["val"])
    known = available if available is not None else _available_cases(workdir)
    if known is not None:
        unknown = sorted(set(train + val) - set(known))
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ConfigError(
                f"{splits_file(workdir)}: fold {fold} names case(s) that do not exist: {shown}; "
                "fix the names in splits.json or delete it and re-run 'voxseg plan'"
            )
    return train, val


def _fold_index(fold: int | str, num_folds: int, workdir: Path) -> int:
    try:
        index = int(fold)
    except (TypeError, ValueError):
        raise ConfigError(f"fold '{fold}' is not a fold index; use 0..{num_folds - 1} or 'all'") from None
    if not 0 <= index < num_folds:
        raise ConfigError(
            f"fold {index} is out of range: {splits_file(workdir)} has {num_folds} fold(s); "
            f"use 0..{num_folds - 1} or 'all'"
        )
    return index


def _available_cases(workdir: Path) -> list[str] | None:
    """Cases present in the work directory: preprocessed arrays, else the fingerprint's case list."""
    preprocessed = WorkDir(workdir).preprocessed
    if preprocessed.is_dir():
        names = [p.stem for p in preprocessed.glob("*.npy") if not p.stem.endswith("_seg") and p.name[0] != "."]
        if names:
            return names
    fingerprint = WorkDir(workdir).fingerprint
    if fingerprint.is_file():
        try:
            return list(read_json(fingerprint)["case_names"])
        except (VoxsegError, KeyError, TypeError):
            return None
    return None
