"""Cross-validation as one step: gather the trained folds' validation predictions, evaluate them together, and
decide the postprocessing from them (`voxseg evaluate --crossval WORKDIR` calls this and prints the result).

It sits above evaluation and inference (it uses both) and below the command line.

Example:
    >>> result = evaluate_crossval("work/synth")
    >>> result.summary["foreground_mean"]["dice"], result.postprocessing
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

from voxseg.data.splits import trained_folds
from voxseg.errors import ConfigError


class CrossvalResult(NamedTuple):
    """What `evaluate_crossval` found.

    Attributes:
        summary: the evaluation of every fold's validation cases together (also training/crossval/summary.json).
        postprocessing: the decided largest-component postprocessing (also `postprocessing_file`).
        postprocessing_file: WORKDIR/postprocessing.json, which `voxseg predict` applies.
    """

    summary: dict[str, Any]
    postprocessing: dict[str, Any]
    postprocessing_file: Path


def evaluate_crossval(workdir: str | Path, folds: Sequence[int] | None = None, num_workers: int = 1,
                      tolerance_mm: float = 1.0, convention: str = "voxseg") -> CrossvalResult:
    """Evaluate the folds' validation predictions together, then keep largest-component postprocessing only
    where it raised their mean Dice.

    Args:
        workdir: the work directory with training/fold_N/validation/ predictions.
        folds: the folds to aggregate; None = every trained numbered fold.
        num_workers: threads reading and scoring cases.
        tolerance_mm: surface Dice tolerance.
        convention: scoring convention of absent classes (`voxseg.evaluate.conventions.CONVENTIONS`).

    Returns:
        the summary (training/crossval/summary.json), the postprocessing decision and where it was saved.
    """
    from voxseg.evaluate.folder import aggregate_folds
    from voxseg.infer.postprocess import POSTPROCESSING_FILE, decide_postprocessing
    from voxseg.plans import Plan

    workdir = Path(workdir)
    if folds is None:
        folds = trained_folds(workdir)
        if not folds:
            raise ConfigError(f"{workdir}/training has no fold_N folders; train folds first "
                              f"('voxseg train {workdir} --fold N')")
    folds = list(folds)
    summary = aggregate_folds(workdir, folds=folds, num_workers=num_workers, tolerance_mm=tolerance_mm,
                              convention=convention)
    plan = Plan.load(workdir / "plans.json")
    out_file = workdir / POSTPROCESSING_FILE
    spec = decide_postprocessing(workdir / "training" / "crossval", Path(plan.raw_dataset) / "labelsTr", plan.regions,
                                 file_ending=plan.file_ending, out_file=out_file, num_workers=num_workers)
    return CrossvalResult(summary, spec, out_file)
