"""`PlanOptions`: how `voxseg plan` / `plan_dataset` plans a dataset (the one home of these defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from voxseg.configtree import replace_fields
from voxseg.errors import ConfigError


def check_gpu_memory(gpu_memory_gb: float) -> float:
    """The GPU memory budget in GiB the plan is sized for: a positive number."""
    if not (isinstance(gpu_memory_gb, (int, float)) and gpu_memory_gb > 0 and math.isfinite(gpu_memory_gb)):
        raise ConfigError(f"gpu_memory_gb={gpu_memory_gb!r}: the GPU memory to plan for must be a positive number "
                          "of GiB, e.g. 8 (voxseg plan --gpu-memory)")
    return float(gpu_memory_gb)


@dataclass(frozen=True)
class PlanOptions:
    """How a dataset is planned."""

    gpu_memory_gb: float = 8.0
    """memory budget of one GPU (GiB): patch and batch are chosen so the training step's estimate fits it."""
    overrides: dict[str, Any] | None = None
    """plan fields set by hand, dotted keys (`voxseg.plans.parse_overrides`), e.g. {"patch_size": "96,96,96"}."""
    num_folds: int = 5
    """random cross-validation folds (when the raw dataset has no splits_final.json and no val_fraction)."""
    val_fraction: float | None = None
    """one random train/validation split with this share of validation cases, instead of folds."""
    seed: int = 12345
    """seed of the random split."""
    num_workers: int = 1
    """processes reading cases for the check and the fingerprint."""
    dims: int = 3
    """3 plans every configuration (3d_fullres the default); 2 plans the 2d configuration alone, as the default."""
    cube_patch: bool = False
    """the cube rule for the 3D patch instead of the median case's aspect ratio (see `fit_patch`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_memory_gb", check_gpu_memory(self.gpu_memory_gb))
        if self.dims not in (2, 3):
            raise ConfigError(f"dims={self.dims}: plan a 2 or 3 dimensional configuration")

    @classmethod
    def build(cls, options: "PlanOptions | None" = None, **fields: Any) -> "PlanOptions":
        """`options` (default: the defaults) with single fields replaced; an unknown name is refused."""
        return replace_fields(options or cls(), "planning option", **fields)
