"""Every path of a voxseg work directory, from one object: `WorkDir(path)`, and `FoldDir` for a fold's run.

```
WORKDIR/                     WorkDir(WORKDIR)
  dataset.json               .dataset_json            copy of the raw dataset.json
  fingerprint.json           .fingerprint             voxseg.data.fingerprint
  plans.json                 .plans                   voxseg.plans.Plan (single source of truth for later stages)
  splits.json                .splits                  list of {"train": [...], "val": [...]} per fold
  configurations.json        .configurations          the planned configurations (voxseg.data.configs)
  configs/NAME/              .configuration(NAME)     every configuration but the default: a WorkDir of its own
  preprocessed/              .preprocessed            the case store (voxseg.data.store: CASE.npy, CASE_seg.npy,
                                                      CASE.json, CASE_fg.npz)
  training/                  .training
    fold_F/                  .fold(F) -> FoldDir      a fold's run (F an index or "all")
      plans.json             .plans                   the run's effective plan
      config.json            .config                  the config the run started with, and its changes
      checkpoint_TAG.pt      .checkpoint(TAG)         TAG: latest, best, final
      checkpoint_epoch_E.pt  .snapshot(E)             periodic snapshots (loop.keep_snapshots)
      model_TAG.safetensors  .weights(TAG)            TAG: final, best: the weights prediction loads (no pickle)
      log.jsonl              .log                     one record per epoch
      progress.png           .progress_plot
      tensorboard/           .tensorboard
      validation/            .validation              full validation of the final weights (what crossval reads)
      validation_TAG/        .checkpoint_validation(TAG)   --test-only of checkpoint_TAG.pt
        checkpoint.json      .validated_checkpoint(TAG)    which checkpoint file it validated
      model.onnx             .onnx                    `voxseg export --format onnx`
    crossval/                .crossval                every fold's validation predictions together
      summary.json           .crossval_summary        their evaluation (and summary.csv)
      postprocessed/         .crossval_postprocessed  the same after the postprocessing decision
  postprocessing.json        .postprocessing          the decision `voxseg predict` applies
  inference_choice.json      .inference_choice        the configuration or ensemble `voxseg predict` uses
  ensembles/A+B/             .ensemble(A+B)           a pair ensemble's cross-validation predictions
    postprocessing.json      .ensemble_postprocessing(A+B)
  predicted_next_stage/NEXT/ .next_stage_predictions(NEXT)   CASE.npy: a cascade's first-stage predictions
  nnunet_source.json         .nnunet_source           where `voxseg import nnunet` took the model from
  voxseg_archive.json        .archive_manifest        an installed model: the archive's member list and digests
  benchmark.json             .benchmark               `voxseg benchmark` (default output)
  estimate.json              .estimate                `voxseg estimate` (default output)
```

Only this module spells the names of the layout (tests/test_workdir.py refuses them elsewhere in voxseg/).
Examples:
    >>> WorkDir("work/brats").fold(0).checkpoint("final")
    PosixPath('work/brats/training/fold_0/checkpoint_final.pt')
    >>> WorkDir("work/brats").configuration("2d").plans
    PosixPath('work/brats/configs/2d/plans.json')
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["FoldDir", "WorkDir"]

# one name per entry of the tree above; only the properties below read them
_DATASET_JSON = "dataset.json"
_FINGERPRINT = "fingerprint.json"
_PLANS = "plans.json"
_SPLITS = "splits.json"
_CONFIGURATIONS = "configurations.json"
_CONFIGS = "configs"
_PREPROCESSED = "preprocessed"
_TRAINING = "training"
_FOLD_PREFIX = "fold_"
_CONFIG = "config.json"
_CHECKPOINT_PREFIX, _CHECKPOINT_SUFFIX = "checkpoint_", ".pt"
_SNAPSHOT_PREFIX = "epoch_"
_LOG = "log.jsonl"
_PROGRESS_PLOT = "progress.png"
_TENSORBOARD = "tensorboard"
_VALIDATION = "validation"
_VALIDATED_CHECKPOINT = "checkpoint.json"
_ONNX = "model.onnx"
_WEIGHTS_PREFIX, _WEIGHTS_SUFFIX = "model_", ".safetensors"
_ARCHIVE_MANIFEST = "voxseg_archive.json"
_CROSSVAL = "crossval"
_SUMMARY = "summary.json"
_POSTPROCESSED = "postprocessed"
_POSTPROCESSING = "postprocessing.json"
_INFERENCE_CHOICE = "inference_choice.json"
_ENSEMBLES = "ensembles"
_NEXT_STAGE = "predicted_next_stage"
_NNUNET_SOURCE = "nnunet_source.json"
_BENCHMARK = "benchmark.json"
_ESTIMATE = "estimate.json"


def _as_path(path: str | Path | WorkDir | FoldDir) -> Path:
    return path.path if isinstance(path, (WorkDir, FoldDir)) else Path(path)


@dataclass(frozen=True, init=False)
class FoldDir:
    """A fold's run folder, WORKDIR/training/fold_F: what a training run writes and test-only adds.

    Any folder can be wrapped (`FoldDir(path)`); `in_workdir` says whether it sits where a work directory's
    fold does, and `workdir`/`fold` then name them.
    """

    path: Path

    def __init__(self, path: str | Path | FoldDir) -> None:
        object.__setattr__(self, "path", _as_path(path))

    @property
    def plans(self) -> Path:
        return self.path / _PLANS

    @property
    def config(self) -> Path:
        return self.path / _CONFIG

    @property
    def log(self) -> Path:
        return self.path / _LOG

    @property
    def progress_plot(self) -> Path:
        return self.path / _PROGRESS_PLOT

    @property
    def tensorboard(self) -> Path:
        return self.path / _TENSORBOARD

    @property
    def validation(self) -> Path:
        return self.path / _VALIDATION

    @property
    def onnx(self) -> Path:
        return self.path / _ONNX

    def checkpoint(self, tag: str) -> Path:
        """checkpoint_{tag}.pt (tag: final, best, latest or epoch_E)."""
        return self.path / f"{_CHECKPOINT_PREFIX}{tag}{_CHECKPOINT_SUFFIX}"

    def weights(self, tag: str) -> Path:
        """model_{tag}.safetensors: the network weights of checkpoint_{tag}.pt in a file that cannot run code
        (voxseg.weights; tag final or best)."""
        return self.path / f"{_WEIGHTS_PREFIX}{tag}{_WEIGHTS_SUFFIX}"

    def has_model(self, tag: str) -> bool:
        """Whether the fold has weights to predict with under `tag`: model_{tag}.safetensors or checkpoint_{tag}.pt."""
        return self.weights(tag).is_file() or self.checkpoint(tag).is_file()

    def weight_files(self) -> list[Path]:
        """Every model_*.safetensors in the folder, by name."""
        return sorted(self.path.glob(f"{_WEIGHTS_PREFIX}*{_WEIGHTS_SUFFIX}"))

    def snapshot(self, epoch: int) -> Path:
        """The periodic snapshot of `epoch`: checkpoint_epoch_E.pt."""
        return self.checkpoint(self.snapshot_tag(epoch))

    @staticmethod
    def snapshot_tag(epoch: int) -> str:
        """The checkpoint tag of `epoch`'s periodic snapshot: epoch_E."""
        return f"{_SNAPSHOT_PREFIX}{epoch}"

    def checkpoints(self) -> list[Path]:
        """Every checkpoint file in the folder, by name."""
        return sorted(self.path.glob(f"{_CHECKPOINT_PREFIX}*{_CHECKPOINT_SUFFIX}"))

    def snapshots(self) -> list[Path]:
        """The periodic snapshots in the folder, oldest epoch first."""
        found = [(int(tag[len(_SNAPSHOT_PREFIX):]), path) for path in self.checkpoints()
                 if (tag := checkpoint_tag(path) or "").startswith(_SNAPSHOT_PREFIX)
                 and tag[len(_SNAPSHOT_PREFIX):].isdigit()]
        return [path for _, path in sorted(found)]

    def run_files(self) -> list[Path]:
        """The files that show the folder holds a run (a checkpoint, its log or its config), sorted."""
        if not self.path.is_dir():
            return []
        return sorted(self.checkpoints() + [p for p in (self.log, self.config) if p.exists()])

    def checkpoint_validation(self, tag: str) -> Path:
        """Where `--test-only` writes the validation of checkpoint_{tag}.pt: validation_{tag}/."""
        return self.path / f"{_VALIDATION}_{tag}"

    def validated_checkpoint(self, tag: str) -> Path:
        """validation_{tag}/checkpoint.json: which checkpoint file that validation is of."""
        return self.checkpoint_validation(tag) / _VALIDATED_CHECKPOINT

    @property
    def in_workdir(self) -> bool:
        """Whether the folder sits where a work directory's fold does (WORKDIR/training/fold_F)."""
        return self.path.parent.name == _TRAINING and self.path.name.startswith(_FOLD_PREFIX)

    @property
    def fold(self) -> str:
        """The fold's name: "0", "1", ... or "all" (the folder name without its prefix)."""
        name = self.path.name
        return name[len(_FOLD_PREFIX):] if name.startswith(_FOLD_PREFIX) else name

    @property
    def workdir(self) -> WorkDir:
        """The work directory the fold belongs to (meaningful when `in_workdir`)."""
        return WorkDir(self.path.parent.parent)


