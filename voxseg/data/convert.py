"""Convert BraTS and Medical Segmentation Decathlon (MSD) folders to the nnU-Net v2 raw layout.

BraTS 2021: `SRC/BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`, labels 1 necrosis /
non-enhancing core, 2 edema, 4 enhancing. They become channels 0000..0003 (T1, T1ce, T2, FLAIR) and labels
1 edema, 2 necrosis, 3 enhancing, declared as the three BraTS evaluation regions (whole tumour, tumour core,
enhancing tumour). BraTS 2023 names (t1n, t1c, t2w, t2f; enhancing = 3) are accepted as well.

MSD: `SRC/dataset.json` (modality, labels, training, test) with 4D NIfTI images; each image is split into
one 3D file per channel with the 3D part of its affine and header kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.atomicio import atomic_path
from voxseg.data.io import NIFTI_ENDINGS
from voxseg.errors import DatasetError
from voxseg.jsonio import read_json, write_json_atomic

BRATS_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
BRATS_REGION_LABELS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
BRATS_REGIONS_CLASS_ORDER = [1, 2, 3]
# modality -> accepted file suffixes (BraTS 2021 first, then BraTS 2023), in channel order
BRATS_MODALITY_NAMES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f"),
                        "seg": ("seg",)}
# BraTS label value -> ours: 1 necrosis -> 2, 2 edema -> 1, 4 (2021) / 3 (2023) enhancing -> 3
_BRATS_TO_OURS = {0: 0, 1: 2, 2: 1, 3: 3, 4: 3}


# ----- placing and writing files atomically ----------------------------------------------------------------------

def _place_file(src: Path, dst: Path, link: bool) -> str:
    """Put `src` at `dst`: hard link, else symlink, else copy (always when link=False). Returns what was done."""
    if link and dst.exists() and os.path.samefile(src, dst):
        # already linked by an earlier run; renaming a link onto another link of the same file would be a no-op
        return "symlink" if dst.is_symlink() else "hardlink"
    with atomic_path(dst) as tmp:
        how = "copy"
        if link:
            try:
                os.link(src, tmp)
                how = "hardlink"
            except OSError:  # other file system, or links not allowed
                try:
                    os.symlink(src.resolve(), tmp)
                    how = "symlink"
                except OSError:
                    pass
        if how == "copy":
            shutil.copy2(src, tmp)
    return how


def _save_nifti(image: Any, path: Path) -> None:
    import nibabel as nib

    with atomic_path(path) as tmp:  # keeps the .nii.gz ending, so nibabel compresses it
        nib.save(image, str(tmp))


def _nifti_ending(name: str) -> str | None:
    lowered = name.lower()
    return next((e for e in NIFTI_ENDINGS if lowered.endswith(e)), None)


# ----- BraTS -------------------------------------------------------------------------------------------------

def _find_modality(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The file of one modality in a BraTS case folder: `<folder>_<name>.nii.gz` or any `*_<name>.nii(.gz)`."""
    # skip hidden files (macOS '._' copies of every image are common in downloaded archives)
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _nifti_ending(p.name)]
    for name in names:
        for path in files:
            stem = path.name[: -len(_nifti_ending(path.name) or "")]
            if stem.lower().endswith(f"_{name}") or stem.lower().endswith(f"-{name}"):
                return path
    return None


def _scan_brats(src: Path) -> list[tuple[str, dict[str, Path | None]]]:
    """Case folders and their modality files; raises DatasetError for a non-BraTS folder or missing files."""
    if not src.is_dir():
        raise DatasetError(f"{src}: BraTS folder not found")
    cases = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {modality: _find_modality(folder, names) for modality, names in BRATS_MODALITY_NAMES.items()}
        if any(files.values()):
            cases.append((folder.name, files))
    if not cases:
        raise DatasetError(
            f"{src}: not a BraTS folder: expected one sub-folder per case like BraTS2021_00000/ holding "
            "BraTS2021_00000_t1.nii.gz, _t1ce, _t2, _flair (and _seg for training cases)"
        )
    missing = [f"{name} (no {', '.join(m for m in BRATS_MODALITY_NAMES if m != 'seg' and files[m] is None)})"
               for name, files in cases if any(files[m] is None for m in BRATS_MODALITY_NAMES if m != "seg")]
    if missing:
        shown = "; ".join(missing[:10]) + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DatasetError(f"{src}: case folder(s) missing modality files: {shown}. "
                           "Every case needs t1, t1ce, t2 and flair files; add them or remove those folders")
    return cases


