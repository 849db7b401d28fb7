"""`voxseg convert dicom SRC DST`: DICOM image series with their DICOM-SEG or RT Structure Set annotations as an
nnU-Net raw dataset.

    >>> convert_dicom("pacs_export", "data/Dataset050_Liver")           # one image series per annotation
    >>> convert_dicom("mr_export", "data/Dataset051_Brain", {0: "T1*", 1: "FLAIR*"})

Each DICOM-SEG or RTSTRUCT under SRC is one training case: its study's name (`voxseg.data.dicom_studies.
case_names`, as `voxseg predict` names it), channel 0 the series it references (or, with channel rules, the
series the rules pick, which must lie on the referenced series' grid), and its segments or ROIs as the labels
(RTSTRUCT contours are filled as `voxseg.data.dicom_rtstruct` says). A segment's label value is the place of its
name (SegmentLabel / ROIName) in the list of names, in the first annotation's number order, then new names in
the order they appear; dataset.json lists them. Overlapping segments cannot be one label map and are refused.
Images are written as NIfTI (int16 where every value is a whole number in range, else float32), labels as
uint8. Studies without an annotation are not converted (the count is returned).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from voxseg.data.dicom import DicomScan, DicomSeries, highdicom_module, scan_dicom
from voxseg.data.dicom_rtstruct import StructureSet, read_structure_set
from voxseg.data.dicom_studies import case_names, studies, study_channels
from voxseg.data.dicom_volume import read_series, series_geometry
from voxseg.data.io import geometry_differences, write_image
from voxseg.errors import DatasetError
from voxseg.jsonio import write_json_atomic

__all__ = ["convert_dicom"]

ENDING = ".nii.gz"


@dataclass
class _Annotation:
    """A DICOM-SEG or an RT Structure Set: the series it lies on, its segment / ROI names in number order, and
    how to get its (D, H, W, S) masks on that series' grid."""

    path: Path
    kind: str
    series_uids: list[str]
    names: list[str]
    masks: Callable[[DicomSeries], np.ndarray]


@dataclass
class _Case:
    name: str
    annotation: _Annotation
    reference: DicomSeries  # the series the annotation lies on
    channels: list[DicomSeries]


def _seg_masks(seg: Any, reference: DicomSeries) -> np.ndarray:
    frames, _ = series_geometry(reference)
    numbers = sorted(int(item.SegmentNumber) for item in seg.SegmentSequence)
    if frames[0].index is None:
        masks = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[f.sop_instance_uid for f in frames], segment_numbers=numbers,
            combine_segments=False, assert_missing_frames_are_empty=True)
    else:  # one multi-frame source: its frames, numbered from 1
        masks = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=frames[0].sop_instance_uid, source_frame_numbers=[f.index + 1 for f in frames],
            segment_numbers=numbers, combine_segments=False, assert_missing_frames_are_empty=True)
    return np.asarray(masks) > 0


def _rt_masks(structure: StructureSet, reference: DicomSeries) -> np.ndarray:
    frames, geometry = series_geometry(reference)
    return structure.masks((len(frames), *frames[0].size), geometry)


