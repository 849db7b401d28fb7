"""Named conventions for the cases the metric formulas leave open: a class absent from the reference (and
perhaps the prediction), and the surface and HD95 definitions. Other toolkits score them differently, so a
number is only comparable with the convention it was computed under; summary.json and the table say which one
was used.

    ========  ============================================  ==============================================
    name      class absent from both                        class absent from the reference only
    ========  ============================================  ==============================================
    voxseg    Dice/IoU/NSD 1, HD95 0                        Dice/IoU/NSD 0, HD95 NaN or diagonal (option)
    nnunet    Dice/IoU NaN (nnU-Net's nanmean skips it)     as voxseg
    monai     every metric NaN                              Dice/IoU/HD95 NaN (MONAI's ignore_empty), NSD 0
    brats     Dice/IoU/NSD 1, HD95 0                        Dice/IoU/NSD 0, HD95 373.13 mm (BraTS' worst)
    ========  ============================================  ==============================================

A class present in the reference but not in the prediction scores Dice/IoU/NSD 0 everywhere, HD95 NaN (or the
diagonal) except under brats (373.13 mm). NaN values are left out of means and counted.

Surface and HD95: voxseg and nnunet use voxseg's surface (mask minus its 26-neighbour erosion) and the 95th
percentile of both directed distance sets pooled; monai uses MONAI's surface (`get_mask_edges`: minus the
6-neighbour erosion) for HD95 and NSD and the larger of the two directed 95th percentiles
(`compute_hausdorff_distance(percentile=95)`); brats uses voxseg's surface and the larger of the two directed
95th percentiles, as the BraTS 2023 evaluation's robust Hausdorff distance does (it weighs surface elements by
area, which voxseg does not model). `benchmarks/evaluate_conventions.py` checks these against MONAI and nnU-Net.
"""
from __future__ import annotations

from typing import Any

from voxseg.errors import ConfigError

NAN = float("nan")
BRATS_WORST_HD95_MM = 373.13
CONVENTIONS: dict[str, dict[str, Any]] = {
    "voxseg": {"both_empty": {}, "ref_empty": {}},
    "nnunet": {"both_empty": {"dice": NAN, "iou": NAN}, "ref_empty": {}},
    "monai": {"both_empty": {"dice": NAN, "iou": NAN, "hd95": NAN, "nsd": NAN},
              "ref_empty": {"dice": NAN, "iou": NAN, "hd95": NAN}, "pred_empty": {"hd95": NAN},
              "metrics": {"surface_connectivity": "face", "hd95_mode": "max_directed"}},
    "brats": {"both_empty": {}, "ref_empty": {"hd95": BRATS_WORST_HD95_MM}, "pred_empty": {"hd95": BRATS_WORST_HD95_MM},
              "metrics": {"hd95_mode": "max_directed"}},
}


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention '{convention}' is unknown; use one of {', '.join(CONVENTIONS)} "
                          "(voxseg evaluate --convention)")
    return convention


def metric_options(convention: str) -> dict[str, str]:
    """The surface and HD95 definitions of `convention`, as keyword options of `compute_case_metrics`."""
    return dict(CONVENTIONS[check_convention(convention)].get("metrics", {}))


def apply_convention(metrics: dict[str, Any], convention: str) -> dict[str, Any]:
    """One class's metrics (from `binary_metrics`, computed under the voxseg convention) under `convention`."""
    rules = CONVENTIONS[check_convention(convention)]
    pred_empty, ref_empty = metrics["tp"] + metrics["fp"] == 0, metrics["tp"] + metrics["fn"] == 0
    if pred_empty and ref_empty:
        changes = rules["both_empty"]
    elif ref_empty:
        changes = rules["ref_empty"]
    elif pred_empty:
        changes = rules.get("pred_empty", {})
    else:
        return metrics
    return {**metrics, **changes}


def describe(convention: str) -> dict[str, Any]:
    """The empty-class values of `convention`, for summary.json (None where the metric is NaN)."""
    rules = CONVENTIONS[check_convention(convention)]
    def plain(values: dict[str, float]) -> dict[str, float | None]:
        return {k: (None if v != v else v) for k, v in values.items()}
    return {"name": convention, **{key: plain(values) for key, values in rules.items()}}
