"""Evaluate a folder of predictions against a folder of references.

Classes evaluated (each a set of label values, see `classes_from_labels`):
    - every named label of dataset.json (``"liver": 1``) -> kind "label";
    - every region of dataset.json (a list value, ``"whole_tumor": [1, 2, 3]``) -> kind "region", unless
      ``regions=False``; in region-based datasets every value that has no name of its own gets a class
      ``label_<value>`` (kind "label") so each label value is reported too;
    - extra regions given as ``regions={"name": [values]}`` -> kind "extra_region".
The foreground mean averages the per-class means of the classes dataset.json names (what the network predicts),
not the extra ones. The ignore label, if any, is left out of every metric.

Outputs (atomic writes into `out`, default the prediction folder; written by `voxseg.evaluate.summary`):
    summary.json  per_case list, mean per class, foreground_mean, conventions, counts; NaN is written as null.
    summary.csv   one row per case x class; NaN is written as "nan".
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from voxseg.data.io import SUPPORTED_ENDINGS, geometry_differences, read_image
from voxseg.data.io import file_ending as _file_ending
from voxseg.errors import ConfigError, InputError
from voxseg.evaluate.conventions import apply_convention, metric_options
from voxseg.evaluate.conventions import describe as describe_convention
from voxseg.evaluate.matching import (
    case_label_values,
    check_undeclared,
    declared_values,
    match_predictions,
)
from voxseg.evaluate.metrics import MetricOptions, compute_case_metrics, conventions
from voxseg.evaluate.settings import EvaluationSettings
from voxseg.evaluate.summary import (
    CSV_COLUMNS,
    MEAN_METRICS,
    class_means,
    foreground_mean,
    format_table,
    nan_to_none,
    write_summary,
)
from voxseg.jsonio import read_json
from voxseg.labels import LabelScheme
from voxseg.workers import exit_with_parent

__all__ = [
    "CSV_COLUMNS", "MEAN_METRICS", "classes_from_labels", "evaluate_case", "evaluate_folder", "format_table",
    "load_dataset_json", "write_summary",
]


def load_dataset_json(dataset_json: str | Path | dict | None, ref_dir: Path) -> dict[str, Any] | None:
    """dataset.json as a dict: `dataset_json` itself (a dict or a path), else the one beside `ref_dir` (a raw
    dataset's labelsTr), else None."""
    if isinstance(dataset_json, dict):
        return dataset_json
    if dataset_json is None:
        # a raw dataset's labelsTr sits next to its dataset.json
        candidates = [ref_dir / "dataset.json", ref_dir.parent / "dataset.json"]
        dataset_json = next((c for c in candidates if c.is_file()), None)
        if dataset_json is None:
            return None
    return read_json(dataset_json, InputError, missing="pass the dataset's dataset.json or the labels")


def classes_from_labels(
    labels: dict[str, Any], regions: bool | dict[str, list[int]] = True
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Turn a dataset.json `labels` mapping (plus optional extra regions) into the classes to evaluate.

    Returns:
        (classes, foreground): name -> {"values": [...], "kind": "label"|"region"|"extra_region"}, and the names
        that enter the foreground mean.
    """
    classes: dict[str, dict[str, Any]] = {}
    foreground: list[str] = []
    named_values: set[int] = set()
    region_values: set[int] = set()
    for name in LabelScheme(labels).class_names:
        value = labels[name]
        if isinstance(value, (list, tuple)):
            region_values.update(int(v) for v in value)
            if regions is False:
                continue
            classes[name] = {"values": sorted(int(v) for v in value), "kind": "region"}
        else:
            named_values.add(int(value))
            classes[name] = {"values": [int(value)], "kind": "label"}
        foreground.append(name)
    for value in sorted(region_values - named_values - {0}):
        classes.setdefault(f"label_{value}", {"values": [value], "kind": "label"})
    if isinstance(regions, dict):
        for name, values in regions.items():
            if name in classes:
                raise ConfigError(f"regions: '{name}' is already a class of dataset.json; pick another name")
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"regions: '{name}' must be a non-empty list of label values, got {values!r}")
            classes[name] = {"values": sorted(int(v) for v in values), "kind": "extra_region"}
    if not classes:
        raise ConfigError("no foreground labels to evaluate: labels has only background/ignore")
    return classes, foreground


def _resolve_labels(labels: dict | list | None, meta: dict | None,
                    source: Any = None) -> tuple[dict[str, Any], int | None]:
    if labels is None:
        if meta is None or "labels" not in meta:
            named = meta is not None and isinstance(source, (str, Path))
            where = f"{source} has no 'labels'" if named else "no labels"
            raise InputError(
                f"{where} to evaluate: pass dataset_json (path or dict with 'labels'; voxseg evaluate --dataset-json) "
                "or labels={'name': value}"
            )
        labels = meta["labels"]
    if isinstance(labels, (list, tuple)):
        labels = {f"label_{int(v)}": int(v) for v in labels}
    return dict(labels), LabelScheme(labels).ignore_label


def _list_references(ref_dir: Path, ending: str | None) -> tuple[list[str], str]:
    if not ref_dir.is_dir():
        raise InputError(f"{ref_dir}: reference folder not found")
    files = [p for p in sorted(ref_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if ending is None:
        endings = {_file_ending(p) for p in files} & set(SUPPORTED_ENDINGS)
        if len(endings) != 1:
            found = ", ".join(sorted(endings)) or "none"
            raise InputError(f"{ref_dir}: cannot tell the file ending (found {found}); pass file_ending")
        ending = endings.pop()
    names = [p.name[: -len(ending)] for p in files if p.name.endswith(ending)]
    if not names:
        raise InputError(f"{ref_dir}: no reference files ending in '{ending}'")
    return names, ending


def evaluate_case(*args: Any, **kwargs: Any) -> dict[str, dict[str, float | int]]:
    """Read one prediction/reference pair, check they share a grid and compute every class's metrics
    (the arguments of `evaluate_case_values`)."""
    return evaluate_case_values(*args, **kwargs)[0]


def evaluate_case_values(
    pred_file: str | Path,
    ref_file: str | Path,
    classes: dict[str, list[int]],
    settings: EvaluationSettings | None = None,
    ignore_value: int | None = None,
    declared: set[int] | None = None,
) -> tuple[dict[str, dict[str, float | int]], dict[str, list[int]]]:
    """Metrics of one prediction/reference pair, and the label values outside `declared` found in each file
    ({"prediction": [...], "reference": [...]}, only the kinds with such values).

    Raises:
        InputError: a file holds non-integer values, or the two files lie on different grids.
    """
    pred, pred_geometry = read_image(pred_file)
    ref, ref_geometry = read_image(ref_file)
    found = {"prediction": case_label_values(pred, pred_file), "reference": case_label_values(ref, ref_file)}
    if pred.shape != ref.shape:
        raise InputError(
            f"{pred_file}: shape {pred.shape} differs from the reference {ref_file} shape {ref.shape}; "
            "predictions must be written on the reference image's grid"
        )
    # headers store float32: the comparison allows a small origin difference, relative to the voxel size
    differences = geometry_differences(pred.shape, pred_geometry, ref.shape, ref_geometry)
    if differences:
        raise InputError(f"{pred_file}: geometry differs from the reference {ref_file}: {'; '.join(differences)}; "
                         "predictions must be written on the reference image's grid")
    undeclared = {kind: sorted(set(values) - declared) for kind, values in found.items()} if declared else {}
    settings = settings or EvaluationSettings()
    options = MetricOptions(settings.tolerance_mm, settings.one_empty_hd95, **metric_options(settings.convention))
    metrics = compute_case_metrics(pred, ref, ref_geometry.spacing, classes, options, ignore_value)
    metrics = {name: apply_convention(values, settings.convention) for name, values in metrics.items()}
    return metrics, {kind: values for kind, values in undeclared.items() if values}


def _run_cases(jobs: list[tuple], num_workers: int) -> list[tuple[dict, dict]]:
    if num_workers <= 1 or len(jobs) <= 1:
        return [evaluate_case_values(*job) for job in jobs]
    # spawn: forking a process that holds torch/CUDA or OpenMP threads can deadlock
    with ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=exit_with_parent) as pool:
        return list(pool.map(evaluate_case_values, *zip(*jobs)))


def evaluate_folder(
    pred_dir: str | Path,
    ref_dir: str | Path,
    dataset_json: str | Path | dict | None = None,
    labels: dict[str, Any] | list[int] | None = None,
    out: str | Path | bool | None = None,
    settings: EvaluationSettings | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate every reference in `ref_dir` that has a prediction of the same file name in `pred_dir`.

    Args:
        dataset_json: path or dict; gives the labels, regions, ignore label and file ending. When None, a
            dataset.json in `ref_dir` or its parent (a raw dataset's labelsTr) is used if present.
        labels: name -> value (or list of values) used instead of dataset.json's labels; a list of ints names
            each value `label_<value>`.
        out: folder for summary.json / summary.csv (default `pred_dir`); False writes nothing.
        settings, options: how to score (`EvaluationSettings`: regions, tolerance_mm, num_workers, file_ending,
            one_empty_hd95, allow_missing, allow_undeclared, convention); `options` replace single fields, e.g.
            `evaluate_folder(pred, ref, convention="brats", tolerance_mm=2.0)`.

    Returns:
        The summary (also written to summary.json), with NaN as None.

    Raises:
        InputError: folders or labels missing, no matching cases, unmatched cases (without `allow_missing`),
            undeclared label values (without `allow_undeclared`), a non-integer file, or a prediction on a
            different grid.
        ConfigError: a negative tolerance.
    """
    settings = EvaluationSettings.build(settings, **options)
    file_ending = settings.file_ending
    pred_dir, ref_dir = _existing_folders(Path(pred_dir), Path(ref_dir))
    meta = load_dataset_json(dataset_json, ref_dir)
    label_map, ignore_value = _resolve_labels(labels, meta, dataset_json)
    classes, foreground = classes_from_labels(label_map, settings.regions)
    if file_ending is None and meta is not None and "file_ending" in meta:
        file_ending = str(meta["file_ending"])
    names, ending = _list_references(ref_dir, file_ending)
    present, missing, extra = match_predictions(pred_dir, ref_dir, names, ending, settings.allow_missing)
    class_values = {name: spec["values"] for name, spec in classes.items()}
    declared = declared_values(label_map)
    jobs = [(pred_dir / f"{n}{ending}", ref_dir / f"{n}{ending}", class_values, settings, ignore_value, declared)
            for n in present]
    evaluated = _run_cases(jobs, settings.num_workers)
    undeclared = {n: found for n, (_, found) in zip(present, evaluated) if found}
    check_undeclared(undeclared, declared, settings.allow_undeclared)
    per_case = [{"name": n, "prediction": str(job[0]), "reference": str(job[1]), "metrics": metrics}
                for n, job, (metrics, _) in zip(present, jobs, evaluated)]
    summary = {
        "pred_dir": str(pred_dir.resolve()), "ref_dir": str(ref_dir.resolve()), "file_ending": ending,
        **_settings(settings), "classes": classes, "foreground_classes": foreground,
        "ignore_label": ignore_value,
        "counts": {"cases": len(present), "references": len(names), "missing_predictions": len(missing)},
        "missing_predictions": missing, "extra_predictions": extra, "undeclared_values": undeclared,
        **_means(per_case, classes, foreground), "per_case": per_case,
    }
    if out is not False:
        write_summary(summary, pred_dir if out is None or out is True else out)
    return nan_to_none(summary)



def _existing_folders(pred_dir: Path, ref_dir: Path) -> tuple[Path, Path]:
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found")
    if not ref_dir.is_dir():
        raise InputError(f"{ref_dir}: reference folder not found; give the folder of the reference label files")
    return pred_dir, ref_dir


def _settings(settings: EvaluationSettings) -> dict[str, Any]:
    return {"tolerance_mm": float(settings.tolerance_mm), "one_empty_hd95": settings.one_empty_hd95,
            "convention": settings.convention,
            "conventions": {**conventions(settings.one_empty_hd95),
                            "empty_classes": describe_convention(settings.convention)}}


def _means(per_case: list[dict], classes: dict[str, Any], foreground: list[str]) -> dict[str, Any]:
    mean = {name: class_means(per_case, name) for name in classes}
    return {"mean": mean, "foreground_mean": foreground_mean(mean, foreground)}
