"""What evaluate refuses before it computes a mean: unmatched cases, undeclared or non-integer label values,
a negative tolerance. Each silently changes the means, so each is an error unless the caller allows it, and
what was allowed is listed in summary.json."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.data.check import label_values
from voxseg.errors import ConfigError, InputError
from voxseg.plans import LabelScheme

ALLOW_MISSING_HINT = "allow_missing=True (voxseg evaluate --allow-missing)"
ALLOW_UNDECLARED_HINT = "allow_undeclared=True (voxseg evaluate --allow-undeclared-labels)"


def _shown(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tolerance(tolerance_mm: float) -> float:
    """The surface-Dice tolerance in mm: finite and >= 0 (0 counts only surface voxels that coincide)."""
    if not (isinstance(tolerance_mm, (int, float)) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ConfigError(f"tolerance_mm={tolerance_mm!r}: the surface-Dice tolerance must be a distance >= 0 mm "
                          "(e.g. 1.0; voxseg evaluate --tolerance)")
    return float(tolerance_mm)


def match_predictions(pred_dir: Path, ref_dir: Path, names: list[str], ending: str,
                      allow_missing: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(present, missing, extra): references with a prediction, references without, predictions without reference.

    Raises:
        InputError: no reference has a prediction; or, unless `allow_missing`, any reference lacks a prediction
            or any prediction lacks a reference (each would change the means silently).
    """
    present = [n for n in names if (pred_dir / f"{n}{ending}").is_file()]
    missing = [n for n in names if n not in set(present)]
    known = set(names)
    extra = sorted(p.name[: -len(ending)] for p in pred_dir.iterdir()
                   if p.is_file() and p.name.endswith(ending) and not p.name.startswith(".")
                   and p.name[: -len(ending)] not in known)
    if not present:
        raise InputError(f"{pred_dir}: none of the {len(names)} references in {ref_dir} has a prediction '*{ending}'")
    problems = []
    if missing:
        problems.append(f"no prediction in {pred_dir} for {len(missing)} reference case(s): {_shown(missing)}")
    if extra:
        problems.append(f"no reference in {ref_dir} for {len(extra)} predicted case(s): {_shown(extra)}")
    if problems and not allow_missing:
        raise InputError("; ".join(problems) + f". Predict or remove them, or evaluate the matching cases only "
                         f"with {ALLOW_MISSING_HINT}; they are then listed in summary.json")
    for problem in problems:
        warnings.warn(f"{problem} (left out of the means)", stacklevel=3)
    return present, missing, extra


def declared_values(label_map: dict[str, Any]) -> set[int]:
    """Every label value dataset.json (or the labels option) declares, background 0 always included."""
    return LabelScheme(label_map).allowed_values | {0}


def case_label_values(array: np.ndarray, path: Path | str) -> list[int]:
    """Distinct integer values of a label file; InputError naming the file for NaN or non-integer values."""
    values, error = label_values(array)
    if error:
        raise InputError(f"{path}: {error}; evaluate needs integer label maps (a probability map must be turned "
                         "into labels first, e.g. by 'voxseg predict')")
    return values


def check_undeclared(undeclared: dict[str, dict[str, list[int]]], declared: set[int], allow: bool) -> None:
    """Refuse label values dataset.json does not declare (they are ignored by every metric) unless allowed."""
    if not undeclared or allow:
        return
    lines = [f"  {case}: " + ", ".join(f"{kind} {values}" for kind, values in found.items())
             for case, found in undeclared.items()]
    raise InputError(f"{len(undeclared)} case(s) hold label values dataset.json does not declare (declared: "
                     f"{sorted(declared)}); no metric would see them:\n" + "\n".join(lines) +
                     f"\nFix the files or the labels, or list them only with {ALLOW_UNDECLARED_HINT}")