def checkpoint_tag(path: str | Path) -> str | None:
    """The tag of a checkpoint file name ("best" for checkpoint_best.pt), None for any other file."""
    name = Path(path).name
    if name.startswith(_CHECKPOINT_PREFIX) and name.endswith(_CHECKPOINT_SUFFIX):
        return name[len(_CHECKPOINT_PREFIX):-len(_CHECKPOINT_SUFFIX)] or None
    return None


@dataclass(frozen=True, init=False)
class WorkDir:
    """A voxseg work directory (or a configuration folder of one, or a model folder installed from an archive):
    every path in it as a named property, see the module docstring for the tree."""

    path: Path

    def __init__(self, path: str | Path | WorkDir) -> None:
        object.__setattr__(self, "path", _as_path(path))

    @property
    def dataset_json(self) -> Path:
        return self.path / _DATASET_JSON

    @property
    def fingerprint(self) -> Path:
        return self.path / _FINGERPRINT

    @property
    def plans(self) -> Path:
        return self.path / _PLANS

    @property
    def splits(self) -> Path:
        return self.path / _SPLITS

    @property
    def configurations(self) -> Path:
        return self.path / _CONFIGURATIONS

    def configuration(self, name: str) -> WorkDir:
        """The folder of configuration `name` when it is not the default: configs/NAME (see
        `voxseg.data.configs.config_workdir`, which resolves a name through configurations.json)."""
        return WorkDir(self.path / _CONFIGS / name)

    @property
    def parent(self) -> WorkDir | None:
        """The work directory a configuration folder (WORKDIR/configs/NAME) belongs to; None for any other."""
        root = self.path.parent.parent
        if self.path.parent.name == _CONFIGS and WorkDir(root).configurations.is_file():
            return WorkDir(root)
        return None

    @property
    def preprocessed(self) -> Path:
        return self.path / _PREPROCESSED

    @property
    def training(self) -> Path:
        return self.path / _TRAINING

    def fold(self, fold: int | str) -> FoldDir:
        """The run folder of fold `fold` (an index, a digit string or "all"): training/fold_F."""
        return FoldDir(self.training / f"{_FOLD_PREFIX}{fold}")

    def numbered_folds(self) -> dict[int, FoldDir]:
        """The numbered fold folders that exist (fold_all and files left out), in numeric order."""
        if not self.training.is_dir():
            return {}
        found = {int(folder.fold): folder for folder in map(FoldDir, self.training.glob(f"{_FOLD_PREFIX}*"))
                 if folder.fold.isdigit() and folder.path.is_dir()}
        return dict(sorted(found.items()))

    @property
    def crossval(self) -> Path:
        return self.training / _CROSSVAL

    @property
    def crossval_summary(self) -> Path:
        return self.crossval / _SUMMARY

    @property
    def crossval_postprocessed(self) -> Path:
        return self.crossval / _POSTPROCESSED

    @property
    def postprocessing(self) -> Path:
        return self.path / _POSTPROCESSING

    @property
    def inference_choice(self) -> Path:
        return self.path / _INFERENCE_CHOICE

    def ensemble(self, name: str) -> Path:
        """The cross-validation predictions of pair ensemble `name` ("A+B")."""
        return self.path / _ENSEMBLES / name

    def ensemble_postprocessing(self, name: str) -> Path:
        """The postprocessing decided on pair ensemble `name`'s predictions."""
        return self.ensemble(name) / _POSTPROCESSING

    def next_stage_predictions(self, next_stage: str) -> Path:
        """This (first) stage's cross-validation labels on cascade stage `next_stage`'s grid, CASE.npy each."""
        return self.path / _NEXT_STAGE / next_stage

    @property
    def nnunet_source(self) -> Path:
        return self.path / _NNUNET_SOURCE

    @property
    def archive_manifest(self) -> Path:
        return self.path / _ARCHIVE_MANIFEST

    @property
    def benchmark(self) -> Path:
        return self.path / _BENCHMARK

    @property
    def estimate(self) -> Path:
        return self.path / _ESTIMATE

    def member(self, path: str | Path) -> str:
        """`path` relative to the work directory in POSIX form: its name inside an archive or an index."""
        return Path(path).relative_to(self.path).as_posix()

    def has_checkpoints(self) -> bool:
        """Whether any fold folder holds a checkpoint or a weights file."""
        return self.training.is_dir() and any(
            FoldDir(folder).checkpoints() or FoldDir(folder).weight_files()
            for folder in self.training.glob(f"{_FOLD_PREFIX}*"))
