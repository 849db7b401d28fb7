"""Predicted label maps as RT Structure Sets (`voxseg predict --output-format rtstruct`), for radiotherapy systems
that read contours rather than DICOM-SEG.

One RTSTRUCT per case, referencing the source series (channel 0) image by image, with one ROI per foreground
label (per region for a region-based model) named as in dataset.json. Contours are the 0.5 iso-lines of each
mask slice (marching squares, contourpy), closed and planar, in patient coordinates: every voxel centre lies
clearly inside or outside them, so filling them with the even-odd rule (`voxseg.data.dicom_rtstruct`, as
`voxseg convert dicom` does) gives the label map back voxel for voxel. Written atomically.

    >>> write_rtstruct(Path("out/P001_20260101.dcm"), labels, geometry, series, plan)
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voxseg.atomicio import atomic_path
from voxseg.errors import InputError
from voxseg.infer.dicom_seg import segment_masks, source_frames

if TYPE_CHECKING:
    from voxseg.data.dicom import DicomFrame, DicomSeries
    from voxseg.data.io import Geometry
    from voxseg.plans import Plan

__all__ = ["mask_contours", "write_rtstruct"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence items conventionally name
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID")
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D bool mask as (N, 2) (row, column) polygons in voxel units, first point not
    repeated; a contour inside another is a hole."""
    import contourpy

    padded = np.pad(mask.astype(np.float64), 1)  # contours at the image border close outside it
    lines = contourpy.contour_generator(z=padded, line_type="Separate").lines(0.5)
    return [np.c_[line[:-1, 1] - 1, line[:-1, 0] - 1] for line in lines if len(line) > 3]


def _dataset(tag_source: Any, series: DicomSeries, plan: Plan) -> Any:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTSTRUCT_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword in _COPIED:
        setattr(ds, keyword, getattr(tag_source, keyword, ""))
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "RTSTRUCT", generate_uid(), 9901, 1
    ds.SeriesDescription = f"voxseg {plan.dataset_name}"[:64]
    ds.Manufacturer, ds.ManufacturerModelName = "voxseg", (plan.dataset_name or "voxseg model")[:64]
    ds.StructureSetLabel = "voxseg"
    ds.StructureSetDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.OperatorsName = ""
    return ds


def _image_reference(dataset: Any, frame: DicomFrame) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    if frame.index is not None:
        item.ReferencedFrameNumber = frame.index + 1
    return item


def _references(ds: Any, series: DicomSeries, sources: list[Any], frames: list[DicomFrame]) -> list[Any]:
    """Fill the frame of reference / study / series / image references; returns the image reference per frame."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    by_path = {Path(source.filename): source for source in sources}
    images = [_image_reference(by_path[frame.path] if len(sources) > 1 else sources[0], frame) for frame in frames]
    series_ref, study_ref, frame_ref = Dataset(), Dataset(), Dataset()
    series_ref.SeriesInstanceUID, series_ref.ContourImageSequence = series.uid, Sequence(images)
    study_ref.ReferencedSOPClassUID, study_ref.ReferencedSOPInstanceUID = _STUDY_COMPONENT_CLASS, series.study_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref.FrameOfReferenceUID = series.frame_of_reference_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    return images


def _roi(ds: Any, number: int, name: str, mask: np.ndarray, geometry: Geometry, images: list[Any]) -> None:
    """Append ROI `number`: its declaration, its contours slice by slice, its observation."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    declared, contours, observation = Dataset(), Dataset(), Dataset()
    declared.ROINumber, declared.ROIName = number, name[:64]
    declared.ReferencedFrameOfReferenceUID, declared.ROIGenerationAlgorithm = ds.FrameOfReferenceUID, "AUTOMATIC"
    items = []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        for polygon in mask_contours(mask[k]):
            index = np.c_[np.full(len(polygon), k), polygon, np.ones(len(polygon))]  # (N, 4): slice, row, col, 1
            world = (geometry.affine @ index.T).T[:, :3]
            item = Dataset()
            item.ContourImageSequence = Sequence([images[k]])
            item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(world)
            item.ContourData = [f"{v:.4f}" for v in world.ravel()]
            items.append(item)
    contours.ReferencedROINumber = number
    contours.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
    contours.ContourSequence = Sequence(items)
    observation.ObservationNumber, observation.ReferencedROINumber = number, number
    observation.RTROIInterpretedType, observation.ROIInterpreter = "", ""
    ds.StructureSetROISequence.append(declared)
    ds.ROIContourSequence.append(contours)
    ds.RTROIObservationsSequence.append(observation)


def write_rtstruct(path: Path, labels: np.ndarray, geometry: Geometry, series: DicomSeries, plan: Plan) -> Path:
    """Write the RT Structure Set of a case's (D, H, W) label map, on the grid of `series`, to `path` (atomically)."""
    from pydicom.sequence import Sequence

    sources, frames = source_frames(series, labels, geometry)
    segments = segment_masks(labels, plan)
    if not segments:
        raise InputError(f"the model's labels ({plan.labels}) have no foreground label to write as an ROI")
    ds = _dataset(sources[0], series, plan)
    images = _references(ds, series, sources, frames)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = Sequence(), Sequence(), Sequence()
    for number, (name, mask) in enumerate(segments, start=1):
        _roi(ds, number, name, mask, geometry, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)
    return path
