"""A trained model's folder: its folds and their networks, and sharing it as a zip archive.

Model folder (a work directory, or one installed from an archive):
```
MODEL/plans.json  dataset.json  [postprocessing.json]
MODEL/training/fold_F/checkpoint_{final,best}.pt  [config.json]  [model.onnx]
```
`export_archive` zips the weights of the chosen folds (model weights, plan and config only: optimiser state
is dropped) with plans.json, dataset.json and postprocessing.json. `install_archive` checks every member before
writing anything: it refuses absolute paths, "..", links and unexpected file types, anything that would land
outside the target folder, and checkpoints that cannot be read with `weights_only=True`; the manifest carries
every member's SHA-256, which install verifies (see voxseg/infer/install.py for its limits and the swap).
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from voxseg.atomicio import atomic_path
from voxseg.checkpoint import CHECKPOINT_CHOICES, load_checkpoint, network_from_checkpoint
from voxseg.data.splits import trained_folds
from voxseg.devices import resolve_device  # noqa: F401 - re-exported for the predictor
from voxseg.digest import sha256_bytes
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.install import ARCHIVE_FORMAT, MANIFEST, install_archive  # noqa: F401 - install re-exported
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

# checkpoint entries kept in an archive; optimiser, scheduler, scaler and RNG states are for resuming only
_KEPT_KEYS = ("format", "model", "plan", "config", "progress")
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
        has_fold_all = WorkDir(workdir).fold("all").checkpoint(checkpoint).is_file()
        if folds == "all" and has_fold_all:
            return ["all"]
        trained = trained_folds(workdir, checkpoint)
        if trained:
            return list(trained)
        if has_fold_all:
            return ["all"]
        raise CheckpointError(
            f"{WorkDir(workdir).training}: no trained fold has checkpoint_{checkpoint}.pt; train one first "
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
    return out


def checkpoint_path(workdir: str | Path, fold: int | str, checkpoint: str = "final") -> Path:
    """Path of a fold's checkpoint; CheckpointError naming it (and suggesting `voxseg train`) when missing."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint '{checkpoint}' is unknown; use one of {', '.join(CHECKPOINT_CHOICES)}")
    fold_files = WorkDir(workdir).fold(fold)
    path = fold_files.checkpoint(checkpoint)
    if not path.is_file():
        others = [p.name for p in fold_files.checkpoints()]
        hint = f" (found {', '.join(others)}: choose it with the checkpoint option)" if others else ""
        raise CheckpointError(f"{path} not found{hint}; train this fold first: 'voxseg train {workdir} --fold {fold}'")
    return path


def load_fold_network(workdir: str | Path, fold: int | str, checkpoint: str = "final",
                      device: str | torch.device = "cpu") -> tuple[nn.Module, Plan]:
    """The network of one trained fold in eval mode (loaded with weights_only) and the plan it was trained with.

    The plan stored in the checkpoint wins over plans.json (it is what the weights were trained with);
    plans.json is the fallback for checkpoints without one.
    """
    path = checkpoint_path(workdir, fold, checkpoint)
    network, plan, _ = network_from_checkpoint(path, device, fallback_plan=WorkDir(workdir).plans)
    return network, plan


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
def _slim_checkpoint(path: Path) -> bytes:
    state = load_checkpoint(path, map_location="cpu")
    buffer = io.BytesIO()
    torch.save({k: state[k] for k in _KEPT_KEYS if k in state}, buffer)
    return buffer.getvalue()


def export_archive(workdir: str | Path, out_zip: str | Path, folds: int | str | Sequence[int | str] | None = (0,),
                   checkpoint: str = "final") -> Path:
    """Zip a trained model for sharing: weights of `folds`, plans.json, dataset.json, configs, postprocessing.

    The archive keeps the model-folder layout, so the folder `install_archive` writes works with
    `Predictor.from_workdir` and `voxseg predict -m`.
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
    for fold in fold_list:
        fold_files = workdir.fold(fold)
        weights = _slim_checkpoint(checkpoint_path(workdir.path, fold, checkpoint))
        members[workdir.member(fold_files.checkpoint(checkpoint))] = weights
        for path in (fold_files.config, fold_files.plans, fold_files.onnx):
            if path.is_file():
                members[workdir.member(path)] = path
    members = {name: content if isinstance(content, bytes) else content.read_bytes()
               for name, content in members.items()}
    files = {name: {"sha256": sha256_bytes(content), "size": len(content)} for name, content in members.items()}
    manifest = {"format": ARCHIVE_FORMAT, "version": 2, "folds": fold_list, "checkpoint": checkpoint, "files": files}
    members[MANIFEST] = json.dumps(manifest, indent=2).encode()
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out_zip
