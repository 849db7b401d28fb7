"""Full validation: sliding-window prediction of a fold's preprocessed validation cases, written in the raw
geometry for cross-validation, with the Dice of each case on the preprocessed grid.

Training calls it at the end of a run and for `--test-only`; it is inference, so it lives here and training
imports it (never the other way round).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from voxseg.data.io import Geometry, write_image
from voxseg.data.restore import StreamingRestore, default_restore_values
from voxseg.data.store import case_paths, load_case
from voxseg.distributed import all_gather_objects, current_world, shard_balanced
from voxseg.evaluate.overlap import class_masks, dice_from_counts, nanmean, overlap_counts
from voxseg.infer.budget import forward_limit
from voxseg.infer.cascade import NextStage, StoredPrevious
from voxseg.infer.casefiles import ProbabilityFile  # the predictor's writer
from voxseg.infer.config import InferConfig
from voxseg.infer.postprocess import OriginalGrid, probability_names
from voxseg.infer.sliding_window import sliding_window_inference
from voxseg.jsonio import write_json_atomic
from voxseg.plans import Plan


@dataclass(frozen=True)
class CascadeLinks:
    """The stored predictions that link a cascade's stages around one configuration's full validation."""

    previous: StoredPrevious | None = None
    """A cascade stage's input: the first stage's stored predictions, appended one-hot as channels."""
    next_stage: NextStage | None = None
    """A first stage's output: where each case's labels go on the next stage's grid (only when writing)."""


@torch.no_grad()
def full_validation(model: nn.Module, plan: Plan, preprocessed_dir: str | Path, names: Sequence[str],
                    out_dir: str | Path | None, device: torch.device | str, config: InferConfig,
                    cascade: CascadeLinks | None = None) -> dict[str, Any]:
    """Sliding-window prediction of each preprocessed validation case and its Dice on the preprocessed grid.

    The tiles are the plan's patch; step, tile batch, mirroring and precision are `config`'s (training
    validates with `voxseg.train.evaluation.validation_config`). Each prediction is mapped back to its raw
    image's grid (undo resampling and cropping) and written as `out_dir/CASE{plan.file_ending}` with the raw
    geometry, so `voxseg evaluate --crossval` can score the folds against labelsTr; the Dice table goes to
    `out_dir/summary.json` (nothing is written when `out_dir` is None). With `config.save_probabilities` each
    case's probabilities on that grid go next to it as `out_dir/CASE.npz` (the writer of `voxseg predict
    --save-probabilities`), for ensembles of configurations (`voxseg.crossval`); without it a CASE.npz left by
    an earlier validation is removed, so probabilities never disagree with the label map beside them.

    Cascades (see `voxseg.infer.cascade`): a cascade stage's cases get the one-hot of the first stage's stored
    predictions (`cascade.previous`) as extra channels, as in training; a first stage writes each case's labels
    on the next stage's grid (`cascade.next_stage`, when writing), which that stage trains on.

    In a distributed run (an initialised process group) the cases are sharded over the ranks, balanced by the
    size of their preprocessed images; each rank writes its own cases' predictions, the per-case Dice values
    are all-gathered, and every rank returns the same result (rank 0 writes summary.json).

    Returns:
        {"per_case": {case: {class: dice}}, "mean": {class: mean Dice over cases}, "mean_dice": float}
        where a class absent from a case's reference and prediction does not count towards its mean.
    """
    device = torch.device(device)
    cascade = cascade or CascadeLinks()
    rank, size = current_world()
    sizes = [case_paths(preprocessed_dir, name)["image"].stat().st_size if size > 1 else 0 for name in names]
    local_names = shard_balanced(list(names), sizes, rank, size)
    tiling = config.tiling(plan, device)
    was_training = model.training
    model.eval()
    per_case: dict[str, dict[str, float]] = {}
    try:
        for name in local_names:
            x, seg, properties = _network_input(preprocessed_dir, name, cascade, device)  # (1, C [+ L], d, h, w)
            limit = forward_limit(plan, device, x.shape[2:], tiling.amp_dtype)
            rows = CaseRows(plan, seg, properties, Path(out_dir) if out_dir is not None else None,
                            config.save_probabilities, device)
            try:
                _validate_case(model, x, plan, replace(tiling, max_forward_batch=limit), name, rows, cascade,
                               properties)
            except BaseException:
                rows.discard()
                raise
            if seg is not None:
                per_case[name] = dict(zip(plan.class_names, dice_from_counts(rows.counts)))
            if out_dir is not None:
                rows.write(name)
    finally:
        model.train(was_training)
    gathered = {case: dice for shard in all_gather_objects(per_case) for case, dice in shard.items()}
    per_case = {name: gathered[name] for name in names if name in gathered}  # in the given order
    mean = {c: nanmean([d[c] for d in per_case.values()]) for c in plan.class_names}
    result = {"per_case": per_case, "mean": mean, "mean_dice": nanmean(list(mean.values()))}
    if out_dir is not None and rank == 0:
        write_json_atomic(Path(out_dir) / "summary.json", _json_safe(result))
    return result


