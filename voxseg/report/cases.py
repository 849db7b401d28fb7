"""One case of a report: read its files, find where to look, write its pictures and its page.

`render_case` is a top-level function of plain arguments so that a process pool can run it; it returns the row
the report's case table needs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.data.io import Geometry, geometry_differences, read_image
from voxseg.errors import InputError
from voxseg.report import html
from voxseg.report.casefigures import CaseVolumes, points_of_interest, thumbnail, write_case_pictures, write_png
from voxseg.report.overlay import canonical
from voxseg.report.uncertainty import case_uncertainty, entropy_map

__all__ = ["CaseJob", "case_folder_name", "render_case"]


@dataclass(frozen=True)
class CaseJob:
    """What `render_case` needs for one case.

    Attributes:
        index: the case's position (makes folder names unique).
        prediction, reference, image, probabilities: files (reference, image and probabilities may be None).
        classes: name -> {"values": [...]} as `voxseg.evaluate.folder.classes_from_labels` gives.
        metrics: the case's metrics per class from the evaluation summary, or None.
        ignore_label: the reference value left out of every picture and number, or None.
        ct: window the image as CT.
        folder: where the case's pictures go (inside the report's files folder), and its page's name.
    """

    index: int
    name: str
    prediction: Path
    reference: Path | None
    image: Path | None
    probabilities: Path | None
    classes: dict[str, dict[str, Any]]
    metrics: dict[str, dict[str, Any]] | None
    ignore_label: int | None
    ct: bool
    folder: Path


def case_folder_name(index: int, name: str) -> str:
    """A file-system-safe, unique folder name for a case (its name is never used as a path as it is)."""
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}"


def _read_on_grid(path: Path, what: str, shape: tuple[int, ...], geometry: Geometry, case: str) -> np.ndarray:
    array, own = read_image(path)
    differences = geometry_differences(array.shape, own, shape, geometry)
    if differences:
        raise InputError(f"case '{case}': {what} {path} is not on the prediction's grid ({'; '.join(differences)})")
    return array


def _volumes_ml(labels: np.ndarray, classes: dict[str, dict[str, Any]], spacing: tuple[float, ...]) -> dict[str, float]:
    """Predicted volume per class, counted slab by slab (no full-size copy of the labels)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.zeros(1, dtype=np.int64)
    for start in range(0, labels.shape[0], 16):
        slab = np.bincount(np.asarray(labels[start:start + 16]).reshape(-1).clip(0).astype(np.intp))
        if slab.size > counts.size:
            counts = np.pad(counts, (0, slab.size - counts.size))
        counts[: slab.size] += slab
    return {name: float(sum(int(counts[v]) for v in spec["values"] if v < counts.size)) * voxel_ml
            for name, spec in classes.items()}


def load_case(job: CaseJob) -> tuple[CaseVolumes, float | None]:
    """The case on the patient's axes, and its mean uncertainty (None without probabilities)."""
    prediction, geometry = read_image(job.prediction)
    prediction = prediction.astype(np.int16, copy=False)
    reference = image = uncertainty = None
    if job.reference is not None:
        reference = _read_on_grid(job.reference, "reference", prediction.shape, geometry, job.name).astype(np.int16)
        if job.ignore_label is not None:
            ignored = reference == job.ignore_label
            reference[ignored] = 0
            prediction = np.where(ignored, 0, prediction).astype(np.int16)
    if job.image is not None:
        image = _read_on_grid(job.image, "image", prediction.shape, geometry, job.name)  # its own dtype: shown by
        # planes, each converted on its own
    score = None
    if job.probabilities is not None:
        uncertainty = entropy_map(job.probabilities)
        if uncertainty.shape != prediction.shape:
            raise InputError(f"case '{job.name}': probabilities {job.probabilities} have shape {uncertainty.shape}, "
                             f"the prediction {prediction.shape}; predict again with --save-probabilities")
        score = case_uncertainty(uncertainty, prediction)
    turned, spacing = canonical(prediction, geometry)
    others = [None if volume is None else canonical(volume, geometry)[0] for volume in (reference, image, uncertainty)]
    return CaseVolumes(turned, *others, spacing, ct=job.ct), score


def _mean_dice(metrics: dict[str, dict[str, Any]] | None, classes: dict[str, Any]) -> float:
    if not metrics:
        return math.nan
    values = [metrics[name]["dice"] for name in classes if name in metrics]
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _facts_table(job: CaseJob, volumes: dict[str, float], score: float | None) -> str:
    rows = []
    for name in job.classes:
        metrics = (job.metrics or {}).get(name)
        if metrics:
            cells = "".join(html.cell(metrics[key], digits) for key, digits in (
                ("dice", 4), ("iou", 4), ("hd95", 2), ("nsd", 4), ("pred_volume_ml", 2), ("ref_volume_ml", 2)))
        else:
            cells = html.cell(volumes[name], 2)
        rows.append(f"<tr><td class=name>{html.esc(name)}</td>{cells}</tr>")
    head = ("<th>Dice</th><th>IoU</th><th>HD95 mm</th><th>NSD</th><th>predicted ml</th><th>reference ml</th>"
            if job.metrics else "<th>predicted ml</th>")
    extra = "" if score is None else f"<p>mean uncertainty of the predicted foreground: {score:.4f}</p>"
    return (f"<table><thead><tr><th class=name>class</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"{extra}")


def render_case(job: CaseJob, legend_html: str, back: str) -> dict[str, Any]:
    """Pictures, thumbnail and page of one case (`back`: the link to the report's first page); returns its row for
    the case table."""
    case, score = load_case(job)
    points = points_of_interest(case)
    pictures = write_case_pictures(case, job.folder, points)
    write_png(job.folder / "thumbnail.png", thumbnail(case, points["structure"]))
    volumes = ({name: metrics["pred_volume_ml"] for name, metrics in job.metrics.items()} if job.metrics
               else _volumes_ml(case.prediction, job.classes, case.spacing))  # the evaluation counted them already
    page = html.case_page(job.name, _facts_table(job, volumes, score), pictures, legend_html, back=back)
    (job.folder / "index.html").write_text(page, encoding="utf-8")
    mean_dice = _mean_dice(job.metrics, job.classes)
    return {"name": job.name, "folder": job.folder.name, "metrics": job.metrics, "volumes_ml": volumes,
            "uncertainty": score, "mean_dice": mean_dice,
            "points": {k: [int(v) for v in p] for k, p in points.items()}}
