"""Cross-validation of one configuration: gather the trained folds' validation predictions, evaluate them
together, and decide the postprocessing from them (`voxseg evaluate --crossval WORKDIR` calls this and prints
the result).

When the decision keeps a largest component anywhere, the postprocessed predictions are written to
WORKDIR/training/crossval/postprocessed/ and evaluated too (its summary.json), so the table printed is the one
`voxseg predict` will deliver.

Example:
    >>> result = evaluate_crossval("work/synth")
    >>> result.summary["foreground_mean"]["dice"], result.postprocessing, result.final_summary["foreground_mean"]
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from voxseg.data.io import read_image, write_image
from voxseg.data.splits import trained_folds
from voxseg.errors import ConfigError
from voxseg.evaluate import EvaluationSettings
from voxseg.evaluate.workdir import aggregate_folds, crossval_dir, evaluate_workdir_predictions
from voxseg.infer.postprocess import apply_postprocessing, decide_postprocessing, describe_postprocessing
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


class CrossvalResult(NamedTuple):
    """What `evaluate_crossval` found.

    Attributes:
        summary: the evaluation of every fold's validation cases together (also training/crossval/summary.json).
        postprocessing: the decided largest-component postprocessing (also `postprocessing_file`).
        postprocessing_file: WORKDIR/postprocessing.json, which `voxseg predict` applies.
        final_summary: the evaluation after that postprocessing (training/crossval/postprocessed/summary.json);
            `summary` itself when the decision changes nothing.
    """

    summary: dict[str, Any]
    postprocessing: dict[str, Any]
    postprocessing_file: Path
    final_summary: dict[str, Any]

    @property
    def dice(self) -> tuple[float, float]:
        """Foreground-mean Dice before and after the postprocessing."""
        return self.summary["foreground_mean"]["dice"], self.final_summary["foreground_mean"]["dice"]


def evaluate_crossval(workdir: str | Path, folds: Sequence[int] | None = None,
                      settings: EvaluationSettings | None = None, **options: Any) -> CrossvalResult:
    """Evaluate the folds' validation predictions together, then keep largest-component postprocessing only
    where it raised their mean Dice.

    Args:
        workdir: the work directory with training/fold_N/validation/ predictions.
        folds: the folds to aggregate; None = every trained numbered fold.
        settings, options: how to score (`voxseg.evaluate.EvaluationSettings`: num_workers, tolerance_mm,
            convention, ...); `options` replace single fields.

    Returns:
        the summary (training/crossval/summary.json), the postprocessing decision, where it was saved, and the
        summary after postprocessing.
    """
    workdir = Path(workdir)
    if folds is None:
        folds = trained_folds(workdir)
        if not folds:
            raise ConfigError(f"{WorkDir(workdir).training} has no fold_N folders; train folds first "
                              f"('voxseg train {workdir} --fold N')")
    folds = list(folds)
    settings = EvaluationSettings.build(settings, **options)
    num_workers = settings.num_workers
    summary = aggregate_folds(workdir, folds=folds, settings=settings)
    plan = Plan.load(WorkDir(workdir).plans)
    out_file = WorkDir(workdir).postprocessing
    spec = decide_postprocessing(crossval_dir(workdir), Path(plan.raw_dataset) / "labelsTr", plan.regions,
                                 file_ending=plan.file_ending, out_file=out_file, num_workers=num_workers)
    final = summary
    if spec["largest_component"]:
        final = _evaluate_postprocessed(workdir, plan, spec, folds, settings)
    return CrossvalResult(summary, spec, out_file, final)


def _evaluate_postprocessed(workdir: Path, plan: Plan, spec: dict[str, Any], folds: list[int],
                            settings: EvaluationSettings) -> dict[str, Any]:
    """Apply `spec` to training/crossval/CASE files into training/crossval/postprocessed/ and evaluate them."""
    crossval, ending = crossval_dir(workdir), plan.file_ending
    out = WorkDir(workdir).crossval_postprocessed
    out.mkdir(exist_ok=True)
    for stale in out.glob(f"*{ending}"):  # a previous decision's files
        stale.unlink()

    def postprocess(path: Path) -> None:
        labels, geometry = read_image(path)
        write_image(out / path.name, apply_postprocessing(labels, spec), geometry)

    with ThreadPoolExecutor(settings.num_workers) as pool:
        list(pool.map(postprocess, sorted(p for p in crossval.glob(f"*{ending}") if p.name[0] != ".")))
    with warnings.catch_warnings():  # the same missing cases were reported by the first evaluation
        warnings.simplefilter("ignore", UserWarning)
        return evaluate_workdir_predictions(out, workdir, folds, settings)


def describe_crossval(workdir: str | Path, result: CrossvalResult) -> str:
    """The decision as a sentence (`voxseg.infer.postprocess.describe_postprocessing`) with the foreground-mean
    Dice before and after it, where it was saved, and which table `final_summary` is."""
    plan = Plan.load(WorkDir(workdir).plans)
    decision = describe_postprocessing(result.postprocessing, plan.regions, plan.class_names, result.dice)
    table = (f"the table is after postprocessing; before it: {WorkDir(workdir).crossval_summary}"
             if result.final_summary is not result.summary else "the table is the folds' predictions as they are")
    return (f"postprocessing: {decision}\n(saved to {result.postprocessing_file}, which 'voxseg predict' applies; "
            f"{table})")
