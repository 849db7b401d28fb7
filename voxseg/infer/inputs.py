"""Finding the cases to predict: an nnU-Net images folder, a BraTS folder, or the channel files of one case.

    >>> find_input_cases("imagesTs", num_channels=4, file_ending=".nii.gz")
    [("CASE", [Path("imagesTs/CASE_0000.nii.gz"), ..., Path("imagesTs/CASE_0003.nii.gz")]), ...]

`voxseg.infer.predictor` re-exports `find_input_cases`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from voxseg.errors import InputError

__all__ = ["BRATS_MODALITIES", "find_input_cases"]

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")  # channel order of BraTS data (voxseg.data.convert)


def find_input_cases(paths: str | Path | Sequence[str | Path], num_channels: int,
                     file_ending: str = ".nii.gz") -> list[tuple[str, list[Path]]]:
    """Cases to predict: (name, [channel files in channel order]).

    Accepts one folder in nnU-Net layout (CASE_0000{ending}, CASE_0001{ending}, ...), one folder in BraTS layout
    (CASE/CASE_{t1,t1ce,t2,flair}.nii.gz, or the BraTS 2023 names t1n, t1c, t2w, t2f), or the channel files of
    a single case. Cases with missing or extra channel files are listed as found (missing files as the paths
    expected), so `predict_files` reports them by name while predicting the others.
    """
    items = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not items:
        raise InputError("no input given; pass a folder or the channel files of one case")
    if len(items) == 1 and items[0].is_dir():
        return _cases_in_folder(items[0], num_channels, file_ending)
    if any(p.is_dir() for p in items):
        raise InputError(f"input mixes folders and files ({', '.join(map(str, items))}); give one folder, or the "
                         "channel files of one case")
    missing = [str(p) for p in items if not p.is_file()]
    if missing:
        raise InputError(f"input file(s) not found: {', '.join(missing)}")
    return [(_case_name(items[0]), items)]


def _case_name(path: Path) -> str:
    from voxseg.data.io import file_ending

    stem = path.name[: -len(file_ending(path))] if file_ending(path) else path.stem
    for suffix in [f"_{i:04d}" for i in range(10)] + [f"_{m}" for m in BRATS_MODALITIES + ("t1n", "t1c", "t2w", "t2f")]:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _cases_in_folder(folder: Path, num_channels: int, ending: str) -> list[tuple[str, list[Path]]]:
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    channels: dict[str, set[int]] = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            channels.setdefault(match.group("case"), set()).add(int(match.group("channel")))
    if channels:
        # expected channels 0..n-1 plus any extra ones found, so both missing and surplus files get reported
        return [(name, [folder / f"{name}_{c:04d}{ending}" for c in range(max(num_channels, max(found) + 1))])
                for name, found in sorted(channels.items())]
    cases = [(sub.name, _brats_files(sub)) for sub in sorted(folder.iterdir())
             if sub.is_dir() and not sub.name.startswith(".")]
    cases = [(name, files) for name, files in cases if any(f.is_file() for f in files)]
    if not cases:
        raise InputError(f"{folder}: no cases found; expected CASE_0000{ending} files (nnU-Net layout) or BraTS "
                         "case folders (CASE/CASE_t1.nii.gz, _t1ce, _t2, _flair)")
    return cases


def _brats_files(folder: Path) -> list[Path]:
    """The four modality files of a BraTS case folder in channel order; a missing one as its expected path."""
    from voxseg.data.convert import BRATS_MODALITY_NAMES

    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    out = []
    for modality in BRATS_MODALITIES:
        found = None
        for suffix in BRATS_MODALITY_NAMES[modality]:
            found = found or next((p for p in files if re.search(rf"[_-]{suffix}\.nii(\.gz)?$", p.name, re.I)), None)
        out.append(found or folder / f"{folder.name}_{modality}.nii.gz")
    return out
