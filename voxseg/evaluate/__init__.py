"""Evaluation: Dice, IoU, HD95 and NSD per class and region, folder summaries, cross-validation aggregation."""
from voxseg.evaluate.folder import aggregate_folds, evaluate_folder, format_table
from voxseg.evaluate.metrics import compute_case_metrics, conventions

__all__ = ["aggregate_folds", "compute_case_metrics", "conventions", "evaluate_folder", "format_table"]