def _convert_brats_seg(src: Path, dst: Path) -> None:
    """Rewrite a BraTS seg with our label values, keeping its header and affine."""
    import nibabel as nib

    try:
        image = nib.load(str(src))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad file for the user
        raise DatasetError(f"{src}: cannot be read ({type(exc).__name__}: {exc}); re-download or re-copy it") from None
    rounded = np.rint(data)
    values = np.unique(rounded)
    unexpected = [v for v in values.tolist() if v not in _BRATS_TO_OURS]
    if unexpected or not np.array_equal(rounded, data):
        raise DatasetError(f"{src}: unexpected label values {unexpected or 'non-integer'}; BraTS segmentations hold "
                           "0, 1 (necrosis), 2 (edema) and 4 (enhancing) only")
    lookup = np.zeros(5, dtype=np.uint8)
    for brats_value, ours in _BRATS_TO_OURS.items():
        lookup[brats_value] = ours
    mapped = lookup[rounded.astype(np.intp)]
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    out = nib.Nifti1Image(mapped, image.affine, header)
    _save_nifti(out, dst)


def convert_brats(src: str | Path, dst: str | Path, link: bool = True) -> Path:
    """Convert a BraTS 2021 (or 2023) folder to an nnU-Net v2 raw dataset with the BraTS regions.

    Args:
        src: folder holding one sub-folder per case.
        dst: output dataset folder (created; existing files are replaced).
        link: hard-link (else symlink, else copy) the images instead of copying them.

    Returns:
        `dst`. Cases without a seg file (validation/test cases) go to imagesTs/.
    """
    src, dst = Path(src), Path(dst)
    cases = _scan_brats(src)
    dst.mkdir(parents=True, exist_ok=True)
    first_image = cases[0][1]["t1"]
    ending = _nifti_ending(first_image.name) if first_image else ".nii.gz"
    num_training = 0
    for name, files in cases:
        has_seg = files["seg"] is not None
        images_dir = dst / ("imagesTr" if has_seg else "imagesTs")
        for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            path = files[modality]
            target = images_dir / f"{name}_{channel:04d}{ending}"
            if _nifti_ending(path.name) == ending:
                _place_file(path, target, link)
            else:  # .nii among .nii.gz (or the reverse): re-save so the dataset has one file ending
                import nibabel as nib

                _save_nifti(nib.load(str(path)), target)
        if has_seg:
            _convert_brats_seg(files["seg"], dst / "labelsTr" / f"{name}{ending}")
            num_training += 1
    write_json_atomic(dst / "dataset.json", {
        "name": dst.name,
        "description": f"converted from the BraTS folder {src.name} by voxseg",
        "channel_names": dict(BRATS_CHANNELS),
        "labels": dict(BRATS_REGION_LABELS),
        "regions_class_order": list(BRATS_REGIONS_CLASS_ORDER),
        "numTraining": num_training,
        "file_ending": ending,
    })
    return dst


# ----- Medical Segmentation Decathlon ------------------------------------------------------------------------

def _read_msd_json(src: Path) -> dict[str, Any]:
    path = src / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: missing; a Decathlon task folder has dataset.json next to imagesTr/ and labelsTr/")
    meta = read_json(path, DatasetError)
    missing = [k for k in ("modality", "labels", "training") if k not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}; is this a Medical Segmentation Decathlon "
                           "dataset.json? (nnU-Net v2 folders need no conversion)")
    return meta


def _msd_labels(meta: dict[str, Any], path: Path) -> dict[str, int]:
    """MSD {"0": "background", "1": "edema"} -> {"background": 0, "edema": 1}."""
    labels: dict[str, int] = {}
    for value, name in sorted(meta["labels"].items(), key=lambda item: int(item[0])):
        name = "background" if int(value) == 0 else str(name)
        if name in labels:
            raise DatasetError(f"{path}: label name '{name}' is used twice; give every label value its own name")
        labels[name] = int(value)
    if labels.get("background") != 0:
        raise DatasetError(f"{path}: labels have no value 0 (background)")
    return labels


