"""The cascade: 3d_cascade_fullres takes 3d_lowres's segmentation as extra input channels.

The full-resolution stage's network sees the image channels followed by one channel per foreground label
value of the low-resolution stage's segmentation (1 where the first stage predicted that label, else 0; for
region-based datasets the label values, not the regions, as nnU-Net does), on its own preprocessed grid.

Training uses predictions that did not see the case: the low-resolution stage's full validation of fold F
predicts fold F's validation cases, resamples its logits linearly from its grid to the cascade's preprocessed
grid, takes the labels there and stores them as

    FIRST_STAGE_WORKDIR/predicted_next_stage/NEXT_STAGE/CASE.npy     (D, H, W) uint8 label values

so once every fold of the first stage has been validated, every training case has one. Prediction runs the
first stage on the image and goes the same way from its logits to the cascade's grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from voxseg.atomicio import atomic_open
from voxseg.data.configs import next_stage, parent_workdir, stage_workdir
from voxseg.data.preprocess import new_shape_for_spacing
from voxseg.data.restore import DEFAULT_RESTORE_VALUES, StreamingRestore, default_restore_values
from voxseg.data.splits import load_splits
from voxseg.errors import ConfigError, DatasetError, InputError
from voxseg.infer.postprocess import logits_to_label_map
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

__all__ = ["NextStage", "NextStageLabels", "StoredPrevious", "first_stage_labels", "labels_for_next_stage",
           "next_stage_grid", "next_stage_restorer", "next_stage_target", "onehot_previous", "stored_previous",
           "with_first_stage"]


def onehot_previous(labels: torch.Tensor, plan: Plan, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(*S) label values of the first stage -> (L, *S), one channel per foreground label of `plan`."""
    values = plan.foreground_labels
    if not values:
        return torch.zeros((0, *labels.shape), dtype=dtype, device=labels.device)
    return torch.stack([labels == int(v) for v in values]).to(dtype)


class NextStageLabels:
    """Where restored slabs of a first stage's logits on the next stage's grid go (`consume(rows, restored)` of
    `voxseg.data.restore`): each (K, rows, H, W) slab becomes labels (`logits_to_label_map`, the same decision as on
    its activation) in `labels`, a (D, H, W) uint8 map on the host."""

    def __init__(self, plan: Plan, shape: Sequence[int]) -> None:
        self.plan = plan
        self.labels = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)

    def __call__(self, rows: slice, restored: torch.Tensor) -> None:
        self.labels[rows] = logits_to_label_map(restored, self.plan).cpu().numpy()


def next_stage_grid(plan: Plan, properties: dict, next_plan: Plan) -> dict[str, Any]:
    """Restore properties (`voxseg.data.restore`) from the first stage's preprocessed grid to the next stage's:
    the shape the next stage's preprocessing gives the same crop box, reached linearly, a separate coarse axis
    (between the two target spacings) with nearest values, as preprocessing resamples."""
    shape = new_shape_for_spacing(properties["shape_after_crop"], properties["original_spacing"],
                                  next_plan.target_spacing)
    return {"name": properties.get("name", ""), "shape_after_resample": list(properties["shape_after_resample"]),
            "shape_after_crop": [int(s) for s in shape], "target_spacing": list(plan.target_spacing),
            "original_spacing": list(next_plan.target_spacing)}


def next_stage_restorer(plan: Plan, properties: dict, next_plan: Plan, max_values: int,
                        device: torch.device | str) -> tuple[StreamingRestore, NextStageLabels]:
    """A restorer that takes a first stage's rows of a case as its sliding window finishes them (`feed`, then
    `finish`) and leaves their labels on the next stage's grid (`next_stage_grid`) in the returned sink, slab by
    slab of rows (at most `max_values` values at once, not K x the next grid)."""
    grid = next_stage_grid(plan, properties, next_plan)
    sink = NextStageLabels(plan, grid["shape_after_crop"])
    return StreamingRestore(grid, plan.num_outputs, sink, max_values, device), sink


def labels_for_next_stage(logits: torch.Tensor, plan: Plan, properties: dict, next_plan: Plan,
                          max_values: int = DEFAULT_RESTORE_VALUES) -> np.ndarray:
    """First-stage logits (K, d, h, w) on its preprocessed grid -> (D, H, W) uint8 labels on the next stage's
    preprocessed grid: all rows handed to a `next_stage_restorer` at once, each slab's labels decided on its
    logits."""
    restorer, sink = next_stage_restorer(plan, properties, next_plan, max_values, logits.device)
    restorer.feed(slice(0, int(logits.shape[1])), logits)
    restorer.finish()
    return sink.labels


def first_stage_labels(first: Any, image: np.ndarray, geometry: Any, plan: Plan, name: str = "") -> np.ndarray:
    """Prediction: run the first stage's Predictor `first` on the raw (C, D, H, W) image and return its labels on
    the cascade `plan`'s preprocessed grid, (D, H, W) uint8. The first stage's finished rows are restored to that
    grid as its sliding window hands them on (`StreamingRestore`), so neither its whole logits nor K x the
    cascade's grid is ever held."""
    first_pp, first_properties = first.preprocess(image, geometry, name)
    restorer, sink = next_stage_restorer(first.plan, first_properties, plan, first.restore_slab_values(),
                                         first.device)
    first.predict_logits(first_pp, name, consume=restorer.feed)
    restorer.finish()
    return sink.labels


