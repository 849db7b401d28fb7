"""Synthetic DICOM series for the tests: CT and MR slices (or one Enhanced CT multi-frame file) written from a
small volume, with realistic tags, in a chosen slice and file order, oblique, tilted, with a slice missing or a
position twice.

    >>> info = write_series(tmp / "ct", hounsfield_volume(), modality="CT", order="shuffled")
    >>> info.geometry       # the Geometry the volume has (array axis 0 ascending along the slice normal)
    >>> info.values         # the real values (HU for CT) the reader must return, (D, H, W) float32
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from voxseg.data.io import Geometry

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class SeriesInfo:
    uid: str
    study_uid: str
    files: list[Path]
    geometry: Geometry
    values: np.ndarray  # (D, H, W) float32, slice 0 first along the normal
    frame_of_reference_uid: str = ""
    extra: dict = field(default_factory=dict)


def hounsfield_volume(shape=(12, 24, 20), seed=0) -> np.ndarray:
    """A CT-like int16 volume in HU: air around a water-like body with a bright sphere."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid ** 2).sum(0) < 0.8
    sphere = ((grid - 0.2) ** 2).sum(0) < 0.15
    volume = np.where(body, 40, -1000) + np.where(sphere, 300, 0) + rng.integers(-20, 20, size=shape)
    return volume.astype(np.int16)


def oblique_orientation(angle: float = 0.4) -> tuple[float, ...]:
    """Row and column directions rotated about two axes (a double-oblique acquisition)."""
    rot_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
    rotation = rot_x @ rot_z
    return tuple(float(v) for v in (*rotation[:, 0], *rotation[:, 1]))


def _base_dataset(path: Path, sop_class: str, modality: str, study: dict, series_uid: str,
                  transfer_syntax: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID = study.get("patient_name", "Synthetic^Patient"), study.get("patient_id", "SYN001")
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study["study_uid"], series_uid
    ds.StudyDate = ds.SeriesDate = study.get("study_date", "20260101")
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
    ds.Manufacturer = "Synthetic"
    ds.FrameOfReferenceUID = study["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.ContentDate, ds.ContentTime = ds.StudyDate, "120000"
    return ds


def new_study(patient_id: str = "SYN001") -> dict:
    return {"study_uid": generate_uid(), "frame_of_reference_uid": generate_uid(), "patient_id": patient_id}


def write_series(folder: Path, stored: np.ndarray, modality: str = "CT", spacing=(2.5, 0.8, 0.9),
                 orientation=AXIAL, origin=(-10.0, 20.0, 30.0), description: str = "", study: dict | None = None,
                 order: str = "forward", slope: float = 1.0, intercept: float = 0.0, tilt_degrees: float = 0.0,
                 drop: int | None = None, duplicate: int | None = None, names: str = "uid",
                 transfer_syntax: str = ExplicitVRLittleEndian) -> SeriesInfo:
    """One single-frame file per slice of `stored` (D, H, W), slice k at origin + k * spacing[0] along the normal.

    Args:
        order: file and InstanceNumber order: forward, reverse or shuffled (both scrambled independently).
        tilt_degrees: shift each slice along the column direction (a gantry tilt).
        drop / duplicate: leave slice k out / write slice k twice (a second file at the same position).
        names: uid (files named by SOP instance UID, no ending) or index (IM0001.dcm ...).
    """
    study = study or new_study()
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    shift = np.tan(np.radians(tilt_degrees)) * spacing[0]
    positions = [np.asarray(origin) + k * spacing[0] * normal + k * shift * column for k in range(stored.shape[0])]
    slices = [k for k in range(stored.shape[0]) if k != drop] + ([duplicate] if duplicate is not None else [])
    rng = np.random.default_rng(len(slices))
    instance_numbers = {"forward": slices, "reverse": slices[::-1],
                        "shuffled": list(rng.permutation(slices))}[order]
    files = []
    for number, k in enumerate(instance_numbers, start=1):
        sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
        name = f"IM{number:04d}.dcm" if names == "index" else None
        ds = _base_dataset(folder / "tmp", sop_class, modality, study, series_uid, transfer_syntax)
        path = folder / (name or ds.SOPInstanceUID)
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description or f"{modality} series", 1, number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.SliceLocation = f"{positions[k] @ normal:.6f}"
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
            ds.KVP, ds.GantryDetectorTilt = "120", f"{tilt_degrees:g}"
        else:
            ds.MagneticFieldStrength, ds.EchoTime, ds.RepetitionTime = "3", "10", "500"
            if slope != 1.0 or intercept != 0.0:
                ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(stored[k].astype(np.int16)).tobytes()
        _save(ds, path)
        files.append(path)
    rng.shuffle(files)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = normal * spacing[0], column * spacing[1], row * spacing[2]
    affine[:3, 3] = origin
    values = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return SeriesInfo(series_uid, study["study_uid"], files, Geometry(affine), values, study["frame_of_reference_uid"])


def _save(ds: FileDataset, path: Path) -> None:
    try:
        ds.save_as(str(path), enforce_file_format=True)
    except TypeError:  # pydicom 2
        ds.save_as(str(path), write_like_original=False)


def write_enhanced_ct(path: Path, stored: np.ndarray, spacing=(2.0, 0.7, 0.7), orientation=AXIAL,
                      origin=(5.0, -3.0, 11.0), slope: float = 1.0, intercept: float = -1024.0,
                      study: dict | None = None, reverse_frames: bool = True) -> SeriesInfo:
    """One Enhanced CT multi-frame file; frames stored in reverse spatial order by default."""
    study = study or new_study()
    path.parent.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    ds = _base_dataset(path, ENHANCED_CT, "CT", study, series_uid, ExplicitVRLittleEndian)
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "Enhanced CT", 2, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = stored.shape[1], stored.shape[2], stored.shape[0]
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    order = list(range(stored.shape[0]))[::-1] if reverse_frames else list(range(stored.shape[0]))
    shared = Dataset()
    measures, plane_orientation, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing[1], spacing[2]], spacing[0]
    plane_orientation.ImageOrientationPatient = list(orientation)
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane_orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[0] * normal]
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.ascontiguousarray(stored[order].astype(np.int16)).tobytes()
    _save(ds, path)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = normal * spacing[0], column * spacing[1], row * spacing[2]
    affine[:3, 3] = origin
    values = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return SeriesInfo(series_uid, study["study_uid"], [path], Geometry(affine), values,
                      study["frame_of_reference_uid"])


