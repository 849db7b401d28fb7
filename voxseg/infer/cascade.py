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
from voxseg.data.resample import resample, separate_axis
from voxseg.data.splits import load_splits
from voxseg.errors import ConfigError, DatasetError, InputError
from voxseg.infer.postprocess import activate, probabilities_to_labels
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

__all__ = ["NextStage", "StoredPrevious", "first_stage_channels", "labels_for_next_stage",
           "next_stage_target", "onehot_previous", "stored_previous"]


def onehot_previous(labels: torch.Tensor, plan: Plan, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(*S) label values of the first stage -> (L, *S), one channel per foreground label of `plan`."""
    values = plan.foreground_labels
    if not values:
        return torch.zeros((0, *labels.shape), dtype=dtype, device=labels.device)
    return torch.stack([labels == int(v) for v in values]).to(dtype)


def labels_for_next_stage(logits: torch.Tensor, plan: Plan, properties: dict, next_plan: Plan) -> torch.Tensor:
    """First-stage logits (K, d, h, w) on its preprocessed grid -> (D, H, W) uint8 labels on the next stage's
    preprocessed grid: the shape the next stage's preprocessing gives the same crop box, resampled linearly
    (the coarse axis separately, as preprocessing does), activated, then labels."""
    shape = new_shape_for_spacing(properties["shape_after_crop"], properties["original_spacing"],
                                  next_plan.target_spacing)
    axis = separate_axis(plan.target_spacing, next_plan.target_spacing)
    resampled = resample(logits.float(), shape, is_label=False, anisotropy_axis=axis, order=1)
    return probabilities_to_labels(activate(resampled, plan), plan)


def first_stage_channels(first: Any, image: np.ndarray, geometry: Any, plan: Plan, properties: dict,
                         name: str = "") -> torch.Tensor:
    """Prediction: run the first stage's Predictor `first` on the raw (C, D, H, W) image and return its
    segmentation on the cascade `plan`'s preprocessed grid (the grid of `properties`), one-hot: (L, d, h, w)
    float32 on the first stage's compute device."""
    first_pp, first_properties = first.preprocess(image, geometry, name)
    labels = labels_for_next_stage(first.predict_logits(first_pp, name), first.plan, first_properties, plan)
    if list(labels.shape) != list(properties["shape_after_resample"]):  # both stages crop the same box
        raise InputError(f"case '{name}': the first stage's segmentation has shape {list(labels.shape)} on the "
                         f"cascade's grid, expected {properties['shape_after_resample']}")
    return onehot_previous(labels, plan)


class NextStage:
    """Where a first stage's full validation writes its predictions for the next stage, and that stage's plan."""

    def __init__(self, name: str, plan: Plan, directory: Path) -> None:
        self.name, self.plan, self.directory = name, plan, directory

    def write(self, case: str, logits: torch.Tensor, plan: Plan, properties: dict) -> Path:
        labels = labels_for_next_stage(logits, plan, properties, self.plan).cpu().numpy().astype(np.uint8)
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
