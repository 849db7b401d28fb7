"""A scanned DICOM series (`voxseg.data.dicom`) as a volume: its slices in spatial order with their Geometry,
after the checks that refuse what cannot be one equally spaced, untilted volume, and its pixels as real values.

    >>> frames, geometry = series_geometry(series)   # array order: ascending along the slice normal
    >>> image, geometry = read_series(series)        # (D, H, W) float32, rescale slope and intercept applied

The rules and refusals are listed in `voxseg.data.dicom`'s docstring and docs/INFERENCE.md ("DICOM").
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.data.dicom import DicomFrame, DicomSeries, pydicom_module
from voxseg.data.io import Geometry
from voxseg.errors import ImageReadError

__all__ = ["ORIENTATION_TOLERANCE", "SPACING_TOLERANCE", "TILT_TOLERANCE", "read_series", "series_geometry"]

SPACING_TOLERANCE = 0.01
"""Slice gaps may differ from their median by this fraction (1 %) before a series is refused as unequally
spaced; a gap of more than 1.5 medians is reported as a missing slice."""
ORIENTATION_TOLERANCE = 1e-3
"""Direction cosines of two slices may differ by this much."""
TILT_TOLERANCE = 0.1
"""A slice may lie this far (in pixel spacings) within its plane from the line along the normal through the first
slice before the series counts as tilted or sheared: the geometry assumes no drift at all."""



def series_geometry(series: DicomSeries) -> tuple[list[DicomFrame], Geometry]:
    """The series' frames in array order (ascending along the slice normal) and the volume's Geometry.

    Raises:
        ImageReadError: naming the series, for each refusal listed in the module docstring.
    """
    where = series.label
    if series.problems:
        raise ImageReadError(f"{where}: {series.problems[0]}")
    frames = series.frames
    if len(frames) < 2:
        raise ImageReadError(f"{where}: {len(frames)} image(s); a volume needs at least two slices (give the whole "
                             "series)")
    _check_same_plane_grid(series)
    orientation = frames[0].orientation
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    frames = sorted(frames, key=lambda f: float(f.position @ normal))
    along = np.array([float(f.position @ normal) for f in frames])
    step = _checked_slice_step(series, frames, along, normal)
    affine = np.eye(4)
    row_spacing, column_spacing = frames[0].pixel_spacing
    affine[:3, 0] = normal * step
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = row * column_spacing
    affine[:3, 3] = frames[0].position
    return frames, Geometry(affine)


def _check_same_plane_grid(series: DicomSeries) -> None:
    """One orientation, one image size and one pixel spacing for every frame."""
    first = series.frames[0]
    for frame in series.frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise ImageReadError(
                f"{series.label}: mixed orientations ({_name(first)}: {np.round(first.orientation, 4).tolist()}, "
                f"{_name(frame)}: {np.round(frame.orientation, 4).tolist()}); a volume has one orientation: "
                "separate the series (e.g. a localizer) into their own folders or export them as separate series")
        if frame.size != first.size or not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise ImageReadError(
                f"{series.label}: images of different sizes or pixel spacings ({_name(first)}: {first.size} at "
                f"{first.pixel_spacing} mm, {_name(frame)}: {frame.size} at {frame.pixel_spacing} mm); a volume has "
                "one grid: export the series again or separate its parts")


def _name(frame: DicomFrame) -> str:
    return frame.path.name if frame.index is None else f"{frame.path.name} frame {frame.index + 1}"


def _checked_slice_step(series: DicomSeries, frames: list[DicomFrame], along: np.ndarray, normal: np.ndarray) -> float:
    """The slice spacing in mm after the duplicate, spacing, missing-slice and tilt checks."""
    gaps = np.diff(along)
    if (gaps < 1e-3).any():
        k = int(np.argmax(gaps < 1e-3))
        counts = Counter(np.round(along, 3).tolist())
        raise ImageReadError(
            f"{series.label}: {_name(frames[k])} and {_name(frames[k + 1])} lie at the same position "
            f"({along[k]:.3f} mm along the slice normal; {sum(c > 1 for c in counts.values())} position(s) hold "
            "several images): the series holds several acquisitions, echoes or time points; split it into one "
            "series per volume (e.g. by EchoNumbers or AcquisitionNumber) and give one")
    median = float(np.median(gaps))
    if (gaps > 1.5 * median).any():
        k = int(np.argmax(gaps > 1.5 * median))
        raise ImageReadError(
            f"{series.label}: missing slice(s) between {_name(frames[k])} and {_name(frames[k + 1])} (gap "
            f"{gaps[k]:.3f} mm where the slices are {median:.3f} mm apart); copy the whole series (every file) "
            "and try again")
    if (np.abs(gaps - median) > SPACING_TOLERANCE * median).any():
        raise ImageReadError(
            f"{series.label}: unequal slice spacing (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm, more than "
            f"{SPACING_TOLERANCE:.0%} apart); voxseg reads equally spaced series only: resample it to equal "
            "spacing first")
    # each slice's drift within the plane from the first slice's normal line: a tilt adds up slice by slice
    offsets = np.stack([f.position for f in frames]) - frames[0].position
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if drift.max() > TILT_TOLERANCE * min(frames[0].pixel_spacing):
        per_slice = float(drift[-1] / (len(frames) - 1))
        angle = float(np.degrees(np.arctan2(per_slice, median)))
        raise ImageReadError(
            f"{series.label}: gantry tilt or sheared stack (the last slice lies {drift[-1]:.3f} mm within its plane "
            f"from the first slice's normal, {per_slice:.3f} mm per slice, about {angle:.1f} degrees): the slices "
            "are not stacked along their normal and voxseg does not resample them; reconstruct the series without "
            "tilt or resample it to a rectangular grid first")
    return float((along[-1] - along[0]) / (len(along) - 1))


def read_series(series: DicomSeries) -> tuple[np.ndarray, Geometry]:
    """The series as a (D, H, W) float32 volume of real values (rescale slope and intercept applied) and its
    Geometry; see `series_geometry` for the order and the refusals. Each file is decoded once, straight into
    its slices of the volume (one file's pixels are held besides the volume)."""
    frames, geometry = series_geometry(series)
    pydicom = pydicom_module()
    volume = np.empty((len(frames), *frames[0].size), dtype=np.float32)
    slices_of: dict[Path, list[int]] = {}
    for k, frame in enumerate(frames):
        slices_of.setdefault(frame.path, []).append(k)
    for path, slices in slices_of.items():
        array = _decoded(series, path, pydicom)
        for k in slices:
            frame = frames[k]
            # a multi-frame object of one frame decodes to a 2D array
            plane = array[frame.index] if frame.index is not None and array.ndim == 3 else array
            if plane.shape != frame.size:
                raise ImageReadError(f"{series.label}: {_name(frame)} holds pixels of shape {plane.shape}, its "
                                     f"header says {frame.size}; the file is damaged: export the series again")
            volume[k] = plane.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
    return volume, geometry


def _decoded(series: DicomSeries, path: Path, pydicom: Any) -> np.ndarray:
    """The stored pixel values of one file, or ImageReadError naming the series, the file and its transfer syntax."""
    try:
        dataset = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - changed or damaged since the scan
        raise ImageReadError(f"{series.label}: {path.name} cannot be read ({type(exc).__name__}: {exc}); copy the "
                             "series again") from None
    syntax = dataset.file_meta.get("TransferSyntaxUID", None)
    name = f"{getattr(syntax, 'name', syntax)}, {syntax}" if syntax else "not given"
    if int(getattr(dataset, "SamplesPerPixel", 1) or 1) != 1:
        raise ImageReadError(f"{series.label}: {path.name} is a colour image ({dataset.SamplesPerPixel} samples "
                             "per pixel, e.g. a screenshot); give grey-scale image series only")
    try:
        return dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - a missing decoder or damaged pixel data: name the syntax
        if syntax is not None and getattr(syntax, "is_compressed", False):
            what = ("install a decoder for it (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or "
                    "gdcm) or export the series uncompressed")
        else:
            what = "the file may be truncated: copy the series again"
        raise ImageReadError(f"{series.label}: the pixel data of {path.name} cannot be decoded (transfer syntax "
                             f"{name}: {type(exc).__name__}: {exc}); {what}") from None