def _case_name(relative: str) -> str:
    name = Path(relative).name
    ending = _nifti_ending(name)
    if ending is None:
        raise DatasetError(f"'{relative}': Decathlon images must be NIfTI (.nii.gz)")
    return name[: -len(ending)]


def _copy_as_nii_gz(src: Path, dst: Path) -> None:
    if _nifti_ending(src.name) == ".nii.gz":
        _place_file(src, dst, link=False)
    else:  # an uncompressed .nii: re-save so every file has the dataset's ending
        import nibabel as nib

        _save_nifti(nib.load(str(src)), dst)


def _split_channels(src: Path, out_dir: Path, name: str, num_channels: int) -> None:
    """Write one 3D NIfTI per channel of a 4D (or 3D single-channel) MSD image, same affine and header."""
    import nibabel as nib

    if not src.is_file():
        raise DatasetError(f"{src}: listed in dataset.json but not found")
    image = nib.load(str(src))
    shape = image.shape
    channels = 1 if len(shape) == 3 else shape[3]
    if len(shape) not in (3, 4) or channels != num_channels:
        raise DatasetError(f"{src}: image shape {shape} does not hold the {num_channels} channel(s) dataset.json "
                           "lists under 'modality'")
    if len(shape) == 3:
        _copy_as_nii_gz(src, out_dir / f"{name}_0000.nii.gz")
        return
    sform, sform_code = image.get_sform(coded=True)
    qform, qform_code = image.get_qform(coded=True)
    for channel in range(channels):
        data = np.asanyarray(image.dataobj[..., channel])  # (X, Y, Z); raw dtype when the file is unscaled
        header = image.header.copy()
        header.set_data_dtype(data.dtype)
        part = nib.Nifti1Image(data, image.affine, header)
        if sform is not None:
            part.set_sform(sform, code=int(sform_code))
        if qform is not None:
            part.set_qform(qform, code=int(qform_code))
        _save_nifti(part, out_dir / f"{name}_{channel:04d}.nii.gz")


def _entry_path(src: Path, entry: Any, key: str) -> str:
    if isinstance(entry, dict):
        if key not in entry:
            raise DatasetError(f"{src / 'dataset.json'}: entry {entry} has no '{key}'")
        return str(entry[key])
    return str(entry)


def convert_msd(src: str | Path, dst: str | Path) -> Path:
    """Convert a Medical Segmentation Decathlon task folder to an nnU-Net v2 raw dataset; returns `dst`."""
    src, dst = Path(src), Path(dst)
    meta = _read_msd_json(src)
    dst.mkdir(parents=True, exist_ok=True)
    labels = _msd_labels(meta, src / "dataset.json")
    channel_names = {str(k): str(v) for k, v in sorted(meta["modality"].items(), key=lambda item: int(item[0]))}
    num_channels = len(channel_names)
    for entry in meta["training"]:
        image_rel, label_rel = _entry_path(src, entry, "image"), _entry_path(src, entry, "label")
        name = _case_name(image_rel)
        _split_channels(src / image_rel, dst / "imagesTr", name, num_channels)
        label_src = src / label_rel
        if not label_src.is_file():
            raise DatasetError(f"{label_src}: listed in dataset.json but not found")
        _copy_as_nii_gz(label_src, dst / "labelsTr" / f"{name}.nii.gz")
    for entry in meta.get("test", []):
        image_rel = _entry_path(src, entry, "image")
        _split_channels(src / image_rel, dst / "imagesTs", _case_name(image_rel), num_channels)
    out_meta: dict[str, Any] = {
        "name": str(meta.get("name", src.name)),
        "description": str(meta.get("description", f"converted from the Decathlon task {src.name} by voxseg")),
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": len(meta["training"]),
        "file_ending": ".nii.gz",
    }
    for key in ("reference", "licence", "release"):
        if key in meta:
            out_meta[key] = meta[key]
    write_json_atomic(dst / "dataset.json", out_meta)
    return dst
