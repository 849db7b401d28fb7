"""Import an nnU-Net v2 model folder as a voxseg work directory (`voxseg import nnunet MODEL WORKDIR`).

```
MODEL = <Trainer>__<Plans>__<configuration>/          WORKDIR/
  plans.json  dataset.json                      ->      plans.json (voxseg's plan)  dataset.json
  [splits_final.json]                           ->      [splits.json]
  fold_F/checkpoint_{final,best}.pth            ->      training/fold_F/checkpoint_{final,best}.pt  plans.json
                                                                                   model_{final,best}.safetensors
                                                                                   config.json
  [fold_F/validation/CASE.nii.gz ...]           ->      [training/fold_F/validation/CASE.nii.gz ...]
  [postprocessing.pkl]                                  (never read)
  [voxseg_postprocessing.json]                  ->      [postprocessing.json] (from `voxseg export --format nnunet`)
                                                        nnunet_source.json (where it came from, SHA-256s)
```
The work directory then serves every command a trained one serves (predict, export, install, benchmark,
estimate, evaluate --crossval), with the same predictions as the model folder: the weights are renamed into
voxseg's UNet (`voxseg.infer.nnunet_weights`), the network options nnU-Net's architecture needs are in the plan,
and so are the mirror axes the model allows.

Everything is read and checked before anything is written: the folder, every chosen fold's checkpoint (loaded
with `weights_only=True`; unsupported networks are refused as `voxseg predict` refuses them), the splits, the
validation predictions. The work directory is built in a staging folder next to WORKDIR and renamed into place,
so WORKDIR holds the whole import or what it held before.

nnU-Net's postprocessing.pkl is a pickle (reading it could run code) and is never opened: voxseg decides its own
postprocessing from the folds' validation predictions (`voxseg evaluate --crossval WORKDIR`, which needs the
raw dataset's labelsTr: give `dataset`). A model folder that voxseg exported carries voxseg's decision as
voxseg_postprocessing.json; it is checked (plain JSON, label values of the model only) and restored as
WORKDIR/postprocessing.json, so the imported work directory predicts what the exported one did.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from voxseg import __version__
from voxseg.atomicio import staging_folder, sweep_stale_staging
from voxseg.checkpoint import CHECKPOINT_FORMAT, checkpoint_record, save_checkpoint
from voxseg.config import TrainConfig
from voxseg.data.dataset import load_dataset
from voxseg.data.splits import NNUNET_SPLITS_FILE, read_nnunet_splits, save_splits
from voxseg.digest import sha256_file
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.install import swap_in_folder
from voxseg.infer.nnunet import nnunet_fold_state, plan_from_nnunet
from voxseg.infer.nnunet_folder import (
    CHECKPOINT_FILES,
    NNUNET_DATASET,
    NNUNET_FINGERPRINT,
    NNUNET_FOLD_PREFIX,
    NNUNET_PLANS,
    NNUNET_VALIDATION,
    configuration_name,
    is_nnunet_model_folder,
    load_nnunet_checkpoint,
    nnunet_fold_dir,
    nnunet_folds,
)
from voxseg.infer.nnunet_weights import map_nnunet_weights
from voxseg.infer.postprocess import EXPORTED_POSTPROCESSING_FILE, model_postprocessing
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.models import build_network
from voxseg.plans import Plan
from voxseg.weights import provenance, write_weights
from voxseg.workdir import WorkDir

POSTPROCESSING_PICKLES = ("postprocessing.pkl", "crossval_results_folds_*/postprocessing.pkl")


@dataclass
class ImportedFold:
    """One fold read from the model folder, ready to be written."""

    name: str  # "0".."4" or "all"
    source: Path  # fold_F/checkpoint_*.pth
    sha256: str
    plan: Plan
    state: dict[str, Any]  # the voxseg checkpoint
    validation: list[Path] = field(default_factory=list)  # fold_F/validation/CASE{file_ending}


@dataclass
class ImportResult:
    """What `import_nnunet` wrote.

    Attributes:
        workdir: the work directory.
        folds: the imported folds ("0", "1", ..., or "all").
        checkpoint: "final" or "best" (written as training/fold_F/checkpoint_{checkpoint}.pt).
        validation_folds: folds whose validation predictions were imported (for `voxseg evaluate --crossval`).
        ignored_pickles: nnU-Net postprocessing pickles found in the model folder and not read.
        has_splits: splits_final.json was imported as splits.json.
        raw_dataset: the raw dataset given (its labelsTr scores the cross-validation), or "".
        postprocessing: the decision restored from voxseg_postprocessing.json (a folder voxseg exported), or None.
    """

    workdir: Path
    folds: list[str]
    checkpoint: str
    validation_folds: list[str]
    ignored_pickles: list[Path]
    has_splits: bool
    raw_dataset: str
    postprocessing: dict[str, Any] | None = None


def _read_model_json(path: Path) -> dict[str, Any]:
    data = read_json(path, CheckpointError, missing="an nnU-Net v2 model folder has plans.json and dataset.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def check_model_folder(model: Path) -> tuple[str, str, str]:
    """(trainer, plans name, configuration) of an nnU-Net v2 model folder; CheckpointError saying what is missing."""
    if not model.is_dir():
        raise CheckpointError(f"nnU-Net model folder {model} not found")
    if not is_nnunet_model_folder(model):
        lacks = [name for name in (NNUNET_PLANS, NNUNET_DATASET) if not (model / name).is_file()]
        if not any(p.is_dir() for p in model.glob(f"{NNUNET_FOLD_PREFIX}*")):
            lacks.append("fold_X/ folders")
        what = f"it lacks {', '.join(lacks)}" if lacks else "its plans.json has no \"configurations\""
        raise CheckpointError(f"{model} is not an nnU-Net v2 model folder ({what}); give the "
                              "<Trainer>__<Plans>__<configuration> folder of nnUNet_results/DatasetXXX_Name")
    configuration = configuration_name(model)
    trainer, plans_name, _ = model.resolve().name.split("__")
    return trainer, plans_name, configuration


def _read_fold(model: Path, path: Path, plans: dict[str, Any], dataset: dict[str, Any], configuration: str,
               raw_dataset: str) -> ImportedFold:
    plan, _ = plan_from_nnunet(plans, dataset, configuration, str(model))
    plan.raw_dataset = raw_dataset  # the raw data (labelsTr for cross-validation), not the model folder
    state = load_nnunet_checkpoint(path)
    # in the case's axes, whatever nnU-Net's transposition
    weights, axes = nnunet_fold_state(state, plans, configuration)
    plan.inference_mirror_axes = axes if axes is not None else []  # None: nnU-Net does not mirror
    network = build_network(plan, deep_supervision=False)  # the plan alone builds it: no options outside it
    network.load_state_dict(map_nnunet_weights(weights, network, str(path)))
    epoch = int(state.get("current_epoch") or 0)
    config = TrainConfig()
    config.loop.epochs = epoch or config.loop.epochs  # the epochs nnU-Net trained it for
    best = state.get("_best_ema")
    progress = {"epoch": epoch, "ema": None, "best_metric": float(best) if best is not None else None,
                "best_epoch": None}
    model_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    checkpoint = {"format": CHECKPOINT_FORMAT, "model": model_state,
                  "plan": plan.to_dict(), "config": config.to_dict(), "progress": progress}
    return ImportedFold(path.parent.name[len(NNUNET_FOLD_PREFIX):], path, sha256_file(path), plan, checkpoint)


def _validation_files(model: Path, fold: ImportedFold, ending: str, splits: list[dict[str, list[str]]] | None
                      ) -> list[Path]:
    """fold_F/validation/CASE{ending}, checked against the fold's validation cases of splits_final.json."""
    folder = nnunet_fold_dir(model, fold.name) / NNUNET_VALIDATION
    files = sorted(p for p in folder.glob(f"*{ending}") if p.is_file() and p.name[0] != ".") if folder.is_dir() else []
    if splits is not None and fold.name.isdigit() and files:
        index = int(fold.name)
        if index >= len(splits):
            raise CheckpointError(f"{model / NNUNET_SPLITS_FILE} has {len(splits)} fold(s) but the model has "
                                  f"fold_{fold.name}; the split file does not belong to this model")
        outside = sorted(p.name[: -len(ending)] for p in files if p.name[: -len(ending)] not in splits[index]["val"])
        if outside:
            raise CheckpointError(f"{folder} holds predictions of case(s) {', '.join(outside[:5])} that "
                                  f"{NNUNET_SPLITS_FILE} does not put in fold {fold.name}'s validation set; the split "
                                  "file does not belong to this model")
    return files


