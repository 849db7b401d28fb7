"""Predicted label maps as DICOM Segmentation objects (`voxseg predict --output-format dicom-seg`).

One SEG instance per case, written with highdicom: it references the source series (channel 0 of the case) by
its study, series, SOP instance and Frame of Reference UIDs, and has one BINARY segment per foreground label (a
region-based model: one per region; regions may overlap) named as in dataset.json, with a coded category and type
where the name is a SNOMED CT concept highdicom knows (e.g. liver, kidney, tumor), else "Tissue". Its frames lie
exactly on the source slices (the same positions, orientation and pixel spacing); frames without any voxel of
their segment are left out. Written atomically.

    >>> write_dicom_seg(Path("out/P001_20260101.dcm"), labels, geometry, series, plan)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxseg.atomicio import atomic_path
from voxseg.errors import InputError

if TYPE_CHECKING:
    from voxseg.data.dicom import DicomSeries
    from voxseg.data.io import Geometry
    from voxseg.plans import Plan

__all__ = ["segment_masks", "source_frames", "write_dicom_seg"]

_LESION_WORDS = {"tumor", "tumour", "lesion", "edema", "oedema", "necrosis", "enhancing", "metastasis", "nodule",
                 "cyst", "core", "whole"}


def segment_masks(labels: np.ndarray, plan: Plan) -> list[tuple[str, np.ndarray]]:
    """(segment name, (D, H, W) bool mask) per foreground label of `plan`, in label order; for a region-based
    plan one per region (the voxels whose label value belongs to it)."""
    segments = []
    for name, value in plan.labels.items():
        values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
        if values == [0] or name == "ignore":
            continue
        segments.append((name, np.isin(labels, values)))
    return segments


def _segment_codes(name: str) -> tuple[Any, Any]:
    """(category, type) codes of a segment name."""
    from pydicom.sr.codedict import codes

    words = re.findall(r"[a-z]+", name.lower())
    try:
        known = getattr(codes.SCT, "".join(word.title() for word in words)) if words else None
    except AttributeError:
        known = None
    if _LESION_WORDS.intersection(words):
        return codes.SCT.MorphologicallyAbnormalStructure, known or codes.SCT.MorphologicallyAbnormalStructure
    if known is not None:
        return codes.SCT.AnatomicalStructure, known
    return codes.SCT.Tissue, codes.SCT.Tissue


def _descriptions(names: list[str]) -> list[Any]:
    from voxseg.data.dicom import highdicom_module

    hd = highdicom_module()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="voxseg", version=_version(),
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for number, name in enumerate(names, start=1):
        category, kind = _segment_codes(name)
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    return out


def source_frames(series: DicomSeries, labels: np.ndarray, geometry: Geometry) -> tuple[list[Any], list[Any]]:
    """The source datasets (headers) and the series' frames in array order, after checking that `labels` lies on
    the series' grid."""
    from voxseg.data.dicom import pydicom_module
    from voxseg.data.dicom_volume import series_geometry

    frames, source_geometry = series_geometry(series)
    if labels.shape != (len(frames), *frames[0].size) or not source_geometry.allclose(geometry, atol=1e-3):
        raise InputError(f"the segmentation ({labels.shape}) does not lie on the grid of {series.label} "
                         f"({(len(frames), *frames[0].size)}); a DICOM-SEG is written on its source series' grid")
    pydicom = pydicom_module()
    headers = {path: pydicom.dcmread(str(path), stop_before_pixels=True) for path in series.files}
    if all(frame.index is None for frame in frames):
        return [headers[frame.path] for frame in frames], frames
    if len(headers) != 1:
        raise InputError(f"{series.label}: a series of several multi-frame files cannot be referenced by one "
                         "DICOM-SEG here; write NIfTI (--output-format nifti)")
    return list(headers.values()), frames


def write_dicom_seg(path: Path, labels: np.ndarray, geometry: Geometry, series: DicomSeries, plan: Plan) -> Path:
    """Write the DICOM-SEG of a case's (D, H, W) label map, on the grid of `series`, to `path` (atomically)."""
    from voxseg.data.dicom import highdicom_module

    hd = highdicom_module()
    from pydicom.uid import generate_uid

    sources, frames = source_frames(series, labels, geometry)
    segments = segment_masks(labels, plan)
    if not segments:
        raise InputError(f"the model's labels ({plan.labels}) have no foreground label to write as a segment")
    masks = np.stack([mask for _, mask in segments], axis=-1).astype(np.uint8)  # (D, H, W, S)
    if frames[0].index is not None:  # one multi-frame source: its frames in their stored order
        stored = np.zeros_like(masks)
        for k, frame in enumerate(frames):
            stored[frame.index] = masks[k]
        masks = stored
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions([name for name, _ in segments]), series_instance_uid=generate_uid(),
        series_number=9900, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="voxseg",
        manufacturer_model_name=plan.dataset_name or "voxseg model", software_versions=_version(),
        device_serial_number="0", series_description=f"voxseg {plan.dataset_name}"[:64], omit_empty_frames=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voxseg")
    except PackageNotFoundError:
        return "unknown"
