"""Evaluation summaries: per-class means over cases, the foreground mean, summary.json / summary.csv, a table.

`voxseg.evaluate.folder` builds the per-case metrics; this module aggregates and writes them. NaN (a metric
that is undefined for a case, see `voxseg.evaluate.metrics.conventions`) is left out of means, written as
null in summary.json and as "nan" in summary.csv.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from voxseg.atomicio import write_text
from voxseg.jsonio import write_json_atomic

__all__ = ["CSV_COLUMNS", "MEAN_METRICS", "class_means", "foreground_mean", "format_table", "nan_to_none",
           "write_summary"]

CSV_COLUMNS = ("dice", "iou", "hd95", "nsd", "tp", "fp", "fn", "tn", "pred_volume_ml", "ref_volume_ml")
MEAN_METRICS = CSV_COLUMNS


def nan_to_none(value: Any) -> Any:
    """A copy of a nested dict/list with float NaN replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value


def _mean(values: Iterable[float]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def class_means(per_case: list[dict], name: str) -> dict[str, Any]:
    """Mean of every metric of class `name` over the cases (NaN left out), with the case and empty counts."""
    rows = [case["metrics"][name] for case in per_case]
    mean: dict[str, Any] = {metric: _mean(row[metric] for row in rows) for metric in MEAN_METRICS}
    mean["n"] = len(rows)
    mean["n_hd95_nan"] = sum(1 for row in rows if math.isnan(row["hd95"]))
    mean["n_ref_empty"] = sum(1 for row in rows if row["tp"] + row["fn"] == 0)
    mean["n_pred_empty"] = sum(1 for row in rows if row["tp"] + row["fp"] == 0)
    return mean


def foreground_mean(mean: dict[str, dict[str, Any]], foreground: list[str]) -> dict[str, Any]:
    """Mean over the dataset's classes of their per-class means (NaN class means left out)."""
    names = [n for n in foreground if n in mean]
    result: dict[str, Any] = {m: _mean(mean[n][m] for n in names) for m in ("dice", "iou", "hd95", "nsd")}
    result["classes"] = names
    return result


def write_summary(summary: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write summary.json and summary.csv (one row per case x class) atomically into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "summary.json", out / "summary.csv"
    write_json_atomic(json_path, nan_to_none(summary))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("case", "class") + CSV_COLUMNS)
    for case in summary["per_case"]:
        for name, metrics in case["metrics"].items():
            cells = ["nan" if metrics[m] is None else metrics[m] for m in CSV_COLUMNS]
            writer.writerow([case["name"], name, *cells])
    write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the per-class means and the foreground mean."""

    def cell(value: Any, digits: int) -> str:
        return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    header = f"{'class':<20} {'Dice':>7} {'IoU':>7} {'HD95 mm':>8} {'NSD':>7} {'n':>5} {'no HD95':>8}"
    lines = [header, "-" * len(header)]
    for name, m in summary["mean"].items():
        lines.append(
            f"{name:<20} {cell(m['dice'], 4):>7} {cell(m['iou'], 4):>7} {cell(m['hd95'], 2):>8} "
            f"{cell(m['nsd'], 4):>7} {m['n']:>5} {m['n_hd95_nan']:>8}"
        )
    fg = summary["foreground_mean"]
    lines.append("-" * len(header))
    lines.append(
        f"{'foreground mean':<20} {cell(fg['dice'], 4):>7} {cell(fg['iou'], 4):>7} {cell(fg['hd95'], 2):>8} "
        f"{cell(fg['nsd'], 4):>7} {summary['counts']['cases']:>5}"
    )
    if summary.get("missing_predictions"):
        lines.append(f"missing predictions: {len(summary['missing_predictions'])}")
    if summary.get("extra_predictions"):
        lines.append(f"predictions without reference (not evaluated): {len(summary['extra_predictions'])}")
    if summary.get("convention"):
        lines.append(f"convention: {summary['convention']} (a class absent from the reference: see "
                     "summary.json 'conventions.empty_classes')")
    return "\n".join(lines)
