"""Evaluation: Dice, IoU, HD95 and NSD per class and region, folder summaries, and a work directory's predictions
scored against its raw dataset (`voxseg.evaluate.workdir`, what cross-validation builds on)."""
from voxseg.evaluate.folder import evaluate_folder, format_table
from voxseg.evaluate.metrics import MetricOptions, compute_case_metrics, conventions
from voxseg.evaluate.settings import EvaluationSettings
from voxseg.evaluate.workdir import aggregate_folds, crossval_dir, evaluate_workdir_predictions, workdir_references

__all__ = ["EvaluationSettings", "MetricOptions", "aggregate_folds", "compute_case_metrics", "conventions",
           "crossval_dir", "evaluate_folder",
           "evaluate_workdir_predictions", "format_table", "workdir_references"]
