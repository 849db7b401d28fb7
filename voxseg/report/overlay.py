"""Overlay pictures of a segmentation on its image: three planes, real aspect ratio, stable label colours.

A volume is first turned to the patient's axes (`canonical`): array axes are permuted and flipped so that axis 0
runs foot to head (+z), axis 1 front to back (+y) and axis 2 right to left (+x), LPS as voxseg's geometry is.
The planes are then shown as radiologists look at them:

    axial     rows front (top) to back, columns patient right (left of the picture) to patient left
    coronal   rows head (top) to foot, columns patient right to left
    sagittal  rows head (top) to foot, columns front (left of the picture) to back

Pixels are square on screen: a plane with 3 mm x 0.8 mm voxels is stretched 3.75 times along its 3 mm axis by
nearest-neighbour resampling, so a box of 30 x 24 mm looks 30 x 24, not 10 x 30 voxels wide.

Colours: label value v has one colour in every picture of every report (`label_colour`); false positives are
magenta and false negatives cyan, colours no label gets.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from voxseg.data.io import Geometry

__all__ = ["FALSE_NEGATIVE", "FALSE_POSITIVE", "PLANES", "Display", "canonical", "display_plane", "label_colour",
           "outline", "paint", "window"]

PLANES = ("axial", "coronal", "sagittal")
FALSE_POSITIVE = (255, 0, 255)
FALSE_NEGATIVE = (0, 255, 255)
CT_WINDOW = (-160.0, 240.0)  # soft tissue: level 40 HU, width 400 HU
_FIRST_COLOURS = (  # distinct on a grey image, none magenta or cyan
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (220, 190, 255),
)


def label_colour(value: int) -> tuple[int, int, int]:
    """The colour of label value `value` (> 0): a fixed table for the first 16, then golden-ratio hues, so the
    same value has the same colour in every case, report and run."""
    value = int(value)
    if 1 <= value <= len(_FIRST_COLOURS):
        return _FIRST_COLOURS[value - 1]
    hue = (value * 0.618033988749895) % 1.0
    if abs(hue - 0.5) < 0.04 or abs(hue - 5 / 6) < 0.04:  # keep away from cyan and magenta
        hue = (hue + 0.08) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def canonical(volume: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """`volume` (D, H, W) on the patient's axes (z, y, x), each increasing, and its spacing in that order.

    Each array axis goes to the world axis its direction is closest to; an oblique volume is shown along its
    nearest axes (not resampled). When two array axes are closest to the same world axis (near 45 degrees) the
    array order is kept."""
    direction, spacing = geometry.direction, geometry.spacing
    world_axis = [int(np.argmax(np.abs(direction[:, axis]))) for axis in range(3)]
    if sorted(world_axis) != [0, 1, 2]:
        return volume, tuple(float(s) for s in spacing)  # type: ignore[return-value]
    order = [world_axis.index(2 - k) for k in range(3)]  # canonical axis k is world axis z, y, x
    turned = np.transpose(volume, order)
    flips = tuple(k for k, axis in enumerate(order) if direction[world_axis[axis], axis] < 0)
    if flips:
        turned = np.flip(turned, axis=flips)
    return turned, tuple(float(spacing[axis]) for axis in order)  # type: ignore[return-value]


def window(image: np.ndarray, ct: bool) -> tuple[float, float]:
    """Grey-value range shown: the soft-tissue window for CT, the 0.5-99.5 percentiles of the non-zero voxels
    (every voxel of a volume without zeros) for MRI and everything else."""
    if ct:
        return CT_WINDOW
    # percentiles of a subsample (every k-th voxel along each axis, a small copy even of a transposed view): the
    # window, not a statistic
    step = max(1, int(np.ceil((image.size / 2_000_000) ** (1.0 / image.ndim))))
    values = np.asarray(image[(slice(None, None, step),) * image.ndim], dtype=np.float32).reshape(-1)
    values = values[np.isfinite(values)]
    nonzero = values[values != 0]
    values = nonzero if nonzero.size else values
    if not values.size:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


@dataclass(frozen=True)
class Display:
    """How a plane is put on screen: picture size and the voxel row / column under each pixel.

    Attributes:
        rows, columns: indices into the plane (after the flips of `display_plane`) for each pixel row / column.
    """

    rows: np.ndarray
    columns: np.ndarray

    @classmethod
    def fit(cls, shape: tuple[int, int], spacing: tuple[float, float], longest: int) -> "Display":
        """Square pixels, the longer side `longest` pixels (at least one pixel per voxel row/column)."""
        extent = (shape[0] * spacing[0], shape[1] * spacing[1])
        pixel = max(extent) / float(longest)
        size = [max(1, int(round(extent[k] / pixel))) for k in range(2)]
        return cls(*(np.minimum((np.arange(size[k]) + 0.5) * shape[k] / size[k], shape[k] - 1).astype(np.intp)
                     for k in range(2)))

    def resample(self, plane: np.ndarray) -> np.ndarray:
        return plane[np.ix_(self.rows, self.columns)]


def display_plane(volume: np.ndarray, spacing: Sequence[float], plane: str, index: int
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """One plane of a canonical volume (`canonical`) the right way up, and its (row, column) spacing."""
    if plane == "axial":
        return volume[index], (spacing[1], spacing[2])
    if plane == "coronal":
        return volume[::-1, index, :], (spacing[0], spacing[2])
    if plane == "sagittal":
        return volume[::-1, :, index], (spacing[0], spacing[1])
    raise ValueError(f"unknown plane {plane!r}; one of {', '.join(PLANES)}")


def plane_index(plane: str, point: Sequence[int]) -> int:
    """The index of `plane` through `point` (z, y, x) of a canonical volume."""
    return int(point[PLANES.index(plane)])


def grey(plane: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 grey, `value_range` black to white."""
    low, high = value_range
    scaled = np.clip((np.nan_to_num(plane.astype(np.float32)) - low) / (high - low), 0.0, 1.0)
    return np.repeat((scaled * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)


def outline(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool: pixels of a label region within `width` pixels (along a row or column) of another value or of
    the picture's edge: the region's own border, drawn inside it."""
    padded = np.pad(labels, width, mode="constant", constant_values=-1)
    height, breadth = labels.shape
    edge = np.zeros(labels.shape, dtype=bool)
    for shift in range(1, width + 1):
        for rows, columns in ((slice(width - shift, width - shift + height), slice(width, width + breadth)),
                              (slice(width + shift, width + shift + height), slice(width, width + breadth)),
                              (slice(width, width + height), slice(width - shift, width - shift + breadth)),
                              (slice(width, width + height), slice(width + shift, width + shift + breadth))):
            edge |= padded[rows, columns] != labels
    return edge & (labels > 0)


def paint(rgb: np.ndarray, labels: np.ndarray, style: str = "outline", opacity: float = 0.45,
          width: int = 1) -> np.ndarray:
    """Label colours onto a copy of `rgb` (H, W, 3): outlines `width` pixels wide drawn opaque, or regions filled
    at `opacity`."""
    out = rgb.copy()
    mask = outline(labels, width) if style == "outline" else labels > 0
    for value in np.unique(labels[mask]):
        where = mask & (labels == value)
        colour = np.asarray(label_colour(int(value)), dtype=np.float32)
        if style == "outline":
            out[where] = colour.astype(np.uint8)
        else:
            out[where] = (out[where] * (1.0 - opacity) + colour * opacity + 0.5).astype(np.uint8)
    return out


def paint_errors(rgb: np.ndarray, prediction: np.ndarray, reference: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """False positives (predicted foreground where the reference differs) magenta, false negatives (reference
    foreground predicted otherwise) cyan, filled at `opacity`."""
    out = rgb.copy().astype(np.float32)
    false_negative = (reference > 0) & (prediction != reference)
    false_positive = (prediction > 0) & (prediction != reference) & ~false_negative
    for mask, colour in ((false_positive, FALSE_POSITIVE), (false_negative, FALSE_NEGATIVE)):
        out[mask] = out[mask] * (1.0 - opacity) + np.asarray(colour, dtype=np.float32) * opacity
    return (out + 0.5).astype(np.uint8)
