"""`voxseg report`: one HTML page a reviewer opens first, with a folder of pictures and case pages beside it.

    report.html                  facts, per-class means, plots, the case table (worst first), training runs
    report_files/
      plots/*.png                Dice / HD95 distributions, volumes, uncertainty ranking, training curves
      cases/00000_NAME/          one folder per case: index.html, thumbnail.png, the layers of every plane

The page needs no network; keep the folder beside the page when moving it. The folder is built under a hidden
name and renamed into place, then the page is written (atomically), so a killed run leaves the previous report
whole. Cases are rendered by `num_workers` processes; 500 cases give one page of small lazily loaded thumbnails,
and each case's pictures load only when its page is opened.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

from voxseg.atomicio import staging_folder, sweep_stale_staging, write_text
from voxseg.data.io import SUPPORTED_ENDINGS, file_ending
from voxseg.errors import ConfigError, InputError
from voxseg.evaluate.conventions import describe as describe_convention
from voxseg.evaluate.folder import classes_from_labels, evaluate_folder, load_dataset_json
from voxseg.report import html
from voxseg.report.cases import CaseJob, case_folder_name, render_case
from voxseg.report.plots import metric_distributions, save_figure, uncertainty_ranking, volume_agreement
from voxseg.report.training import training_section
from voxseg.workdir import FoldDir
from voxseg.workers import exit_with_parent

__all__ = ["ReportSources", "default_report_path", "write_report"]


@dataclass
class ReportSources:
    """What a report shows.

    Attributes:
        predictions: folder of predicted label maps.
        references: folder of reference label maps with the same file names, or None (prediction-only report:
            volumes and uncertainty instead of metrics).
        images: folder of the images (CASE_0000.nii.gz or CASE.nii.gz), or case name -> the file of the channel
            to show; default: the imagesXX folder beside a labelsXX reference folder. Without images the pictures
            have a black background.
        dataset_json: labels, regions, ignore label, file ending and channel names (CT windowing); default the
            dataset.json beside the references.
        summary: an evaluation of these folders already made (`evaluate_folder`); made here when None.
        training: training runs whose curves and effective plan the report shows.
        title: the page's title.
        partial: the predictions are meant to cover some of the references only (a fold's validation cases), so
            references without a prediction are not warned about.
    """

    predictions: Path
    references: Path | None = None
    images: Path | dict[str, Path] | None = None
    dataset_json: Path | dict | None = None
    summary: dict[str, Any] | None = None
    training: Sequence[FoldDir] = field(default_factory=tuple)
    title: str | None = None
    partial: bool = False


def default_report_path(predictions: str | Path) -> Path:
    return Path(predictions) / "report.html"


def _image_folder(sources: ReportSources) -> Path | dict[str, Path] | None:
    if isinstance(sources.images, dict):
        return sources.images
    if sources.images is not None:
        if not Path(sources.images).is_dir():
            raise InputError(f"{sources.images}: image folder not found (--images)")
        return Path(sources.images)
    reference = sources.references
    if reference is not None and Path(reference).name.startswith("labels"):
        guess = Path(reference).parent / ("images" + Path(reference).name[len("labels"):])
        if guess.is_dir():
            return guess
    return None


def _image_of(folder: Path | dict[str, Path] | None, name: str) -> Path | None:
    if folder is None or isinstance(folder, dict):
        return None if folder is None else folder.get(name)
    for ending in SUPPORTED_ENDINGS:
        for candidate in (folder / f"{name}_0000{ending}", folder / f"{name}{ending}"):
            if candidate.is_file():
                return candidate
    return None


def _prediction_cases(folder: Path, meta: dict[str, Any] | None) -> list[tuple[str, Path]]:
    """(name, file) of every label map in a prediction folder (one file ending: the dataset's, else the first)."""
    if not folder.is_dir():
        raise InputError(f"{folder}: prediction folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_ending(p) in SUPPORTED_ENDINGS)
    ending = str(meta["file_ending"]) if meta and "file_ending" in meta else (file_ending(files[0]) if files else "")
    cases = [(p.name[: -len(ending)], p) for p in files if p.name.endswith(ending)]
    if not cases:
        raise InputError(f"{folder}: no predictions ({', '.join(SUPPORTED_ENDINGS)}) to report on")
    return cases


def _is_ct(meta: dict[str, Any] | None) -> bool:
    channels = (meta or {}).get("channel_names") or (meta or {}).get("modality") or {}
    first = channels.get("0") if isinstance(channels, dict) else None
    return str(first).strip().upper() == "CT"


def _jobs(sources: ReportSources, meta: dict[str, Any] | None, summary: dict[str, Any] | None,
          cases_dir: Path) -> list[CaseJob]:
    images = _image_folder(sources)
    if summary is not None:
        classes = summary["classes"]
        rows = [(case["name"], Path(case["prediction"]), Path(case["reference"]), case["metrics"])
                for case in summary["per_case"]]
        ignore = summary.get("ignore_label")
    else:
        if meta is None or "labels" not in meta:
            raise InputError(f"{sources.predictions}: the report needs the labels: pass --dataset-json "
                             "(the dataset.json of the model's dataset)")
        classes = classes_from_labels(meta["labels"])[0]
        rows = [(name, path, None, None) for name, path in _prediction_cases(Path(sources.predictions), meta)]
        ignore = meta["labels"].get("ignore") if isinstance(meta["labels"], dict) else None
    jobs = []
    for index, (name, prediction, reference, metrics) in enumerate(rows):
        probabilities = prediction.parent / f"{name}.npz"
        jobs.append(CaseJob(index, name, prediction, reference, _image_of(images, name),
                            probabilities if probabilities.is_file() else None, classes, metrics,
                            None if ignore is None else int(ignore), _is_ct(meta),
                            cases_dir / case_folder_name(index, name)))
    return jobs


def _render_all(jobs: list[CaseJob], legend_html: str, back: str, num_workers: int) -> list[dict[str, Any]]:
    if num_workers <= 1 or len(jobs) <= 1:
        return [render_case(job, legend_html, back) for job in jobs]
    with ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=exit_with_parent) as pool:
        return list(pool.map(render_case, jobs, [legend_html] * len(jobs), [back] * len(jobs)))


def _legend_labels(classes: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {name: spec["values"][0] for name, spec in classes.items()
            if len(spec["values"]) == 1 and spec.get("kind", "label") == "label"}


def _ordered(rows: list[dict[str, Any]], with_reference: bool) -> list[dict[str, Any]]:
    """Worst first: lowest mean Dice with a reference, highest uncertainty without one (else by name)."""
    def key(row: dict[str, Any]) -> tuple:
        value = row["mean_dice"] if with_reference else row["uncertainty"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return (1, 0.0, row["name"])
        return (0, value if with_reference else -value, row["name"])

    return sorted(rows, key=key)


def _plots(rows: list[dict[str, Any]], classes: dict[str, Any], plots_dir: Path, files: str) -> str:
    plots_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    if any(row["metrics"] for row in rows):
        per_case = [{"metrics": row["metrics"]} for row in rows]
        save_figure(metric_distributions(per_case, classes), plots_dir / "metrics.png")
        save_figure(volume_agreement(per_case, classes), plots_dir / "volumes.png")
        parts += [html.figure(f"{files}/plots/metrics.png", "Dice and HD95 per class, one dot per case"),
                  html.figure(f"{files}/plots/volumes.png", "predicted vs reference volume per class")]
    scored = [row for row in rows if row["uncertainty"] is not None]
    if not scored and not any(row["metrics"] for row in rows):
        parts.append("<p class=note>No uncertainty: it is computed from the probabilities, which 'voxseg predict "
                     "--save-probabilities' keeps (OUT/CASE.npz).</p>")
    if scored:
        save_figure(uncertainty_ranking([r["name"] for r in scored], [r["uncertainty"] for r in scored]),
                    plots_dir / "uncertainty.png")
        parts.append(html.figure(f"{files}/plots/uncertainty.png", "mean uncertainty per case, highest first"))
    return "".join(parts)


def _sections(sources: ReportSources, summary: dict[str, Any] | None, rows: list[dict[str, Any]],
              classes: dict[str, Any], legend: str, staging: Path, files: str) -> list[tuple[str, str]]:
    with_reference = summary is not None
    for row in rows:
        row["page"] = f"{files}/cases/{row['folder']}/index.html"
        row["thumbnail"] = f"{files}/cases/{row['folder']}/thumbnail.png"
        row["score"] = row["mean_dice"] if with_reference else row["uncertainty"]
    sections = []
    if summary is not None:
        sections.append(("Mean per class", html.summary_table(summary)))
    plots = _plots(rows, classes, staging / "plots", files)
    if plots:
        sections.append(("Plots", plots))
    order = "worst mean Dice first" if with_reference else "most uncertain first"
    sections.append((f"Cases ({len(rows)}, {order}; click a column to sort, a case to see it)",
                     legend + html.cases_table(_ordered(rows, with_reference), list(classes), with_reference)))
    for fold in sources.training:
        sections.append(training_section(fold, staging / "plots", files))
    return sections


def _convention_text(name: str) -> str:
    """'voxseg; class empty in both: dice=1, ...; empty in the reference only: ...' (NaN: left out of means)."""
    rules = describe_convention(name)
    parts = [name]
    for key, title in (("both_empty", "class absent from both"), ("ref_empty", "absent from the reference only")):
        values = rules.get(key) or {}
        shown = ", ".join(f"{metric}={'NaN' if value is None else value}" for metric, value in values.items())
        parts.append(f"{title}: {shown or 'metrics NaN, left out of the means'}")
    return "; ".join(parts)


def _facts(sources: ReportSources, summary: dict[str, Any] | None, count: int) -> list[tuple[str, str]]:
    facts = [("predictions", str(Path(sources.predictions).resolve()))]
    if sources.references is not None:
        facts.append(("references", str(Path(sources.references).resolve())))
    facts += [("cases", str(count)), ("written", time.strftime("%Y-%m-%d %H:%M:%S"))]
    if summary is not None:
        facts.append(("convention", _convention_text(str(summary.get("convention")))))
        facts.append(("surface Dice tolerance", f"{summary.get('tolerance_mm')} mm"))
        if summary.get("missing_predictions"):
            facts.append(("missing predictions", ", ".join(summary["missing_predictions"])))
    return facts


def write_report(sources: ReportSources, out: str | Path | None = None, num_workers: int = 1) -> Path:
    """Write the report (module docstring) to `out` (default PREDICTIONS/report.html); returns its path.

    Raises:
        InputError: folders or files missing, files not on the prediction's grid, no labels.
        ConfigError: `out` does not end in .html.
    """
    out = Path(out) if out is not None else default_report_path(sources.predictions)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{out}: the report is an HTML page; give a file name ending in .html (-o)")
    meta = load_dataset_json(sources.dataset_json, Path(sources.references or sources.predictions))
    summary = sources.summary
    if summary is None and sources.references is not None:
        with warnings.catch_warnings():
            if sources.partial:
                warnings.simplefilter("ignore", UserWarning)
            summary = evaluate_folder(sources.predictions, sources.references, dataset_json=meta, out=False,
                                      allow_missing=True)
    files_dir = out.parent / f"{out.stem}_files"
    sweep_stale_staging(files_dir)
    staging = staging_folder(files_dir, "report")
    try:
        jobs = _jobs(sources, meta, summary, staging / "cases")
        classes = jobs[0].classes if jobs else {}
        legend = html.legend(_legend_labels(classes), with_errors=summary is not None)
        rows = _render_all(jobs, legend, f"../../../{out.name}", num_workers)
        title = sources.title or f"voxseg report: {Path(sources.predictions).name}"
        page = html.main_page(title, _facts(sources, summary, len(rows)),
                              _sections(sources, summary, rows, classes, legend, staging, files_dir.name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, files_dir)
    write_text(out, page)
    return out


def _swap_in(staging: Path, files_dir: Path) -> None:
    """Put the new files folder where the old one was; the old one is removed only once the new one is there."""
    retired = None
    if files_dir.exists():
        retired = staging_folder(files_dir, "old")
        os.rmdir(retired)
        os.replace(files_dir, retired)
    os.replace(staging, files_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
