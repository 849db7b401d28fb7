"""A trained model's folder: its folds and their networks, and sharing it as a zip archive.

Model folder (a work directory, or one installed from an archive):
```
MODEL/plans.json  dataset.json  [postprocessing.json]  [voxseg_archive.json (installed)]
MODEL/training/fold_F/model_{final,best}.safetensors  [checkpoint_{final,best,latest}.pt]  [config.json]
                      [plans.json]  [model.onnx]
```
A fold's network is loaded from model_TAG.safetensors (`voxseg.weights`: no pickle); a work directory trained
before those files existed has only checkpoint_TAG.pt, which is read with `weights_only=True` on a safe torch.
`export_archive` zips the safetensors weights of the chosen folds (converted from the checkpoint where a fold has
none; optimiser state never leaves the machine) with plans.json, dataset.json and postprocessing.json, and a
manifest with every member's SHA-256. `install_archive` checks every member before writing anything (see
voxseg/infer/install.py for its limits, the checks and the swap).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from voxseg import __version__
from voxseg.atomicio import atomic_path, staging_folder, sweep_stale_staging, sweep_stale_temporaries
from voxseg.checkpoint import CHECKPOINT_CHOICES, checkpoint_to_weights, network_from_checkpoint
from voxseg.data.splits import load_splits, trained_folds
from voxseg.devices import resolve_device  # noqa: F401 - re-exported for the predictor
from voxseg.digest import sha256_bytes
from voxseg.errors import CheckpointError, ConfigError, VoxsegError
from voxseg.infer.install import ARCHIVE_FORMAT, ARCHIVE_VERSION, MANIFEST, install_archive  # noqa: F401
from voxseg.plans import Plan
from voxseg.weights import load_weights_network, now_utc, read_weights_header, stale_reason
from voxseg.workdir import WorkDir

# plan fields that must agree between the folds of an ensemble
_ENSEMBLE_FIELDS = ("channel_names", "labels", "regions_class_order", "target_spacing", "normalization",
                    "anisotropy_axis", "patch_size")


# ----- folds and networks -------------------------------------------------------------------------------------
def resolve_folds(workdir: str | Path, folds: int | str | Sequence[int | str] | None,
                  checkpoint: str = "final") -> list[int | str]:
    """Fold names for the `folds` option.

    An int or list picks those folds; "all" picks fold_all (the model trained on every case, nnU-Net's
    `-f all`) or, when no fold_all was trained, every trained numbered fold; None (the default of `voxseg
    predict`) every trained numbered fold, or fold_all when it is the only trained model.
    """
    workdir = Path(workdir)
    if folds is None or folds == "all":
        has_fold_all = WorkDir(workdir).fold("all").has_model(checkpoint)
        if folds == "all" and has_fold_all:
            return ["all"]
        trained = trained_folds(workdir, checkpoint)
        if trained:
            return list(trained)
        if has_fold_all:
            return ["all"]
        raise CheckpointError(
            f"{WorkDir(workdir).training}: no trained fold has {WorkDir(workdir).fold(0).checkpoint(checkpoint).name} "
            f"or {WorkDir(workdir).fold(0).weights(checkpoint).name}; train one first "
            f"('voxseg train {workdir} --fold 0', or '--fold all')"
        )
    if isinstance(folds, (int, str)):
        folds = [folds]
    out: list[int | str] = []
    for fold in folds:
        if str(fold) != "all" and not str(fold).isdigit():
            raise ConfigError(f"fold '{fold}' is not a fold number or 'all' (--folds 0, 0,1,2 or all)")
        out.append("all" if str(fold) == "all" else int(fold))
    if not out:
        raise ConfigError("folds is empty; give at least one fold")
    twice = sorted({str(fold) for fold in out if out.count(fold) > 1})
    if twice:
        raise ConfigError(f"folds lists fold {', '.join(twice)} more than once; give each fold once (an ensemble "
                          "of a fold with itself is that fold)")
    return out


def checkpoint_path(workdir: str | Path, fold: int | str, checkpoint: str = "final") -> Path:
    """The file a fold's network is loaded from: model_{checkpoint}.safetensors, else checkpoint_{checkpoint}.pt.

    Raises:
        CheckpointError: neither exists (naming them, and suggesting `voxseg train`), or the weights file no
            longer belongs to the checkpoint beside it (a run rewrote the checkpoint without it).
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint '{checkpoint}' is unknown; use one of {', '.join(CHECKPOINT_CHOICES)}")
    fold_files = WorkDir(workdir).fold(fold)
    weights, path = fold_files.weights(checkpoint), fold_files.checkpoint(checkpoint)
    if weights.is_file():
        reason = stale_reason(read_weights_header(weights), path)
        if reason:
            raise CheckpointError(f"{weights} no longer holds the weights of {path}: {reason}. Write them again "
                                  f"from the checkpoint with 'voxseg verify {workdir} --write-weights'")
        return weights
    if not path.is_file():
        others = [p.name for p in fold_files.checkpoints() + fold_files.weight_files()]
        if others:
            raise CheckpointError(f"{path} not found (found {', '.join(others)}: choose it with the checkpoint option)")
        raise CheckpointError(f"{path} not found; {_untrained_fold_hint(workdir, fold, checkpoint)}")
    return path


