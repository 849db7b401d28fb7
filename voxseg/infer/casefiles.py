"""The files side of `Predictor.predict_files`: this torchrun rank's share of the cases, the failure of one
case in the report, and the writer of a case's probabilities (also used by full validation)."""
from __future__ import annotations

import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

import numpy as np

from voxseg.atomicio import atomic_open
from voxseg.distributed import env_world, shard_balanced
from voxseg.errors import VoxsegError

__all__ = ["case_failure_reason", "collect_write", "my_share", "save_probabilities"]


def my_share(cases: Sequence[tuple[str, Sequence[str | Path]]]) -> list[tuple[str, Sequence[str | Path]]]:
    """This torchrun rank's cases, balanced by the size of their input files (all cases for one process)."""
    rank, size, _ = env_world()
    if size == 1:
        return list(cases)
    sizes = [sum(Path(f).stat().st_size for f in files if Path(f).is_file()) for _, files in cases]
    mine = shard_balanced(list(cases), sizes, rank, size)
    print(f"rank {rank}/{size}: predicting {len(mine)} of {len(cases)} cases", file=sys.stderr, flush=True)
    return mine


def case_failure_reason(name: str, exc: Exception) -> str:
    """The error message without a leading "case NAME:", which the failure list already shows."""
    message = str(exc)
    for prefix in (f"case '{name}': ", f"case {name}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def collect_write(item: tuple[str, Future], failures: list[tuple[str, str]]) -> int:
    """1 when the write of a case finished, else 0 with (name, reason) appended to `failures`."""
    name, future = item
    try:
        future.result()
        return 1
    except (VoxsegError, OSError) as exc:
        failures.append((name, f"could not write the prediction ({exc})"))
        return 0


def save_probabilities(path: Path, probabilities: np.ndarray, class_names: Sequence[str]) -> None:
    """NAME.npz with "probabilities" (K, D, H, W) float16 and "class_names", written atomically."""
    with atomic_open(path) as handle:
        np.savez_compressed(handle, probabilities=probabilities.astype(np.float16), class_names=np.array(class_names))