def _annotations(scan: DicomScan) -> list[_Annotation]:
    """Every DICOM-SEG and RT Structure Set of the scan, read (headers and contours)."""
    out = []
    if scan.segmentations:
        hd = highdicom_module()
    for path in scan.segmentations:
        try:
            seg = hd.seg.segread(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged SEG names its file
            raise DatasetError(f"{path}: DICOM-SEG cannot be read ({type(exc).__name__}: {exc}); export it "
                               "again") from None
        items = sorted(seg.SegmentSequence, key=lambda item: int(item.SegmentNumber))
        referenced = [str(item.SeriesInstanceUID) for item in getattr(seg, "ReferencedSeriesSequence", [])]
        out.append(_Annotation(path, "DICOM-SEG", referenced, [str(item.SegmentLabel) for item in items],
                               partial(_seg_masks, seg)))
    for path in scan.structure_sets:
        structure = read_structure_set(path)
        out.append(_Annotation(path, "RTSTRUCT", structure.series_uids, structure.names,
                               partial(_rt_masks, structure)))
    return out


def _plan_cases(src: Path, rules: dict[int, str]) -> tuple[list[_Case], int]:
    """The cases to write (validated: references, channels, grids) and the number of studies without an
    annotation."""
    scan = scan_dicom(src)
    by_uid = {series.uid: series for series in scan.series}
    ordered = studies(scan)
    names = dict(zip((study[0].study_uid for study in ordered), case_names(ordered)))
    cases: list[_Case] = []
    for annotation in _annotations(scan):
        path, referenced = annotation.path, annotation.series_uids
        reference = next((by_uid[uid] for uid in referenced if uid in by_uid), None)
        if reference is None:
            raise DatasetError(f"{path}: the {annotation.kind} references series {', '.join(referenced) or '(none)'}, "
                               f"which is not under {src}; copy its image series there too")
        name = names[reference.study_uid]
        if any(case.name == name for case in cases):
            raise DatasetError(f"{path}: study {reference.study_uid} (case '{name}') has a second annotation "
                               "(DICOM-SEG or RTSTRUCT); keep one per study")
        if rules:
            study = next(s for s in ordered if s[0].study_uid == reference.study_uid)
            channels = study_channels(study, rules, {str(k): v for k, v in rules.items()}, name, DatasetError)
        else:
            channels = [reference]
        _check_grids(name, reference, channels)
        cases.append(_Case(name, annotation, reference, channels))
    if not cases:
        raise DatasetError(f"{src}: no DICOM-SEG or RTSTRUCT found; convert dicom needs image series with their "
                           "annotations (predict needs none: voxseg predict -i FOLDER)")
    annotated = {case.reference.study_uid for case in cases}
    return sorted(cases, key=lambda case: case.name), sum(s[0].study_uid not in annotated for s in ordered)


def _check_grids(name: str, reference: DicomSeries, channels: list[DicomSeries]) -> None:
    frames, geometry = series_geometry(reference)
    shape = (len(frames), *frames[0].size)
    for series in channels:
        other_frames, other = series_geometry(series)
        differences = geometry_differences((len(other_frames), *other_frames[0].size), other, shape, geometry)
        if differences:
            raise DatasetError(f"case '{name}': {series.label}: {'; '.join(differences)} (the annotation lies on "
                               f"{reference.label}); every channel must lie on the annotation's grid")


def _label_names(cases: list[_Case]) -> list[str]:
    names: list[str] = []
    for case in cases:
        names += [name for name in case.annotation.names if name not in names]
    if len(names) > 255:
        raise DatasetError(f"{len(names)} different segment names; a uint8 label map holds 255 labels")
    return names


def _label_map(case: _Case, names: list[str]) -> np.ndarray:
    """The annotation's segments / ROIs as one (D, H, W) uint8 label map on the reference series' grid."""
    masks = case.annotation.masks(case.reference)  # (D, H, W, S)
    overlap = masks.sum(axis=-1) > 1
    if overlap.any():
        raise DatasetError(f"{case.annotation.path}: segments overlap in {int(overlap.sum())} voxels; one label map "
                           "cannot hold overlapping segments: export non-overlapping segments (or convert each "
                           "separately)")
    labels = np.zeros(masks.shape[:3], dtype=np.uint8)
    for k, name in enumerate(case.annotation.names):
        labels[masks[..., k]] = names.index(name) + 1
    return labels


def _image_dtype(image: np.ndarray) -> np.ndarray:
    whole = np.array_equal(image, np.round(image)) and image.min() >= -32768 and image.max() <= 32767
    return image.astype(np.int16) if whole else image


def convert_dicom(src: str | Path, dst: str | Path, rules: dict[int, str] | None = None) -> tuple[Path, int]:
    """Convert DICOM series + DICOM-SEG / RTSTRUCT under `src` to the nnU-Net raw layout in `dst`.

    Returns:
        (`dst`, the number of studies without an annotation, not converted).

    Raises:
        DatasetError: an annotation whose series is missing, two annotations in one study, channels off the
            annotation's grid, overlapping segments, contours off the slices; ImageReadError for a series that
            cannot be read (naming it).
    """
    src, dst = Path(src), Path(dst)
    cases, unannotated = _plan_cases(src, dict(rules or {}))  # every check that needs no pixels, before writing
    names = _label_names(cases)
    for case in cases:
        labels = _label_map(case, names)
        for channel, series in enumerate(case.channels):
            image, geometry = read_series(series)
            write_image(dst / "imagesTr" / f"{case.name}_{channel:04d}{ENDING}", _image_dtype(image), geometry)
        write_image(dst / "labelsTr" / f"{case.name}{ENDING}", labels, series_geometry(case.reference)[1])
    first = cases[0].channels
    write_json_atomic(dst / "dataset.json", {
        "name": dst.name,
        "description": f"converted from the DICOM folder {src.name} by voxseg",
        "channel_names": {str(c): ("CT" if s.modality == "CT" else s.description or s.modality or f"channel{c}")
                          for c, s in enumerate(first)},
        "labels": {"background": 0, **{name: value for value, name in enumerate(names, start=1)}},
        "numTraining": len(cases),
        "file_ending": ENDING,
    })
    return dst, unannotated
