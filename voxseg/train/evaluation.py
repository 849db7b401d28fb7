"""Full validation of a fold: at the end of training (the final weights, into training/fold_F/validation/, which
cross-validation reads) and `--test-only` (a chosen checkpoint, into its own folder, touching nothing else).

`--test-only` writes training/fold_F/validation_{best,final,latest}/ and never the run's validation/ folder, its
saved probabilities or a cascade's stored first-stage predictions: evaluating a checkpoint does not change what
`voxseg evaluate --crossval` scores or chooses.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from voxseg.checkpoint import CHECKPOINT_CHOICES, checkpoint_identity, network_from_checkpoint
from voxseg.devices import amp_name
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.cascade import next_stage_target, stored_previous
from voxseg.infer.config import InferConfig
from voxseg.infer.validation import CascadeLinks, full_validation
from voxseg.jsonio import write_json_atomic
from voxseg.plans import Plan
from voxseg.workdir import FoldDir, WorkDir


def validation_config(plan: Plan, amp_dtype: torch.dtype | None, save_probabilities: bool = False) -> InferConfig:
    """How training validates on full volumes: `voxseg predict`'s sliding window (InferConfig's tile step)
    without test-time mirroring, the plan's batch as the tile batch and the run's autocast."""
    return InferConfig(tile_batch=max(1, plan.batch_size), mirror_axes="none", amp=amp_name(amp_dtype),
                       save_probabilities=save_probabilities)


def full_val_metrics(model: torch.nn.Module, plan: Plan, workdir: Path, val_dir: Path, names: list[str],
                     device: torch.device, amp_dtype: torch.dtype | None,
                     probabilities: bool = False) -> dict[str, Any]:
    """The run's own final validation of `names` into `val_dir` (`validation_config`); a cascade stage reads
    the first stage's stored predictions, a first stage writes them for the next stage.

    Returns:
        {"val_dice_mean", "val_dice": {class: dice}}.
    """
    links = CascadeLinks(stored_previous(workdir, plan), next_stage_target(workdir, plan))
    return _metrics(model, plan, workdir, names, val_dir, device, validation_config(plan, amp_dtype, probabilities),
                    links)


def _metrics(model: torch.nn.Module, plan: Plan, workdir: Path, names: list[str], val_dir: Path,
             device: torch.device, config: InferConfig, links: CascadeLinks) -> dict[str, Any]:
    summary = full_validation(model, plan, WorkDir(workdir).preprocessed, names, val_dir, device, config, links)
    return {"val_dice_mean": summary["mean_dice"], "val_dice": summary["mean"]}


def evaluate_checkpoint(workdir: Path, out_dir: Path, val_names: list[str], device: torch.device,
                        amp_dtype: torch.dtype | None, which: bool | str = True,
                        probabilities: bool = False) -> dict[str, Any]:
    """`--test-only`: full validation of checkpoint `which` (True: checkpoint_best, else checkpoint_final) into
    its own folder; returns {"checkpoint", "epochs", "validation_dir", "val_dice_mean", "val_dice", "seconds"}."""
    start = time.perf_counter()
    files = FoldDir(out_dir)
    if isinstance(which, str):
        if which not in CHECKPOINT_CHOICES:
            raise ConfigError(f"test-only checkpoint '{which}' is unknown; use one of {', '.join(CHECKPOINT_CHOICES)}")
        candidates = [which]
    else:
        candidates = ["best", "final"]
    tag = next((name for name in candidates if files.checkpoint(name).is_file()), None)
    if tag is None:
        names = " nor ".join(files.checkpoint(name).name for name in candidates)
        raise CheckpointError(f"{out_dir}: {'neither ' if len(candidates) > 1 else ''}{names} exists; train first")
    path = files.checkpoint(tag)
    model, plan, state = network_from_checkpoint(path, device)  # the effective plan the weights were trained with
    val_dir = files.checkpoint_validation(tag)
    result: dict[str, Any] = {"checkpoint": str(path), "epochs": int(state["progress"]["epoch"]),
                              "validation_dir": str(val_dir)}
    if val_names:  # the stored first-stage predictions of a cascade are read, never written
        links = CascadeLinks(previous=stored_previous(workdir, plan))
        result.update(_metrics(model, plan, workdir, val_names, val_dir, device,
                               validation_config(plan, amp_dtype, probabilities), links))
        # which checkpoint these are: cross-validation may take the final checkpoint's probabilities from here
        # while that file is unchanged (voxseg.crossval.choice)
        write_json_atomic(files.validated_checkpoint(tag),
                          {**checkpoint_identity(path), "epoch": result["epochs"]})
    result["seconds"] = time.perf_counter() - start
    return result
