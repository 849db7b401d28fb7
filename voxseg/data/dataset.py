"""Raw datasets in nnU-Net v2 layout, read as they are.

```
DATASET/dataset.json
DATASET/imagesTr/CASE_0000.nii.gz ...   one file per channel
DATASET/labelsTr/CASE.nii.gz
DATASET/imagesTs/CASE_0000.nii.gz ...   optional
```
dataset.json holds what nnU-Net v2's does. Read: channel_names (or the older "modality"), labels,
regions_class_order, file_ending, numTraining (`voxseg check` compares it with the cases found), and a "dataset"
entry listing the files explicitly when it names the layout above. Refused with a message that says what to do:
a file_ending voxseg cannot read (2D .png/.bmp, .tif stacks, .gipl), an "overwrite_image_reader_writer" whose
arrays differ from voxseg's reader (NibabelIOWithReorient reorients to RAS, the 2D and TIFF readers) and a
"dataset" entry pointing elsewhere. Every other key (name, description, licence, reference, ...) is kept and
otherwise ignored, as nnU-Net does.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxseg.data.io import SUPPORTED_ENDINGS
from voxseg.errors import DatasetError, VoxsegError
from voxseg.jsonio import read_json
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
    meta = read_json(path, DatasetError)
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object with channel_names, labels and file_ending")
    if "channel_names" not in meta and isinstance(meta.get("modality"), dict):
        meta["channel_names"] = meta["modality"]  # the older nnU-Net name, which nnU-Net v2 still reads
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}")
    if "background" not in meta["labels"] or meta["labels"]["background"] != 0:
        raise DatasetError(f"{path}: labels must contain \"background\": 0")
    check_nnunet_fields(meta, path)
    return meta


# nnU-Net's image readers, named by dataset.json "overwrite_image_reader_writer": the ones whose voxel arrays are
# voxseg's (SimpleITK's axis order, no reorientation), and why the others are refused
READERS_LIKE_VOXSEG = ("SimpleITKIO", "NibabelIO", "None")
_READER_REFUSALS = {
    "NibabelIOWithReorient": "reorients every image to RAS before use, and voxseg reads images in their stored "
                             "orientation; reorient the files to RAS (and remove the field), or remove the field "
                             "when every case is stored in RAS already",
    "NaturalImage2DIO": "reads 2D natural images (.png, .bmp, .tif); voxseg segments 3D volumes: convert the "
                        "images to 3D .nii.gz files",
    "Tiff3DIO": "reads .tif stacks with their spacing in a .json next to them, which voxseg does not read: convert "
                "the images to .nii.gz",
}
_ENDING_REFUSALS = {
    ".png": "2D natural images", ".bmp": "2D natural images", ".tif": "TIFF images", ".tiff": "TIFF images",
    ".gipl": "GIPL images",
}


def check_nnunet_fields(meta: dict[str, Any], where: str | Path, error: type[VoxsegError] = DatasetError) -> None:
    """Refuse the dataset.json fields nnU-Net accepts but voxseg would read differently (see the module text).

    Raises:
        `error` naming `where`, the field, its value and what to do.
    """
    ending = str(meta.get("file_ending", ""))
    if ending not in SUPPORTED_ENDINGS:
        if ending and not ending.startswith(".") and f".{ending}" in SUPPORTED_ENDINGS:
            raise error(f"{where}: file_ending '{ending}' lacks its leading dot: write \".{ending}\"")
        what = _ENDING_REFUSALS.get(ending.lower(), "a format")
        raise error(f"{where}: file_ending '{ending}' is {what}, which voxseg does not read; it reads "
                    f"{', '.join(SUPPORTED_ENDINGS)}: convert the images and labels (e.g. with SimpleITK) and set "
                    "file_ending to match")
    reader = meta.get("overwrite_image_reader_writer")
    if reader is not None and str(reader) not in READERS_LIKE_VOXSEG:
        reason = _READER_REFUSALS.get(str(reader), "is a reader voxseg does not know, so the arrays it gives "
                                      "cannot be matched; remove the field if the files are plain images")
        raise error(f"{where}: overwrite_image_reader_writer '{reader}' {reason}")


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
    if "dataset" in meta:  # the listed cases only, as nnU-Net reads them
        return RawDataset(root, meta, _listed_cases(root, meta["dataset"], ending, n),
                          find_cases(root / "imagesTs", None, ending, n))
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


def _listed_cases(root: Path, listed: Any, ending: str, num_channels: int) -> list[RawCase]:
    """nnU-Net's "dataset" entry ({case: {"images": [...], "label": ...}}, paths relative to the dataset folder,
    $VARIABLES expanded) is read when it names the imagesTr/labelsTr layout; files elsewhere are refused."""
    where = root / "dataset.json"
    if not isinstance(listed, dict):
        raise DatasetError(f"{where}: 'dataset' must map case names to {{\"images\": [...], \"label\": ...}}")

    def resolved(value: Any) -> Path:
        path = Path(os.path.expandvars(str(value)))
        return (path if path.is_absolute() else root / path).resolve()

    cases = []
    for case, entry in sorted(listed.items()):
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or len(images) != num_channels or "label" not in entry:
            raise DatasetError(f"{where}: 'dataset' entry of case {case} needs \"images\" (one file per channel, "
                               f"{num_channels}) and \"label\"")
        expected = [root / "imagesTr" / f"{case}_{c:04d}{ending}" for c in range(num_channels)]
        for given, wanted in zip([*images, entry["label"]], [*expected, root / "labelsTr" / f"{case}{ending}"]):
            if resolved(given) != wanted.resolve():
                raise DatasetError(
                    f"{where}: 'dataset' lists {given} for case {case}; voxseg reads training cases from the "
                    f"layout imagesTr/{case}_0000{ending} ... and labelsTr/{case}{ending} only: move or link the "
                    f"files there ({wanted.relative_to(root)} for this one), then the 'dataset' entry may stay")
        cases.append(RawCase(str(case), expected, root / "labelsTr" / f"{case}{ending}"))
    return cases
