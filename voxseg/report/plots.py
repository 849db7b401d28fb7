"""The report's plots, drawn with matplotlib's object API (no pyplot state, Agg renderer).

    metric_distributions   Dice and HD95 per class: a box plot with every case as a dot over it
    volume_agreement       predicted vs reference volume per class, with the identity line
    uncertainty_ranking    the cases' mean entropy, highest first (prediction-only reports)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from voxseg.atomicio import atomic_path
from voxseg.report.overlay import label_colour

__all__ = ["metric_distributions", "save_figure", "uncertainty_ranking", "volume_agreement"]


def save_figure(figure: Any, path: Path, dpi: int = 90) -> None:
    """Write a matplotlib Figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _class_colour(values: Sequence[int] | None, position: int) -> tuple[float, ...]:
    value = int(values[0]) if values else position + 1
    return tuple(c / 255.0 for c in label_colour(value))


def metric_distributions(per_case: list[dict], classes: dict[str, Any]) -> Any:
    """Dice (left) and HD95 (right) per class: boxes over every case's value, the dots jittered sideways."""
    from matplotlib.figure import Figure

    names = list(classes)
    height = max(2.5, 0.45 * len(names) + 1.2)
    figure = Figure(figsize=(10, height))
    axes = figure.subplots(1, 2, sharey=True)
    rng = np.random.default_rng(0)  # the same jitter on every run
    for axis, metric, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (mm)")):
        series = [_finite([case["metrics"][name][metric] for case in per_case]) for name in names]
        positions = np.arange(len(names))
        boxes = [s if s else [math.nan] for s in series]
        axis.boxplot(boxes, positions=positions, orientation="horizontal", widths=0.6, showfliers=False)
        for row, (name, values) in enumerate(zip(names, series)):
            colour = _class_colour(classes[name].get("values"), row)
            axis.scatter(values, row + rng.uniform(-0.18, 0.18, len(values)), s=9, color=colour, alpha=0.8,
                         edgecolors="none", zorder=3)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3, axis="x")
    axes[0].set_xlim(-0.02, 1.02)
    axes[0].set_yticks(np.arange(len(names)), names)
    axes[0].invert_yaxis()
    figure.tight_layout()
    return figure


def volume_agreement(per_case: list[dict], classes: dict[str, Any]) -> Any:
    """Predicted against reference volume (ml), one panel per class, the identity line dashed."""
    from matplotlib.figure import Figure

    names = list(classes)
    columns = min(4, max(1, len(names)))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.0 * rows))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    for position, (axis, name) in enumerate(zip(axes, names)):
        points = [(case["metrics"][name]["ref_volume_ml"], case["metrics"][name]["pred_volume_ml"])
                  for case in per_case]
        points = [(r, p) for r, p in points if r is not None and p is not None]
        reference = [r for r, _ in points]
        predicted = [p for _, p in points]
        axis.scatter(reference, predicted, s=12, color=_class_colour(classes[name].get("values"), position))
        top = max(reference + predicted + [1e-3]) * 1.05
        axis.plot([0, top], [0, top], "--", color="grey", linewidth=1)
        axis.set_xlim(0, top)
        axis.set_ylim(0, top)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("reference (ml)", fontsize=8)
        axis.set_ylabel("predicted (ml)", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes[len(names):]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure


def uncertainty_ranking(names: list[str], scores: list[float]) -> Any:
    """Mean entropy per case as horizontal bars, the most uncertain case on top (at most 40 cases)."""
    from matplotlib.figure import Figure

    order = sorted(range(len(names)), key=lambda k: -scores[k])[:40]
    figure = Figure(figsize=(8, max(2.0, 0.25 * len(order) + 1.0)))
    axis = figure.subplots()
    axis.barh(np.arange(len(order)), [scores[k] for k in order], color="#e6550d")
    axis.set_yticks(np.arange(len(order)), [names[k] for k in order], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("mean normalised entropy of the predicted foreground")
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    return figure