def sitk_series(folder: Path, series_uid: str) -> tuple[np.ndarray, Geometry]:
    """The series as SimpleITK's ImageSeriesReader reads it, in voxseg's (D, H, W) + Geometry convention."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    image = reader.Execute()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = (direction * np.asarray(image.GetSpacing())[None, :])[:, ::-1]
    affine[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image), Geometry(affine)


RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def write_rtstruct(path: Path, info: SeriesInfo, rois: dict[str, list[tuple[int, list[tuple[float, float]]]]],
                   study: dict | None = None) -> Path:
    """An RT Structure Set on the series `info`: per ROI name, closed contours (slice k, [(row, column), ...] in
    voxel units), written in patient coordinates through the series' geometry."""
    study = study or {"study_uid": info.study_uid, "frame_of_reference_uid": info.frame_of_reference_uid}
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(path, RTSTRUCT, "RTSTRUCT", study, generate_uid(), ExplicitVRLittleEndian)
    for name in ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation"):
        delattr(ds, name)
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "synthetic", "20260101", "120000"
    series, study_ref, frame = Dataset(), Dataset(), Dataset()
    series.SeriesInstanceUID = info.uid
    study_ref.ReferencedSOPClassUID, study_ref.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", info.study_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series])
    frame.FrameOfReferenceUID = info.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    roi_items, contour_items = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ROIGenerationAlgorithm = number, name, "MANUAL"
        roi.ReferencedFrameOfReferenceUID = info.frame_of_reference_uid
        roi_items.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [255, 0, 0]
        polygons = []
        for k, points in contours:
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            world = [info.geometry.affine @ np.array([k, r, c, 1.0]) for r, c in points]
            contour.ContourData = [f"{v:.6f}" for point in world for v in point[:3]]
            polygons.append(contour)
        item.ContourSequence = Sequence(polygons)
        contour_items.append(item)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    _save(ds, path)
    return path