def with_first_stage(image_pp: torch.Tensor, labels: np.ndarray, plan: Plan, name: str = "") -> torch.Tensor:
    """The cascade stage's network input: the (C, d, h, w) preprocessed image followed by the one-hot of the first
    stage's (d, h, w) labels, one channel per foreground label (`onehot_previous`), made in one (C + L, d, h, w)
    tensor (no stacked and concatenated copies)."""
    if list(labels.shape) != list(image_pp.shape[1:]):  # both stages crop the same box
        raise InputError(f"case '{name}': the first stage's segmentation has shape {list(labels.shape)} on the "
                         f"cascade's grid, expected {list(image_pp.shape[1:])}")
    values = plan.foreground_labels
    channels = int(image_pp.shape[0])
    out = torch.empty((channels + len(values), *image_pp.shape[1:]), dtype=image_pp.dtype, device=image_pp.device)
    out[:channels] = image_pp
    previous = torch.from_numpy(labels).to(image_pp.device)
    for index, value in enumerate(values):
        torch.eq(previous, int(value), out=out[channels + index])  # written as 0 / 1 in the input's dtype
    return out


class NextStage:
    """Where a first stage's full validation writes its predictions for the next stage, and that stage's plan."""

    def __init__(self, name: str, plan: Plan, directory: Path) -> None:
        self.name, self.plan, self.directory = name, plan, directory

    def restorer(self, plan: Plan, properties: dict, device: torch.device) -> tuple[StreamingRestore, NextStageLabels]:
        """`next_stage_restorer` to this stage's grid, for the first stage `plan`'s case (`save` its labels)."""
        return next_stage_restorer(plan, properties, self.plan, default_restore_values(device), device)

    def save(self, case: str, labels: np.ndarray) -> Path:
        """Write `case`'s (D, H, W) uint8 labels on this stage's grid, atomically."""
        path = self.directory / f"{case}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as handle:
            np.save(handle, labels)
        return path


def next_stage_target(workdir: str | Path, plan: Plan) -> NextStage | None:
    """The next stage of configuration `plan.configuration` in `workdir`'s dataset, or None (no cascade)."""
    name = next_stage(workdir, plan.configuration)
    if name is None:
        return None
    next_plan = Plan.load(WorkDir(stage_workdir(workdir, name)).plans)
    return NextStage(name, next_plan, WorkDir(workdir).next_stage_predictions(name))


class StoredPrevious:
    """A cascade stage's extra inputs for training and full validation: the first stage's stored
    cross-validation predictions (see the module docstring), one-hot."""

    def __init__(self, plan: Plan, directory: Path, first_stage_workdir: Path) -> None:
        self.plan, self.directory, self.first_stage_workdir = plan, directory, first_stage_workdir

    @property
    def num_channels(self) -> int:
        return len(self.plan.foreground_labels)

    def path(self, case: str) -> Path:
        return self.directory / f"{case}.npy"

    def check(self, names: Sequence[str]) -> None:
        """Refuse when a case has no stored prediction, naming the cases and the first stage's folds to run."""
        missing = sorted({n for n in names if not self.path(n).is_file()})
        if not missing:
            return
        folds = sorted({f for f, split in enumerate(load_splits(self.first_stage_workdir))
                        for n in missing if n in split["val"]})
        first = self.plan.previous_stage
        root = parent_workdir(self.first_stage_workdir) or self.first_stage_workdir
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        fold_text = f"fold(s) {', '.join(map(str, folds))}" if folds else "the folds that validate them"
        raise DatasetError(
            f"configuration '{self.plan.configuration}' trains on the cross-validation predictions of "
            f"'{first}', and {self.directory} has none for case(s) {shown} (validation cases of '{first}' "
            f"{fold_text}). Train those folds of the first stage with full validation on ('voxseg train "
            f"{root} --configuration {first} --fold F' for each), or run their full validation again with "
            f"--test-only")

    def onehot(self, case: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> np.ndarray:
        """(L, *shape) one-hot of the stored prediction of `case` (numpy, `dtype`)."""
        self.check([case])
        labels = np.load(self.path(case), allow_pickle=False)
        if tuple(labels.shape) != tuple(shape):
            raise DatasetError(f"{self.path(case)}: shape {tuple(labels.shape)} differs from the preprocessed "
                               f"case's {tuple(shape)}; preprocess '{self.plan.configuration}' again and re-run "
                               f"the full validation of '{self.plan.previous_stage}' (--test-only)")
        return onehot_previous(torch.from_numpy(labels.astype(np.int64)), self.plan, dtype).numpy()


def stored_previous(workdir: str | Path, plan: Plan) -> StoredPrevious | None:
    """The stored first-stage predictions a cascade stage `plan` in `workdir` trains on, or None (no cascade)."""
    if plan.previous_stage is None:
        return None
    if plan.network.ndim != 3:
        raise ConfigError(f"configuration '{plan.configuration}': a cascade stage must be a 3D configuration")
    first = stage_workdir(workdir, plan.previous_stage)
    return StoredPrevious(plan, WorkDir(first).next_stage_predictions(plan.configuration), first)
