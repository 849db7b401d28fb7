"""Label and region semantics of a dataset, defined once: which names are classes, which are regions, how
many network outputs they need, the ignore label, the values a label file may hold, and the order in which
regions write label values back.

Everything that needs to know what dataset.json's `labels` mean (the plan, planning, the dataset check, losses,
validation, postprocessing, evaluation) asks a `LabelScheme`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RESERVED_LABEL_NAMES = ("background", "ignore")  # dataset.json label names that are not classes


@dataclass(frozen=True)
class LabelScheme:
    """What dataset.json's `labels` mean, in one place: classes, regions, outputs, the ignore label.

    A label maps a name to a value (`"edema": 1`) or to a list of values, a region (`"whole_tumor": [1, 2, 3]`).
    "background" (0) and "ignore" are not classes. Any region makes the dataset region-based: one sigmoid
    output per class, and `regions_class_order` says which value each region writes back (in order, later
    regions overwrite earlier ones). Otherwise one softmax output for background plus one per label.

    Example: {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]} -> region-based,
    class_names [whole, core, enhancing], regions [[1, 2, 3], [2, 3], [3]], 3 outputs, class order [1, 2, 3].
    """

    labels: dict[str, Any]
    regions_class_order: list[int] | None = None

    @property
    def class_names(self) -> list[str]:
        """Foreground classes (labels or regions) in output order (after background for softmax)."""
        return [name for name in self.labels if name not in RESERVED_LABEL_NAMES]

    @property
    def regions(self) -> list[list[int]]:
        """Each class as its list of label values: one per region, or a one-value list per label."""
        return [[int(v) for v in _values(self.labels[name])] for name in self.class_names]

    @property
    def is_region_based(self) -> bool:
        return any(isinstance(self.labels[name], (list, tuple)) for name in self.class_names)

    @property
    def ignore_label(self) -> int | None:
        value = self.labels.get("ignore")
        return int(value) if value is not None else None

    @property
    def foreground_labels(self) -> list[int]:
        """Label values (not regions) other than background and ignore, sorted."""
        return sorted({v for region in self.regions for v in region})

    @property
    def num_outputs(self) -> int:
        """Network output channels: one per region (sigmoid), or background + one per label (softmax)."""
        return len(self.class_names) if self.is_region_based else len(self.class_names) + 1

    @property
    def allowed_values(self) -> set[int]:
        """Every integer a label file may contain (background, labels, region members, ignore).

        Raises TypeError/ValueError when a label is not an integer or a list of integers.
        """
        return {int(v) for value in self.labels.values() for v in _values(value)}

    @property
    def class_order(self) -> list[int]:
        """The label value each region writes back: `regions_class_order`, else each region's smallest value
        not in a later region (BraTS [[1, 2, 3], [2, 3], [3]] -> [1, 2, 3]). For labels: their own values."""
        regions = self.regions
        if not self.is_region_based:
            return [region[0] for region in regions]
        if self.regions_class_order is not None:
            return [int(v) for v in self.regions_class_order]
        order = []
        for i, region in enumerate(regions):
            later = {v for r in regions[i + 1:] for v in r}
            own = sorted(set(region) - later) or sorted(region)
            order.append(own[0])
        return order


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