def _network_input(preprocessed_dir: str | Path, name: str, cascade: CascadeLinks,
                   device: torch.device) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """A preprocessed case as the network's (1, C [+ L], d, h, w) input on `device` (a cascade stage's first-stage
    one-hot appended), its stored labels (or None) and its properties."""
    image, seg, properties = load_case(preprocessed_dir, name, mmap=True)
    x = np.array(image, dtype=np.float32)
    if cascade.previous is not None:
        x = np.concatenate([x, cascade.previous.onehot(name, x.shape[1:])])
    return torch.from_numpy(x)[None].to(device), seg, properties


def _validate_case(model: nn.Module, x: torch.Tensor, plan: Plan, tiling: Any, name: str, rows: "CaseRows",
                   cascade: CascadeLinks, properties: dict[str, Any]) -> None:
    """One case's sliding window, its rows handed to `rows` as they are finished (K x the case is never held
    whole); a first stage's rows also go to its next stage's grid, whose labels are stored for that stage."""
    if rows.out_dir is None or cascade.next_stage is None:
        sliding_window_inference(model, x, plan.patch_size, plan.num_outputs, tiling, plan.slice_axis, name, rows)
        return
    restorer, next_labels = cascade.next_stage.restorer(plan, properties, x.device)

    def both(finished: slice, values: torch.Tensor) -> None:
        rows(finished, values)
        restorer.feed(finished, values)
    sliding_window_inference(model, x, plan.patch_size, plan.num_outputs, tiling, plan.slice_axis, name, both)
    restorer.finish()
    cascade.next_stage.save(name, next_labels.labels)


class CaseRows:
    """Where a validation case's finished rows of logits go (`sliding_window_inference`'s `consume`): Dice counts
    against its stored labels on the preprocessed grid, summed row by row, and, when writing, the restoration to
    the raw grid (`StreamingRestore` into an `OriginalGrid`; probabilities to disk slab by slab)."""

    def __init__(self, plan: Plan, seg: Any, properties: dict[str, Any], out_dir: Path | None,
                 with_probabilities: bool, device: torch.device) -> None:
        self.plan, self.properties, self.out_dir = plan, properties, out_dir
        self.ref = None if seg is None else torch.from_numpy(np.array(seg)).to(device)[None]  # (1, 1, d, h, w)
        self.counts: torch.Tensor | None = None
        self.grid = self.restorer = self.sink = None
        if out_dir is not None:
            name = properties.get("name") or ""
            if with_probabilities:
                self.sink = ProbabilityFile(out_dir / f"{name}.npz", plan.num_outputs,
                                            tuple(properties["original_shape"]), probability_names(plan),
                                            background_channel=not plan.is_region_based)
            self.grid = OriginalGrid(plan, properties, probability_sink=self.sink)
            self.restorer = StreamingRestore(properties, plan.num_outputs, self.grid,
                                             default_restore_values(device), device)

    def __call__(self, rows: slice, values: torch.Tensor) -> None:
        if self.ref is not None:
            ref = self.ref[:, :, rows].to(values.device)
            part = overlap_counts(*class_masks(values[None], ref, self.plan))
            self.counts = part if self.counts is None else self.counts + part
        if self.restorer is not None:
            self.restorer.feed(rows, values)

    def discard(self) -> None:
        """After a failure: nothing half-written is left (the probabilities' raw file)."""
        if self.sink is not None:
            self.sink.discard()

    def write(self, name: str) -> None:
        """The case's label map on the raw grid (and its CASE.npz, or no stale one)."""
        assert self.out_dir is not None and self.restorer is not None and self.grid is not None
        self.restorer.finish()
        if self.sink is not None:
            self.sink.commit()
        else:
            (self.out_dir / f"{name}.npz").unlink(missing_ok=True)
        write_image(self.out_dir / f"{name}{self.plan.file_ending}", self.grid.labels,
                    Geometry.from_list(self.properties["affine"]))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