def _read_splits(model: Path, raw_names: list[str] | None) -> list[dict[str, list[str]]] | None:
    path = model / NNUNET_SPLITS_FILE
    if not path.is_file():
        return None
    if raw_names is None:  # no dataset to check the names against: the file's own names
        data = read_json(path, ConfigError)
        raw_names = sorted({str(n) for s in data if isinstance(s, dict) for k in ("train", "val")
                            for n in s.get(k, []) if isinstance(n, str)}) if isinstance(data, list) else []
    return read_nnunet_splits(path, raw_names)


def _check_raw_dataset(raw: Path, dataset: dict[str, Any]) -> list[str]:
    """The raw dataset's training case names, after checking it matches the model (labels, channels, ending)."""
    found = load_dataset(raw)
    if not (found.root / "labelsTr").is_dir():
        raise ConfigError(f"{found.root / 'labelsTr'} not found: the raw dataset scores the cross-validation with "
                          "its labels")
    for key in ("labels", "file_ending"):
        if found.meta.get(key) != dataset.get(key):
            raise ConfigError(f"{found.root / 'dataset.json'}: {key} {found.meta.get(key)!r} differs from the "
                              f"model's {dataset.get(key)!r}; give the dataset the model was trained on")
    if len(found.channel_names) != len(dataset.get("channel_names") or dataset.get("modality") or {}):
        raise ConfigError(f"{found.root / 'dataset.json'}: {len(found.channel_names)} channel(s), but the model "
                          "takes another number; give the dataset the model was trained on")
    return [case.name for case in found.cases]


