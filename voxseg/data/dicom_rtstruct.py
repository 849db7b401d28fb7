"""RT Structure Sets as masks on their image series (`voxseg convert dicom`).

An RTSTRUCT holds, per ROI, closed planar contours in patient coordinates (LPS mm), each lying in one slice of
the referenced series. A voxel belongs to an ROI when its centre lies inside an odd number of the ROI's
contours on its slice (even-odd rule: a contour inside another is a hole). Contours that lie between slices,
outside the image or off its slice planes are refused with the ROI and file named; POINT and OPEN contours
are ignored.

    >>> structure = read_structure_set(Path("rtstruct.dcm"))
    >>> masks = structure.masks(shape, geometry)        # (D, H, W, ROIs) bool, in `structure.names` order
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxseg.data.dicom import pydicom_module
from voxseg.data.io import Geometry
from voxseg.errors import DatasetError

__all__ = ["StructureSet", "read_structure_set"]

SLICE_TOLERANCE = 0.1
"""A contour's points may lie this far (in slice spacings) from a slice plane."""


@dataclass
class StructureSet:
    """The ROIs of one RT Structure Set file with their closed planar contours."""

    path: Path
    series_uids: list[str]  # the series the contours were drawn on
    names: list[str] = field(default_factory=list)  # ROI names, in ROI number order
    contours: list[list[np.ndarray]] = field(default_factory=list)  # per ROI: (N, 3) polygons in LPS mm

    def masks(self, shape: tuple[int, int, int], geometry: Geometry) -> np.ndarray:
        """(D, H, W, ROIs) bool masks on the grid of the referenced series."""
        from matplotlib.path import Path as Polygon

        inverse = np.linalg.inv(geometry.affine)
        out = np.zeros((*shape, len(self.names)), dtype=bool)
        for roi, polygons in enumerate(self.contours):
            for points in polygons:
                index = (inverse @ np.c_[points, np.ones(len(points))].T).T[:, :3]  # (N, 3): slice, row, column
                k = self._slice_of(index[:, 0], roi, shape[0])
                low = np.clip(np.floor(index[:, 1:].min(axis=0)).astype(int), 0, None)
                high = np.minimum(np.ceil(index[:, 1:].max(axis=0)).astype(int), np.asarray(shape[1:]) - 1)
                if (high < low).any():
                    continue  # entirely outside the image plane
                rows, columns = np.mgrid[low[0]:high[0] + 1, low[1]:high[1] + 1]
                inside = Polygon(index[:, 1:]).contains_points(np.c_[rows.ravel(), columns.ravel()])
                out[k, low[0]:high[0] + 1, low[1]:high[1] + 1, roi] ^= inside.reshape(rows.shape)
        return out

    def _slice_of(self, slices: np.ndarray, roi: int, depth: int) -> int:
        k = int(round(float(slices.mean())))
        if np.abs(slices - k).max() > SLICE_TOLERANCE:
            raise DatasetError(f"{self.path}: a contour of ROI '{self.names[roi]}' does not lie in one slice of its "
                               f"image series (slice positions {slices.min():.2f} to {slices.max():.2f}); "
                               "structures must be drawn on the series' slices")
        if not 0 <= k < depth:
            raise DatasetError(f"{self.path}: a contour of ROI '{self.names[roi]}' lies outside its image series "
                               f"(slice {k} of {depth}); is it drawn on another series?")
        return k


def _referenced_series(dataset: object) -> list[str]:
    uids = []
    for frame in getattr(dataset, "ReferencedFrameOfReferenceSequence", []):
        for study in getattr(frame, "RTReferencedStudySequence", []):
            uids += [str(item.SeriesInstanceUID) for item in getattr(study, "RTReferencedSeriesSequence", [])]
    return uids


def read_structure_set(path: Path) -> StructureSet:
    """The ROIs and closed planar contours of an RT Structure Set file; DatasetError naming the file."""
    pydicom = pydicom_module()
    try:
        dataset = pydicom.dcmread(str(path))
        names = {int(item.ROINumber): str(item.ROIName) for item in dataset.StructureSetROISequence}
    except Exception as exc:  # noqa: BLE001 - a damaged file names itself
        raise DatasetError(f"{path}: RT Structure Set cannot be read ({type(exc).__name__}: {exc}); export it "
                           "again") from None
    numbers = sorted(names)
    contours: list[list[np.ndarray]] = [[] for _ in numbers]
    for item in getattr(dataset, "ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        if number not in names:
            raise DatasetError(f"{path}: contours for ROI number {number}, which StructureSetROISequence does not "
                               "declare; export the structure set again")
        for contour in getattr(item, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
            if len(points) >= 3:
                contours[numbers.index(number)].append(points)
    return StructureSet(Path(path), _referenced_series(dataset), [names[n] for n in numbers], contours)
