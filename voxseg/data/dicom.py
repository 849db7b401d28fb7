"""DICOM image series as volumes: scan a folder, group by series, sort the slices in space, read them.

    >>> scan = scan_dicom(Path("incoming/study"))
    >>> [series.label for series in scan.series]
    ["DICOM series 1.2.3... ('T1 AX', MR, in incoming/study/T1)"]
    >>> image, geometry = read_series(scan.series[0])   # voxseg.data.dicom_volume: (D, H, W) float32, Geometry

Rules (docs/INFERENCE.md, "DICOM"):

- Every file under the folder is looked at (recursively); files that are not DICOM are ignored. Image files are
  grouped by SeriesInstanceUID. Objects that are not images (Segmentation, RT Structure Set, Structured
  Report, presentation states, DICOMDIR) are never read as images: SEG and RTSTRUCT files are kept in
  `DicomScan.segmentations` and `DicomScan.structure_sets`
  (`voxseg convert dicom` reads them), the others are listed in `DicomScan.ignored`.
- Slices are ordered along the slice normal (the cross product of the ImageOrientationPatient row and column
  directions), by the projection of ImagePositionPatient on it, ascending; never by file name or
  InstanceNumber. Array axis 0 is that normal, axis 1 the column direction (rows of the image), axis 2 the row
  direction: the geometry SimpleITK's ImageSeriesReader gives for the same files.
- Refused, with the series named: orientations that differ between slices, images of different sizes, two
  slices at one position (several acquisitions, echoes or time points in one series), unequal slice spacing, a
  missing slice, gantry tilt (slices not stacked along their normal; voxseg does not resample it: reconstruct
  the series without tilt on the scanner or resample it first), fewer than two slices, multi-frame objects
  without per-frame functional groups, compressed pixel data no installed pydicom handler decodes, and
  damaged files (a header that cannot be read stops the scan: its series would be incomplete).
- Enhanced (multi-frame) CT and MR objects are read frame by frame from their functional groups.
- Stored values become real values with RescaleSlope and RescaleIntercept (CT in Hounsfield units), float32.

pydicom is imported on first use only: `pip install voxseg[dicom]`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.data.io import SUPPORTED_ENDINGS, file_ending, starts_like_dicom
from voxseg.errors import ConfigError, ImageReadError

__all__ = ["DicomFrame", "DicomScan", "DicomSeries", "highdicom_module", "is_dicom_folder", "pydicom_module",
           "scan_dicom"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# SOP classes that carry no image volume: RT structure set / plan / dose record, SR (all 88.x), presentation
# states (11.x), key objects, raw data, DICOMDIR
_NOT_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.88.",
                       "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.1.3.10")
_NOT_DICOM_ENDINGS = SUPPORTED_ENDINGS + (".json", ".npz", ".npy", ".txt", ".csv", ".pkl", ".zip")

def pydicom_module() -> Any:
    """pydicom, or ConfigError saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise ConfigError("reading DICOM needs the pydicom package: pip install 'voxseg[dicom]'") from None
    return pydicom


def highdicom_module() -> Any:
    """highdicom (DICOM-SEG reading and writing), or ConfigError saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise ConfigError("DICOM-SEG needs the highdicom package: pip install 'voxseg[dicom]'") from None
    return highdicom


@dataclass
class DicomFrame:
    """One 2D image of a series: a single-frame file, or one frame (`index`) of a multi-frame file."""

    path: Path
    index: int | None
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    size: tuple[int, int]  # (Rows, Columns)
    slope: float = 1.0
    intercept: float = 0.0
    sop_instance_uid: str = ""


@dataclass
class DicomSeries:
    """The image frames of one SeriesInstanceUID, with the tags that name it."""

    uid: str
    description: str = ""
    modality: str = ""
    study_uid: str = ""
    patient_id: str = ""
    study_date: str = ""
    frame_of_reference_uid: str = ""
    frames: list[DicomFrame] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # found while scanning; `read_series` refuses the series

    @property
    def files(self) -> list[Path]:
        return sorted({frame.path for frame in self.frames})

    @property
    def folder(self) -> Path:
        """The deepest folder holding every file of the series."""
        files = self.files
        if not files:
            return Path(".")
        return Path(os.path.commonpath([str(f.parent) for f in files]))

    @property
    def label(self) -> str:
        """How errors name the series: UID, description, modality and folder."""
        return f"DICOM series {self.uid} ('{self.description}', {self.modality or 'no modality'}, in {self.folder})"


@dataclass
class DicomScan:
    """What `scan_dicom` found under a folder."""

    folder: Path
    series: list[DicomSeries] = field(default_factory=list)
    segmentations: list[Path] = field(default_factory=list)  # DICOM-SEG files
    structure_sets: list[Path] = field(default_factory=list)  # RT Structure Set files
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it is not read as an image)


def is_dicom_folder(folder: Path) -> bool:
    """Whether a folder holds (somewhere under it) a DICOM file: the 128-byte preamble and 'DICM'."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and file_ending(path) not in _NOT_DICOM_ENDINGS \
                and starts_like_dicom(path):
            return True
    return False