def read_nnunet_model(model: str | Path, folds: int | str | Sequence[int | str] | None = None,
                      checkpoint: str = "final", raw_dataset: str | Path | None = None
                      ) -> tuple[dict[str, Any], list[ImportedFold], list[dict[str, list[str]]] | None, dict[str, Any]]:
    """Read and check everything an import writes: (dataset.json, folds, splits or None, provenance)."""
    model = Path(model)
    trainer, plans_name, configuration = check_model_folder(model)
    plans, dataset = _read_model_json(model / NNUNET_PLANS), _read_model_json(model / NNUNET_DATASET)
    if "channel_names" not in dataset and isinstance(dataset.get("modality"), dict):
        dataset = {**dataset, "channel_names": dataset["modality"]}
    raw = str(Path(raw_dataset).resolve()) if raw_dataset else ""
    raw_names = _check_raw_dataset(Path(raw), dataset) if raw else None
    splits = _read_splits(model, raw_names)
    ending = str(dataset.get("file_ending", ".nii.gz"))
    imported = []
    for path in nnunet_folds(model, folds, checkpoint):  # refuses missing folds and checkpoint names
        fold = _read_fold(model, path, plans, dataset, configuration, raw)
        fold.validation = _validation_files(model, fold, ending, splits)
        imported.append(fold)
    source = {
        "source": str(model.resolve()), "trainer": trainer, "plans_name": plans_name, "configuration": configuration,
        "checkpoint": checkpoint, "dataset_name": str(plans.get("dataset_name", "")), "raw_dataset": raw,
        "folds": {f.name: {"file": str(f.source.resolve()), "sha256": f.sha256, "epoch": f.state["progress"]["epoch"],
                           "validation_cases": len(f.validation)} for f in imported},
        "splits": NNUNET_SPLITS_FILE if splits is not None else None,
        "ignored": [str(p.relative_to(model)) for p in _postprocessing_pickles(model)],
        "voxseg_version": __version__,
        "dataset_fingerprint_sha256": (sha256_file(model / NNUNET_FINGERPRINT)
                                       if (model / NNUNET_FINGERPRINT).is_file() else None),
    }
    return dataset, imported, splits, source


def _postprocessing_pickles(model: Path) -> list[Path]:
    return sorted({p for pattern in POSTPROCESSING_PICKLES for p in model.glob(pattern) if p.is_file()})


