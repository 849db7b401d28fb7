"""Finding the cases to predict: an nnU-Net images folder, a BraTS folder, or the channel files of one case.

    >>> find_input_cases("imagesTs", num_channels=4, file_ending=".nii.gz")
    [("CASE", [Path("imagesTs/CASE_0000.nii.gz"), ..., Path("imagesTs/CASE_0003.nii.gz")]), ...]

`voxseg.infer.predictor` re-exports `find_input_cases`.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from voxseg.errors import InputError

if TYPE_CHECKING:
    from voxseg.data.io import Geometry
    from voxseg.plans import Plan

__all__ = ["BRATS_MODALITIES", "check_output_not_input", "checked_geometry", "checked_image", "find_input_cases",
           "read_input_case"]

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
    return [_one_case(items, num_channels)]


def _channel_of(path: Path) -> tuple[str, int | None]:
    """(case name, channel index) from a channel file's name: CASE_0001.nii.gz -> ("CASE", 1), BraTS names
    CASE_t1ce.nii.gz / CASE-t1c.nii.gz -> ("CASE", 1); (stem, None) when the name carries no channel."""
    from voxseg.data.convert import BRATS_MODALITY_NAMES
    from voxseg.data.io import file_ending

    stem = path.name[: -len(file_ending(path))] if file_ending(path) else path.stem
    match = re.match(r"^(?P<case>.+)_(?P<channel>\d{4})$", stem)
    if match:
        return match.group("case"), int(match.group("channel"))
    for index, modality in enumerate(BRATS_MODALITIES):
        for name in BRATS_MODALITY_NAMES[modality]:
            found = re.match(rf"^(?P<case>.+)[_-]{name}$", stem, re.I)
            if found:
                return found.group("case"), index
    return stem, None


def _one_case(files: list[Path], num_channels: int) -> tuple[str, list[Path]]:
    """The channel files of one case given by name, put in channel order by their suffixes (_0000, _0001, ... or
    the BraTS modality names), never by the order they were typed in; InputError for files of several cases, a
    channel given twice, a channel skipped, or (with several files) a file whose name says no channel. Only the
    files given are used: a missing channel is never taken from their folder."""
    if len(files) == 1:
        return _channel_of(files[0])[0], files
    parsed = [(path, *_channel_of(path)) for path in files]
    unnamed = [str(path) for path, _, channel in parsed if channel is None]
    if unnamed:
        raise InputError(f"cannot tell which channel {', '.join(unnamed)} is: name the channel files of a case "
                         "CASE_0000.nii.gz, CASE_0001.nii.gz, ... (or CASE_t1, _t1ce, _t2, _flair), or give their "
                         "folder")
    cases = sorted({case for _, case, _ in parsed})
    if len(cases) > 1:
        listed = "; ".join(f"{case}: {', '.join(p.name for p, c, _ in parsed if c == case)}" for case in cases)
        raise InputError(f"the input files belong to {len(cases)} cases ({listed}); give the channel files of one "
                         "case, or a folder of cases")
    by_channel: dict[int, Path] = {}
    for path, _, channel in parsed:
        if channel in by_channel:
            raise InputError(f"channel {channel} of case '{cases[0]}' is given twice ({by_channel[channel]}, {path}); "
                             "give each channel file once")
        by_channel[int(channel)] = path
    gaps = [c for c in range(max(by_channel) + 1) if c not in by_channel]
    if gaps:
        raise InputError(f"case '{cases[0]}': channel(s) {', '.join(map(str, gaps))} not given (given: "
                         f"{', '.join(by_channel[c].name for c in sorted(by_channel))}); give the channel files "
                         f"_0000 to _{max(num_channels, max(by_channel) + 1) - 1:04d}")
    return cases[0], [by_channel[c] for c in sorted(by_channel)]  # too few or too many: told against the model


def _ending(path: Path) -> str:
    from voxseg.data.io import file_ending

    return file_ending(path) or path.suffix


def _cases_in_folder(folder: Path, num_channels: int, ending: str) -> list[tuple[str, list[Path]]]:
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    channels: dict[str, set[int]] = {}
    other_endings = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            channels.setdefault(match.group("case"), set()).add(int(match.group("channel")))
        elif path.is_file() and not path.name.startswith(".") and _ending(path) != ending and \
                _channel_of(path)[1] is not None:
            other_endings.append(path.name)
    if other_endings:  # e.g. CASE_0000.nii next to CASE_0000.nii.gz: say what is not read
        shown = ", ".join(sorted(other_endings)[:5]) + (" ..." if len(other_endings) > 5 else "")
        warnings.warn(f"{folder}: {len(other_endings)} channel file(s) with another ending than the model's "
                      f"{ending} are not read: {shown}; convert them to {ending} (or predict with a model whose "
                      "dataset has that file_ending)", stacklevel=3)
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


def checked_geometry(geometry: Geometry | Sequence[float], name: str) -> Geometry:
    """A Geometry, or one built from 3 spacings; InputError for spacings that are not 3 finite positive numbers."""
    from voxseg.data.io import Geometry

    if isinstance(geometry, Geometry):
        spacing = tuple(geometry.spacing)
    else:
        try:
            spacing = tuple(float(s) for s in geometry)
        except (TypeError, ValueError):
            raise InputError(f"case '{name}': geometry {geometry!r} is neither a Geometry nor 3 spacings in "
                             "mm") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"case '{name}': spacing {spacing} must be 3 finite positive numbers (mm, array axis order)")
    return geometry if isinstance(geometry, Geometry) else Geometry.from_spacing(spacing)


def check_output_not_input(cases: Sequence[tuple[str, Sequence[str | Path]]], out_dir: Path) -> None:
    """Refuse an output folder that is a folder the inputs are read from: a later run would read the predictions
    there as images (a CASE.nii.gz next to CASE_0000.nii.gz, or a channel file overwritten)."""
    target = out_dir.resolve()
    paths = [Path(path) for _, files in cases for entry in files  # a DICOM series: its files
             for path in getattr(entry, "files", [entry])]
    shared = sorted({str(path.parent) for path in paths if path.parent.resolve() == target})
    if shared:
        raise InputError(f"predict -o {out_dir} is the folder the input images are read from ({shared[0]}); a later "
                         "run would read the predictions there as images. Write them to another folder")


def checked_image(image: np.ndarray, plan: Plan, name: str) -> np.ndarray:
    """(C, D, H, W) (a (D, H, W) image for a one-channel model gets its channel axis) of real numbers with no
    empty axis, or InputError. (NaN/Inf voxels are refused by preprocessing, for every input path.)"""
    image = np.asarray(image)
    if np.iscomplexobj(image) or image.dtype.kind not in "biuf":
        raise InputError(f"case '{name}': image of dtype {image.dtype} given; give real numbers (an integer or "
                         "floating-point array; a complex image would lose its imaginary part)")
    if 0 in image.shape:
        raise InputError(f"case '{name}': image of shape {image.shape} has an empty axis; give an image with at "
                         "least one voxel along every axis")
    if image.ndim == 3 and plan.num_channels == 1:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != plan.num_channels:
        raise InputError(f"case '{name}': image of shape {image.shape} given; the model expects "
                         f"({plan.num_channels}, D, H, W) with channels {list(plan.channel_names.values())}")
    return image


def read_input_case(name: str, files: Sequence[Any], plan: Plan) -> tuple[np.ndarray, Geometry]:
    """A case of `find_input_cases` (channel files) or of `voxseg.infer.dicom_cases` (DICOM series per channel)
    as (C, D, H, W) float32 and its geometry; InputError when the channels do not match the model or one grid."""
    from voxseg.data.io import read_channels
    from voxseg.infer.dicom_cases import is_dicom_case, read_dicom_case

    expected = plan.num_channels
    if len(files) != expected:
        raise InputError(f"{len(files)} channel file(s) found, the model expects {expected} "
                         f"({', '.join(plan.channel_names.values())})")
    if is_dicom_case(files):
        return read_dicom_case(name, files)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise InputError(f"missing channel file(s) {', '.join(missing)}")
    return read_channels([Path(f) for f in files], case=name, error=InputError)
