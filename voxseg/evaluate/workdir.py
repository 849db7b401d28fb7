"""A work directory's predictions scored against the labels of the raw dataset it was planned from: the interface
cross-validation (`voxseg.crossval`) builds on.

The references are the raw dataset's labelsTr (plans.json `raw_dataset`); labels, regions and file ending come
from the work directory's dataset.json copy (else the raw one) and its plans.json. Every function here scores
with `allow_missing=True`: a work directory's predictions cover some of the training cases (a fold's validation
cases, or all folds together), never necessarily all of them.

Example:
    >>> summary = aggregate_folds("work/synth", folds=range(5))   # training/crossval/summary.json
    >>> again = evaluate_workdir_predictions(crossval_dir("work/synth"), "work/synth", folds=range(5))
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from voxseg.errors import ConfigError, InputError
from voxseg.evaluate.folder import evaluate_folder, load_dataset_json
from voxseg.evaluate.settings import EvaluationSettings
from voxseg.evaluate.summary import write_summary
from voxseg.jsonio import read_json
from voxseg.workdir import WorkDir

__all__ = ["References", "aggregate_folds", "crossval_dir", "evaluate_workdir_predictions", "workdir_references"]


class References(NamedTuple):
    """What a work directory's predictions are scored against.

    Attributes:
        labels_dir: the raw dataset's labelsTr.
        dataset: dataset.json (labels, regions, ignore label).
        file_ending: the raw images' file ending, e.g. ".nii.gz".
    """

    labels_dir: Path
    dataset: dict[str, Any]
    file_ending: str


def crossval_dir(workdir: str | Path) -> Path:
    """WORKDIR/training/crossval: every fold's validation predictions together, and their summary."""
    return WorkDir(workdir).crossval


def workdir_references(workdir: str | Path) -> References:
    """The raw dataset's labels that `workdir`'s predictions are scored against.

    Raises:
        InputError: no plans.json, or the raw dataset's labelsTr is not where plans.json says.
        ConfigError: plans.json names no raw dataset.
    """
    workdir = Path(workdir)
    plans_path = WorkDir(workdir).plans
    if not plans_path.is_file():
        raise InputError(f"{plans_path} not found: is {workdir} a voxseg work directory ('voxseg plan')?")
    plans = read_json(plans_path, ConfigError, invalid="fix it or re-run 'voxseg plan'")
    if "raw_dataset" not in plans:
        raise ConfigError(f"{plans_path}: no 'raw_dataset' entry; re-run 'voxseg plan'")
    raw = Path(plans["raw_dataset"])
    copy = WorkDir(workdir).dataset_json
    meta_path = copy if copy.is_file() else raw / "dataset.json"
    meta = load_dataset_json(meta_path, raw)
    assert meta is not None
    ending = str(plans.get("file_ending") or meta["file_ending"])
    if not (raw / "labelsTr").is_dir():
        raise InputError(f"{raw / 'labelsTr'}: the raw dataset's labels (plans.json 'raw_dataset') are not there")
    return References(raw / "labelsTr", meta, ending)


def evaluate_workdir_predictions(
    pred_dir: str | Path,
    workdir: str | Path,
    folds: Iterable[int],
    settings: EvaluationSettings | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score the label maps in `pred_dir` (cases of `workdir`'s dataset, predicted by `folds`) against the raw
    dataset's labels; the summary, with its "folds", goes to `pred_dir`/summary.json and .csv.

    Args:
        pred_dir: the label maps, named like the references (CASE + file ending).
        workdir: the work directory whose plans.json names the raw dataset.
        folds: the folds whose validation cases `pred_dir` holds (recorded in the summary).
        settings, options: how to score, as for `voxseg.evaluate.folder.evaluate_folder` (the file ending is
            the dataset's; cases without a prediction are allowed).
    """
    references = workdir_references(workdir)
    settings = EvaluationSettings.build(settings, **options)
    settings = dataclasses.replace(settings, file_ending=references.file_ending, allow_missing=True)
    summary = evaluate_folder(pred_dir, references.labels_dir, references.dataset, out=False, settings=settings)
    summary["folds"] = list(folds)
    write_summary(summary, pred_dir)
    return summary


def aggregate_folds(
    workdir: str | Path,
    folds: Iterable[int] = range(5),
    settings: EvaluationSettings | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Gather every fold's validation predictions into WORKDIR/training/crossval/ and evaluate them together
    (`settings`/`options` as for `evaluate_workdir_predictions`).

    Predictions are hard-linked (copied across filesystems) from WORKDIR/training/fold_F/validation/ and
    evaluated against the raw dataset's labelsTr; summary.json/csv go into the crossval folder.

    Raises:
        InputError: a fold has no validation predictions, or two folds predicted the same case.
    """
    workdir = Path(workdir)
    ending = workdir_references(workdir).file_ending
    folds = list(folds)
    sources = _fold_predictions(workdir, folds, ending)
    crossval = crossval_dir(workdir)
    crossval.mkdir(parents=True, exist_ok=True)
    for stale in crossval.glob(f"*{ending}"):  # a previous run may have used other folds
        stale.unlink()
    for name, (_, path) in sources.items():
        _link_or_copy(path, crossval / f"{name}{ending}")
    return evaluate_workdir_predictions(crossval, workdir, folds, settings, **options)


def _fold_predictions(workdir: Path, folds: list[int], ending: str) -> dict[str, tuple[int, Path]]:
    """{case: (fold, its validation prediction)} over `folds`; refuses a fold without predictions and a case
    two folds predicted."""
    sources: dict[str, tuple[int, Path]] = {}
    for fold in folds:
        val_dir = WorkDir(workdir).fold(fold).validation
        files = sorted(p for p in val_dir.glob(f"*{ending}") if p.name[0] != ".") if val_dir.is_dir() else []
        if not files:
            raise InputError(
                f"fold {fold} has no validation predictions in {val_dir}; finish training it "
                f"('voxseg train {workdir} --fold {fold}') or leave it out of folds"
            )
        for path in files:
            name = path.name[: -len(ending)]
            if name in sources:
                raise InputError(
                    f"case {name} was predicted by fold {sources[name][0]} and fold {fold}: the folds' "
                    "validation sets overlap, so they cannot be aggregated into one cross-validation"
                )
            sources[name] = (fold, path)
    return sources


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # other filesystem, or links not allowed
        shutil.copy2(src, dst)
