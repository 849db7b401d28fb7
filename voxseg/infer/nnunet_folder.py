"""An nnU-Net v2 model folder: its layout, its folds' checkpoint files and their safe loading.

```
MODEL = <Trainer>__<Plans>__<configuration>/   plans.json  dataset.json  [dataset_fingerprint.json]
MODEL/fold_F/checkpoint_final.pth  [checkpoint_best.pth]  [validation/]      (F = 0..4 or "all")
```
A checkpoint is a pickle (nnU-Net loads it with `weights_only=False`). Here it is read with `weights_only=True`
and an allowlist of the few plain types nnU-Net's trainer puts next to the weights (numpy scalars in its logs
and their dtypes); anything else is refused and never executed. postprocessing.pkl is never read.
What the folder's plans.json means for voxseg (a Plan, the network's weights) is `voxseg.infer.nnunet`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from voxseg.checkpoint import load_checkpoint
from voxseg.errors import CheckpointError
from voxseg.jsonio import read_json

# the folder's layout: nnU-Net's own, not a voxseg work directory (that is voxseg.workdir)
NNUNET_PLANS = "plans.json"
NNUNET_DATASET = "dataset.json"
NNUNET_FINGERPRINT = "dataset_fingerprint.json"
NNUNET_FOLD_PREFIX = "fold_"
NNUNET_VALIDATION = "validation"  # in fold_F/: the fold's validation predictions
CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}

_NUMPY_DTYPES = ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                 "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType")


# ----- safe loading -------------------------------------------------------------------------------------------
def _safe_globals() -> list[Any]:
    """The plain numpy types nnU-Net's checkpoints hold (numpy scalars in 'logging' and '_best_ema')."""
    from numpy._core.multiarray import scalar

    allowed: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, name) for name in _NUMPY_DTYPES if hasattr(np.dtypes, name)]
    return allowed


def load_nnunet_checkpoint(path: str | Path) -> dict[str, Any]:
    """An nnU-Net checkpoint read with `weights_only=True`; CheckpointError when it holds anything unsafe."""
    with torch.serialization.safe_globals(_safe_globals()):
        state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state.get("network_weights"), dict):
        raise CheckpointError(f"{path} has no 'network_weights'; is it an nnU-Net v2 checkpoint?")
    return state


# ----- the model folder ---------------------------------------------------------------------------------------
def nnunet_fold_dir(folder: str | Path, fold: int | str) -> Path:
    """MODEL/fold_F of an nnU-Net model folder (F a number or "all")."""
    return Path(folder) / f"{NNUNET_FOLD_PREFIX}{fold}"


def is_nnunet_model_folder(path: str | Path) -> bool:
    """True for a folder with nnU-Net's plans.json (it has "configurations"), dataset.json and a fold_* folder."""
    path = Path(path)
    if not ((path / NNUNET_PLANS).is_file() and (path / NNUNET_DATASET).is_file()):
        return False
    if not any(p.is_dir() for p in path.glob(f"{NNUNET_FOLD_PREFIX}*")):
        return False
    try:
        return "configurations" in read_json(path / NNUNET_PLANS, CheckpointError)
    except (CheckpointError, TypeError):
        return False


def configuration_name(folder: str | Path) -> str:
    """The configuration of a `<Trainer>__<Plans>__<configuration>` folder name."""
    parts = Path(folder).resolve().name.split("__")
    if len(parts) != 3 or not all(parts):
        raise CheckpointError(f"{folder}: an nnU-Net model folder is named <Trainer>__<Plans>__<configuration> "
                              "(e.g. nnUNetTrainer__nnUNetPlans__3d_fullres); rename it so")
    return parts[2]


def read_model_json(path: Path) -> dict[str, Any]:
    """A JSON file of the model folder (plans.json, dataset.json); CheckpointError when it cannot be read."""
    return read_json(path, CheckpointError)


# ----- folds ----------------------------------------------------------------------------------------------------
def nnunet_folds(folder: str | Path, folds: int | str | Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    """Checkpoint files of the chosen folds: ints / "all" (fold_all, else every fold) / None (every fold_N, else
    fold_all when it is the only one)."""
    folder = Path(folder)
    if checkpoint not in CHECKPOINT_FILES:
        raise CheckpointError(f"checkpoint '{checkpoint}' does not exist in nnU-Net model folders; use "
                              f"{' or '.join(CHECKPOINT_FILES)}")
    filename = CHECKPOINT_FILES[checkpoint]
    if folds is None or folds == "all":
        has_fold_all = (nnunet_fold_dir(folder, "all") / filename).is_file()
        numbers = {p.name[len(NNUNET_FOLD_PREFIX):]: p for p in folder.glob(f"{NNUNET_FOLD_PREFIX}*")}
        names = sorted((n for n, p in numbers.items() if n.isdigit() and (p / filename).is_file()), key=int)
        if has_fold_all and (folds == "all" or not names):
            names = ["all"]
    else:
        names = [str(f) for f in ([folds] if isinstance(folds, (int, str)) else folds)]
    if not names:
        raise CheckpointError(f"{folder}: no fold_N folder holds {filename}")
    paths = [nnunet_fold_dir(folder, name) / filename for name in names]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path} not found (nnU-Net model folder {folder})")
    return paths
