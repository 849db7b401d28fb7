"""How a folder of predictions is scored: `EvaluationSettings`, the one home of the evaluation defaults
(`voxseg evaluate`'s options, `evaluate_folder`'s keywords, cross-validation's scoring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from voxseg.configtree import replace_fields
from voxseg.errors import ConfigError
from voxseg.evaluate.conventions import check_convention
from voxseg.evaluate.matching import check_tolerance
from voxseg.evaluate.metrics import HD95_ONE_EMPTY_CHOICES, MetricOptions


@dataclass(frozen=True)
class EvaluationSettings:
    """The settings of one evaluation."""

    regions: bool | dict[str, list[int]] = True
    """True evaluates dataset.json's regions, False skips them, a dict {name: [values]} adds extra regions."""
    tolerance_mm: float = MetricOptions.tolerance_mm
    """surface Dice (NSD) tolerance in mm, >= 0."""
    num_workers: int = 1
    """processes reading and evaluating cases in parallel."""
    file_ending: str | None = None
    """e.g. ".nii.gz"; None: dataset.json's, else the single ending found among the references."""
    one_empty_hd95: str = MetricOptions.one_empty_hd95
    """HD95 when exactly one of prediction and reference is empty: "nan" or "diagonal" (the image diagonal)."""
    allow_missing: bool = False
    """score only the cases present on both sides (missing and extra cases listed) instead of refusing."""
    allow_undeclared: bool = False
    """accept label values dataset.json does not declare (listed under "undeclared_values")."""
    convention: str = "voxseg"
    """how a class absent from the reference scores: "voxseg", "nnunet", "monai" or "brats"."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerance_mm", check_tolerance(self.tolerance_mm))
        check_convention(self.convention)
        if self.one_empty_hd95 not in HD95_ONE_EMPTY_CHOICES:
            raise ConfigError(f"one_empty_hd95='{self.one_empty_hd95}' is unknown; use "
                              f"{' or '.join(HD95_ONE_EMPTY_CHOICES)}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError(f"num_workers={self.num_workers!r}: give 1 or more processes (voxseg evaluate -j)")

    @classmethod
    def build(cls, settings: "EvaluationSettings | None" = None, **options: Any) -> "EvaluationSettings":
        """`settings` (default: the defaults) with `options` (field=value) replaced; an unknown name is refused."""
        return replace_fields(settings or cls(), "evaluation option", **options)