def _check_target(workdir: Path, model: Path, force: bool) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{workdir} is a file; give a folder for the work directory")
    if workdir.resolve() == model.resolve() or model.resolve() in workdir.resolve().parents:
        raise ConfigError(f"{workdir} is inside the model folder {model}; import into a folder of its own")
    if workdir.is_dir() and any(workdir.iterdir()) and not force:
        raise ConfigError(f"{workdir} is not empty; import into a new folder, or replace its contents as a whole "
                          "with --force")


def _write(staging: Path, dataset: dict[str, Any], folds: list[ImportedFold],
           splits: list[dict[str, list[str]]] | None, source: dict[str, Any], checkpoint: str,
           postprocessing: dict[str, Any] | None) -> None:
    target = WorkDir(staging)
    folds[0].plan.save(target.plans)
    write_json_atomic(target.dataset_json, dataset)
    if postprocessing is not None:  # only the checked decision, nothing else of the untrusted file
        write_json_atomic(target.postprocessing, {
            "largest_component": postprocessing["largest_component"],
            "restored_from": f"{source['source']}/{EXPORTED_POSTPROCESSING_FILE}"})
    if splits is not None:
        save_splits(staging, splits)
    for fold in folds:
        out = target.fold(fold.name)
        out.path.mkdir(parents=True)
        save_checkpoint(out.checkpoint(checkpoint), fold.state)
        # the weights later loads read: converted once here, so no prediction unpickles nnU-Net's file again
        origin = provenance("nnunet-import", fold.name, checkpoint, source_file=str(fold.source.resolve()),
                            source_sha256=fold.sha256,
                            dataset_fingerprint_sha256=source.get("dataset_fingerprint_sha256"))
        write_weights(out.weights(checkpoint), fold.state["model"], fold.state["plan"], config=fold.state["config"],
                      progress={"epoch": fold.state["progress"]["epoch"]}, provenance=origin,
                      checkpoint=checkpoint_record(out.checkpoint(checkpoint)))
        fold.plan.save(out.plans)
        write_json_atomic(out.config, fold.state["config"])
        if fold.validation:
            out.validation.mkdir()
            for path in fold.validation:
                shutil.copyfile(path, out.validation / path.name)
    write_json_atomic(target.nnunet_source, source)


def import_nnunet(model: str | Path, workdir: str | Path, folds: int | str | Sequence[int | str] | None = None,
                  checkpoint: str = "final", force: bool = False, raw_dataset: str | Path | None = None
                  ) -> ImportResult:
    """Turn an nnU-Net v2 model folder into a voxseg work directory (see the module docstring).

    Args:
        model: the <Trainer>__<Plans>__<configuration> folder.
        workdir: the work directory to write; must be absent or empty unless `force`.
        folds: fold numbers, "all" (fold_all, else every fold) or None (every fold_N).
        checkpoint: "final" or "best": which checkpoint of each fold (written under the same name).
        force: replace a non-empty `workdir` as a whole.
        raw_dataset: the raw dataset the model was trained on; its labelsTr scores `voxseg evaluate --crossval`.

    Raises:
        CheckpointError: not an nnU-Net model folder, a missing fold or checkpoint, an unsafe checkpoint, a
            network voxseg cannot represent exactly, validation predictions that contradict splits_final.json.
        ConfigError: a non-empty `workdir` without `force`, a raw dataset that does not match the model.
    """
    if checkpoint not in CHECKPOINT_FILES:
        raise ConfigError(f"checkpoint '{checkpoint}' does not exist in nnU-Net model folders; use "
                          f"{' or '.join(CHECKPOINT_FILES)}")
    model, workdir = Path(model), Path(workdir)
    check_model_folder(model)
    _check_target(workdir, model, force)
    dataset, imported, splits, source = read_nnunet_model(model, folds, checkpoint, raw_dataset)
    postprocessing = model_postprocessing(model, imported[0].plan.regions, nnunet_folder=True)
    source["postprocessing"] = EXPORTED_POSTPROCESSING_FILE if postprocessing is not None else None
    workdir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(workdir)  # left by a run that was killed
    staging = staging_folder(workdir, "import")
    try:
        _write(staging, dataset, imported, splits, source, checkpoint, postprocessing)
        swap_in_folder(staging, workdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(workdir, [f.name for f in imported], checkpoint, [f.name for f in imported if f.validation],
                        _postprocessing_pickles(model), splits is not None, source["raw_dataset"], postprocessing)
