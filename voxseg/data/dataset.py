"""Raw datasets in nnU-Net v2 layout, read as they are.

```
DATASET/dataset.json
DATASET/imagesTr/CASE_0000.nii.gz ...   one file per channel
DATASET/labelsTr/CASE.nii.gz
DATASET/imagesTs/CASE_0000.nii.gz ...   optional
```
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxseg.errors import DatasetError
from voxseg.labels import LabelScheme


@dataclass
class RawCase:
    """One case: its channel files in channel order and its label file (None for test cases)."""

    name: str
    image_files: list[Path]
    label_file: Path | None = None


@dataclass
class RawDataset:
    """A parsed dataset.json plus the cases found on disk."""

    root: Path
    meta: dict[str, Any]
    cases: list[RawCase] = field(default_factory=list)
    test_cases: list[RawCase] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.root.name))

    @property
    def channel_names(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.meta["channel_names"].items()}

    @property
    def num_channels(self) -> int:
        return len(self.meta["channel_names"])

    @property
    def labels(self) -> dict[str, Any]:
        return dict(self.meta["labels"])

    @property
    def file_ending(self) -> str:
        return str(self.meta["file_ending"])

    @property
    def regions_class_order(self) -> list[int] | None:
        order = self.meta.get("regions_class_order")
        return [int(v) for v in order] if order is not None else None

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme(self.labels, self.regions_class_order)


REQUIRED_KEYS = ("channel_names", "labels", "file_ending")


def read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if not path.is_file():
        raise DatasetError(
            f"{path}: missing. A dataset needs dataset.json with channel_names, labels and file_ending "
            "(nnU-Net v2 layout); use 'voxseg convert' for BraTS or Decathlon folders"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}")
    if "background" not in meta["labels"] or meta["labels"]["background"] != 0:
        raise DatasetError(f"{path}: labels must contain \"background\": 0")
    return meta


def _channel_pattern(ending: str) -> re.Pattern[str]:
    return re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")


def find_cases(image_dir: Path, label_dir: Path | None, ending: str, num_channels: int) -> list[RawCase]:
    """Group `CASE_XXXX{ending}` files into cases. Missing channels are kept as missing paths for `check`."""
    if not image_dir.is_dir():
        return []
    pattern = _channel_pattern(ending)
    names: set[str] = set()
    for path in image_dir.iterdir():
        match = pattern.match(path.name)
        if match:
            names.add(match.group("case"))
    cases = []
    for name in sorted(names):
        files = [image_dir / f"{name}_{c:04d}{ending}" for c in range(num_channels)]
        label = (label_dir / f"{name}{ending}") if label_dir is not None else None
        cases.append(RawCase(name, files, label))
    return cases


def load_dataset(root: str | Path) -> RawDataset:
    """Parse dataset.json and list the training and test cases found on disk (without reading images)."""
    root = Path(root).resolve()
    meta = read_dataset_json(root)
    ending = str(meta["file_ending"])
    n = len(meta["channel_names"])
    cases = find_cases(root / "imagesTr", root / "labelsTr", ending, n)
    # label files whose images are all missing still count as cases, so check can report them
    labels_dir = root / "labelsTr"
    if labels_dir.is_dir():
        known = {c.name for c in cases}
        for path in sorted(labels_dir.iterdir()):
            if path.name.endswith(ending) and path.name[: -len(ending)] not in known:
                name = path.name[: -len(ending)]
                files = [root / "imagesTr" / f"{name}_{c:04d}{ending}" for c in range(n)]
                cases.append(RawCase(name, files, path))
        cases.sort(key=lambda c: c.name)
    test_cases = find_cases(root / "imagesTs", None, ending, n)
    return RawDataset(root, meta, cases, test_cases)