def scan_dicom(folder: str | Path) -> DicomScan:
    """Read the headers of every DICOM file under `folder` and group the images by SeriesInstanceUID.

    Raises:
        ImageReadError: the folder does not exist or holds no DICOM image.
    """
    pydicom = pydicom_module()
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: DICOM folder not found")
    scan, damaged = DicomScan(folder), []
    by_uid: dict[str, DicomSeries] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or not starts_like_dicom(path):
            continue
        try:
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - collected: a damaged slice would leave its series short
            damaged.append(f"{path} ({type(exc).__name__}: {exc})")
            continue
        sop_class = str(getattr(dataset, "SOPClassUID", ""))
        if sop_class in (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS):
            (scan.segmentations if sop_class == SEG_SOP_CLASS else scan.structure_sets).append(path)
            continue
        if not sop_class.startswith(_NOT_IMAGE_PREFIXES) and (not sop_class or "SeriesInstanceUID" not in dataset):
            damaged.append(f"{path} (no SOPClassUID or SeriesInstanceUID: truncated?)")
            continue
        if sop_class.startswith(_NOT_IMAGE_PREFIXES):
            scan.ignored.append((path, f"not an image (SOP class {sop_class or 'none'}, modality "
                                       f"{getattr(dataset, 'Modality', '?')})"))
            continue
        uid = str(dataset.SeriesInstanceUID)
        series = by_uid.get(uid)
        if series is None:
            series = by_uid[uid] = _new_series(dataset)
        try:
            _add_frames(series, dataset, path)
        except (AttributeError, TypeError, ValueError) as exc:  # e.g. no Rows, a slope that is not a number
            series.problems.append(f"{path.name}: header cannot be interpreted ({type(exc).__name__}: {exc}); "
                                   "export the series again")
    if damaged:
        raise ImageReadError(f"{folder}: {len(damaged)} DICOM file(s) cannot be read, so the series they belong to "
                             f"would be incomplete: {'; '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}; "
                             "copy them again or remove them")
    scan.series = sorted(by_uid.values(), key=lambda s: (s.study_uid, s.description, s.uid))
    if not scan.series:
        others = len(scan.segmentations) + len(scan.structure_sets) + len(scan.ignored)
        found = f" ({others} non-image DICOM file(s))" if others else ""
        raise ImageReadError(f"{folder}: no DICOM image series found{found}; give the folder holding the image "
                             "files (.dcm or files without an ending, each starting with the DICM marker)")
    return scan


def _new_series(dataset: Any) -> DicomSeries:
    return DicomSeries(
        uid=str(dataset.SeriesInstanceUID), description=str(getattr(dataset, "SeriesDescription", "") or ""),
        modality=str(getattr(dataset, "Modality", "") or ""), study_uid=str(getattr(dataset, "StudyInstanceUID", "")),
        patient_id=str(getattr(dataset, "PatientID", "") or ""),
        study_date=str(getattr(dataset, "StudyDate", "") or ""),
        frame_of_reference_uid=str(getattr(dataset, "FrameOfReferenceUID", "") or ""),
    )


def _floats(value: Any, count: int) -> np.ndarray | None:
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def _add_frames(series: DicomSeries, dataset: Any, path: Path) -> None:
    """Append the file's frames to the series, or a problem when its position tags are missing."""
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in dataset:
        _add_enhanced_frames(series, dataset, path, frames)
        return
    position = _floats(getattr(dataset, "ImagePositionPatient", None), 3)
    orientation = _floats(getattr(dataset, "ImageOrientationPatient", None), 6)
    spacing = _floats(getattr(dataset, "PixelSpacing", None), 2)
    if position is None or orientation is None or spacing is None:
        series.problems.append(f"{path.name} has no valid ImagePositionPatient, ImageOrientationPatient or "
                               "PixelSpacing, so its place in space is unknown (a scout, screenshot or secondary "
                               "capture?); remove it from the folder or export the series with these tags")
        return
    series.frames.append(DicomFrame(
        path, None, position, orientation, (float(spacing[0]), float(spacing[1])),
        (int(dataset.Rows), int(dataset.Columns)), float(getattr(dataset, "RescaleSlope", 1) or 1),
        float(getattr(dataset, "RescaleIntercept", 0) or 0), str(getattr(dataset, "SOPInstanceUID", ""))))


def _group_item(per_frame: Any, shared: Any, sequence: str) -> Any:
    """The first item of a functional group sequence, from the frame's groups, else the shared ones."""
    for groups in (per_frame, shared):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            return groups[sequence].value[0]
    return None


def _add_enhanced_frames(series: DicomSeries, dataset: Any, path: Path, frames: int) -> None:
    per_frame_groups = getattr(dataset, "PerFrameFunctionalGroupsSequence", None)
    if per_frame_groups is None or len(per_frame_groups) != frames:
        series.problems.append(f"{path.name} is a multi-frame object ({frames} frames) without per-frame functional "
                               "groups (a cine, ultrasound or nuclear-medicine object?), so its frames cannot be "
                               "placed in space; export the series as Enhanced CT/MR or as single-frame images")
        return
    shared = dataset.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in dataset else None
    for index, groups in enumerate(per_frame_groups):
        plane = _group_item(groups, shared, "PlanePositionSequence")
        orient = _group_item(groups, shared, "PlaneOrientationSequence")
        measures = _group_item(groups, shared, "PixelMeasuresSequence")
        values = _group_item(groups, shared, "PixelValueTransformationSequence")
        position = _floats(getattr(plane, "ImagePositionPatient", None), 3)
        orientation = _floats(getattr(orient, "ImageOrientationPatient", None), 6)
        spacing = _floats(getattr(measures, "PixelSpacing", None), 2)
        if position is None or orientation is None or spacing is None:
            series.problems.append(f"{path.name}: frame {index + 1} has no plane position, plane orientation or "
                                   "pixel measures functional group; export the series with them")
            return
        slope = float(getattr(values, "RescaleSlope", 1) or 1) if values is not None else 1.0
        intercept = float(getattr(values, "RescaleIntercept", 0) or 0) if values is not None else 0.0
        series.frames.append(DicomFrame(path, index, position, orientation, (float(spacing[0]), float(spacing[1])),
                                        (int(dataset.Rows), int(dataset.Columns)), slope, intercept,
                                        str(getattr(dataset, "SOPInstanceUID", ""))))