def _untrained_fold_hint(workdir: str | Path, fold: int | str, checkpoint: str) -> str:
    """What to do about a fold without weights: train it when the splits have it, else choose a trained one."""
    trained = ", ".join(map(str, trained_folds(workdir, checkpoint))) or "none"
    splits = WorkDir(workdir).splits
    count = None
    if splits.is_file():
        with contextlib.suppress(VoxsegError):
            count = len(load_splits(workdir))
    if str(fold).isdigit() and count is not None and int(fold) >= count:
        return (f"the model has {count} folds (0..{count - 1}, {splits.name}), so there is no fold {fold}; trained "
                f"folds: {trained} (choose with --folds)")
    if count is None and str(fold) != "all":
        return f"this model's trained folds are: {trained} (choose with --folds)"
    return f"train this fold first: 'voxseg train {workdir} --fold {fold}' (trained folds: {trained})"


@dataclass
class FoldModel:
    """A fold's network in eval mode, the plan it was trained with, its epoch and the file it came from."""

    network: nn.Module
    plan: Plan
    epoch: int
    path: Path


def load_fold_model(workdir: str | Path, fold: int | str, checkpoint: str = "final",
                    device: str | torch.device = "cpu") -> FoldModel:
    """The network of one trained fold (`checkpoint_path`: safetensors weights, else the checkpoint read with
    weights_only) and the plan it was trained with: the one stored with the weights wins over plans.json (the
    fallback for checkpoints without one)."""
    path = checkpoint_path(workdir, fold, checkpoint)
    if path.suffix == WorkDir(workdir).fold(fold).weights(checkpoint).suffix:
        network, weights, plan = load_weights_network(path, device, fallback_plan=WorkDir(workdir).plans)
        return FoldModel(network, plan, weights.epoch, path)
    network, plan, state = network_from_checkpoint(path, device, fallback_plan=WorkDir(workdir).plans)
    progress = state.get("progress") if isinstance(state.get("progress"), dict) else {}
    return FoldModel(network, plan, int(progress.get("epoch") or 0), path)


def load_fold_network(workdir: str | Path, fold: int | str, checkpoint: str = "final",
                      device: str | torch.device = "cpu") -> tuple[nn.Module, Plan]:
    """The network of one trained fold in eval mode and the plan it was trained with (`load_fold_model`)."""
    model = load_fold_model(workdir, fold, checkpoint, device)
    return model.network, model.plan


def check_same_plan(plans: Sequence[Plan], folds: Sequence[int | str]) -> None:
    """Folds can be ensembled only when they share labels, channels, preprocessing and patch size."""
    first = plans[0].to_dict()
    for plan, fold in zip(plans[1:], folds[1:]):
        other = plan.to_dict()
        differ = [k for k in _ENSEMBLE_FIELDS if other.get(k) != first.get(k)]
        if differ:
            raise CheckpointError(
                f"fold {fold} was trained with a different plan than fold {folds[0]} ({', '.join(differ)} "
                "differ); only folds of the same plan can be ensembled"
            )


# ----- archives -----------------------------------------------------------------------------------------------
def _fold_weights(workdir: WorkDir, fold: int | str, checkpoint: str, scratch: Path) -> bytes:
    """The fold's safetensors weights as bytes: its model_TAG.safetensors, or converted from checkpoint_TAG.pt
    (a work directory trained before weights files existed)."""
    path = checkpoint_path(workdir.path, fold, checkpoint)
    if path.suffix != workdir.fold(fold).weights(checkpoint).suffix:
        path = checkpoint_to_weights(path, scratch / f"{fold}{workdir.fold(fold).weights(checkpoint).suffix}",
                                     "converted", fold, checkpoint, workdir.path, fallback_plan=workdir.plans,
                                     record_checkpoint=False)
    return path.read_bytes()


def export_archive(workdir: str | Path, out_zip: str | Path, folds: int | str | Sequence[int | str] | None = (0,),
                   checkpoint: str = "final") -> Path:
    """Zip a trained model for sharing: safetensors weights of `folds`, plans.json, dataset.json, configs,
    postprocessing, ONNX files, and a manifest with every member's SHA-256.

    The archive keeps the model-folder layout, so the folder `install_archive` writes works with
    `Predictor.from_workdir` and `voxseg predict -m`. No pickle is in it: optimiser states and RNGs stay home.
    """
    workdir, out_zip = WorkDir(workdir), Path(out_zip)
    if not workdir.plans.is_file():
        raise CheckpointError(f"{workdir.plans} not found: is {workdir.path} a voxseg work directory?")
    Plan.load(workdir.plans).check_runnable("exporting an archive")  # it would lack the first stage
    fold_list = resolve_folds(workdir.path, folds, checkpoint)
    # members are named by their place in the work directory, so that installing the archive rebuilds it
    members: dict[str, bytes | Path] = {workdir.member(workdir.plans): workdir.plans}
    for path in (workdir.dataset_json, workdir.postprocessing):
        if path.is_file():
            members[workdir.member(path)] = path
    sweep_stale_temporaries(out_zip.parent)  # an export that was killed left its temporary archive
    sweep_stale_staging(out_zip)
    scratch = staging_folder(out_zip, "export")  # weights converted from checkpoints of older work directories
    try:
        for fold in fold_list:
            fold_files = workdir.fold(fold)
            members[workdir.member(fold_files.weights(checkpoint))] = _fold_weights(workdir, fold, checkpoint,
                                                                                   Path(scratch))
            for path in (fold_files.config, fold_files.plans, fold_files.onnx):
                if path.is_file():
                    members[workdir.member(path)] = path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    members = {name: content if isinstance(content, bytes) else content.read_bytes()
               for name, content in members.items()}
    files = {name: {"sha256": sha256_bytes(content), "size": len(content)} for name, content in members.items()}
    manifest = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "folds": fold_list, "checkpoint": checkpoint,
                "files": files, "exported": {"date": now_utc(), "voxseg_version": __version__}}
    members[MANIFEST] = json.dumps(manifest, indent=2).encode()
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out_zip
