"""A case's pictures for the report: where to look, and the layers drawn there.

Where to look (`points_of_interest`), each a voxel of a canonical volume (`voxseg.report.overlay.canonical`):
    structure   the centre of the largest connected structure of the reference (of the prediction when there is
                no reference), snapped to the structure's nearest voxel, so all three planes cut through it;
    error       the same for the largest connected region of errors (prediction != reference), with a reference;
    uncertain   the same for the largest region of high uncertainty (normalised entropy > 0.5), without one.

Per point and plane, the picture is a stack of layers of one size, each a PNG: the image in grey, then
reference outlines, the prediction filled, errors filled (false positives magenta, false negatives cyan) or the
uncertainty as a heat map, transparent elsewhere. The page lays them on top of each other, and the reader
switches layers on and off and sets their opacity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from voxseg.atomicio import atomic_open
from voxseg.report.overlay import (
    PLANES,
    Display,
    display_plane,
    grey,
    outline,
    paint,
    paint_errors,
    plane_index,
    window,
)

__all__ = ["CaseVolumes", "points_of_interest", "thumbnail", "write_case_pictures", "write_png"]

DETAIL_PIXELS = 256
THUMBNAIL_PIXELS = 112


@dataclass
class CaseVolumes:
    """One case on the patient's axes (z, y, x), all on one grid.

    Attributes:
        prediction: integer labels.
        reference: integer labels (the ignore label already set to 0), or None.
        image: the channel shown, or None (then the pictures have a black background).
        uncertainty: normalised entropy in [0, 1] (`voxseg.report.uncertainty`), or None.
        spacing: mm per voxel along (z, y, x).
        ct: window the image as CT (Hounsfield units).
    """

    prediction: np.ndarray
    reference: np.ndarray | None
    image: np.ndarray | None
    uncertainty: np.ndarray | None
    spacing: tuple[float, float, float]
    ct: bool = False
    value_range: tuple[float, float] = field(default=(0.0, 1.0))

    def __post_init__(self) -> None:
        if self.image is not None:
            self.value_range = window(self.image, self.ct)


def _centre(region: np.ndarray) -> tuple[int, ...]:
    """The centre of mass of a boolean array, rounded, from its projections (no coordinate arrays)."""
    total = float(np.count_nonzero(region))
    centre = []
    for axis in range(region.ndim):
        profile = np.count_nonzero(region, axis=tuple(a for a in range(region.ndim) if a != axis))
        centre.append(int(round(float(np.dot(np.arange(profile.size), profile)) / total)))
    return tuple(centre)


def _nearest_voxel(region: np.ndarray, centre: tuple[int, ...]) -> tuple[int, ...]:
    """The voxel of `region` nearest `centre`, searched in growing windows around it (a C-shaped region's centre
    lies outside it)."""
    if region[centre]:
        return centre
    reach = 2
    while True:
        window = tuple(slice(max(c - reach, 0), c + reach + 1) for c in centre)
        voxels = np.argwhere(region[window])
        if voxels.size:
            offset = np.array([w.start for w in window])
            distances = (((voxels + offset) - np.array(centre)) ** 2).sum(axis=1)
            best = voxels[int(np.argmin(distances))] + offset
            return tuple(int(v) for v in best)
        reach *= 2


def _centre_of_largest(mask: np.ndarray) -> tuple[int, int, int] | None:
    """A voxel of the largest 26-connected region of `mask`, the one nearest the region's centre of mass."""
    if not mask.any():
        return None
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = ndimage.sum_labels(mask, components, index=np.arange(1, count + 1))
    largest = int(np.argmax(sizes)) + 1
    box = ndimage.find_objects(components, max_label=largest)[largest - 1]
    region = components[box] == largest
    del components
    nearest = _nearest_voxel(region, _centre(region))
    return tuple(int(v + s.start) for v, s in zip(nearest, box))  # type: ignore[return-value]


def points_of_interest(case: CaseVolumes) -> dict[str, tuple[int, int, int]]:
    """The points the report shows (module docstring); the volume's centre when nothing is segmented."""
    labels = case.reference if case.reference is not None else case.prediction
    structure = _centre_of_largest(labels > 0) or _centre_of_largest(case.prediction > 0)
    points = {"structure": structure or tuple(s // 2 for s in case.prediction.shape)}
    if case.reference is not None:
        error = _centre_of_largest(case.prediction != case.reference)
        if error is not None:
            points["error"] = error
    elif case.uncertainty is not None:
        uncertain = _centre_of_largest(case.uncertainty > 0.5)
        if uncertain is not None:
            points["uncertain"] = uncertain
    return points  # type: ignore[return-value]


def _heat(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 4): yellow to red, transparent below 0.05, more opaque where higher."""
    rgba = np.zeros((*values.shape, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (255 * (1.0 - np.clip(values, 0, 1))).astype(np.uint8)
    rgba[..., 3] = np.where(values > 0.05, (80 + 175 * np.clip(values, 0, 1)).astype(np.uint8), 0)
    return rgba


def _layer(rgb: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """RGBA: `rgb` where `drawn`, transparent elsewhere."""
    rgba = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = np.where(drawn, 255, 0)
    return rgba


def plane_layers(case: CaseVolumes, plane: str, index: int, longest: int = DETAIL_PIXELS) -> dict[str, np.ndarray]:
    """The layers of one plane through `index`: "image" (H, W, 3) and RGBA overlays of the same size."""
    prediction, spacing2d = display_plane(case.prediction, case.spacing, plane, index)
    display = Display.fit(prediction.shape, spacing2d, longest)
    prediction = display.resample(prediction)
    black = np.zeros((*prediction.shape, 3), dtype=np.uint8)
    layers: dict[str, np.ndarray] = {}
    if case.image is not None:
        layers["image"] = grey(display.resample(display_plane(case.image, case.spacing, plane, index)[0]),
                               case.value_range)
    else:
        layers["image"] = black
    if case.reference is not None:
        reference = display.resample(display_plane(case.reference, case.spacing, plane, index)[0])
        width = 2 if longest >= DETAIL_PIXELS else 1
        layers["reference"] = _layer(paint(black, reference, "outline", width=width), outline(reference, width))
    layers["prediction"] = _layer(paint(black, prediction, "filled", opacity=1.0), prediction > 0)
    if case.reference is not None:
        errors = paint_errors(black, prediction, reference, opacity=1.0)
        layers["errors"] = _layer(errors, prediction != reference)
    elif case.uncertainty is not None:
        layers["uncertainty"] = _heat(display.resample(display_plane(case.uncertainty, case.spacing, plane,
                                                                     index)[0]))
    return layers


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An (H, W, 3) or (H, W, 4) uint8 array as a PNG, written atomically."""
    from PIL import Image

    with atomic_open(path) as handle:
        Image.fromarray(pixels).save(handle, format="PNG", optimize=False, compress_level=6)


def write_case_pictures(case: CaseVolumes, folder: Path, points: dict[str, Sequence[int]],
                        longest: int = DETAIL_PIXELS) -> dict[str, dict[str, dict[str, str]]]:
    """Every layer of every plane through every point into `folder`.

    Returns:
        point -> plane -> layer -> file name (relative to `folder`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, dict[str, str]]] = {}
    for point_name, point in points.items():
        files[point_name] = {}
        for plane in PLANES:
            names = {}
            for layer, pixels in plane_layers(case, plane, plane_index(plane, point), longest).items():
                names[layer] = f"{point_name}_{plane}_{layer}.png"
                write_png(folder / names[layer], pixels)
            files[point_name][plane] = names
    return files


def thumbnail(case: CaseVolumes, point: Sequence[int], longest: int = THUMBNAIL_PIXELS) -> np.ndarray:
    """The axial plane through `point` as one RGB picture: image, prediction filled, reference outlined."""
    layers = plane_layers(case, "axial", plane_index("axial", point), longest)
    rgb = layers["image"].astype(np.float32)
    for name, opacity in (("prediction", 0.5), ("reference", 1.0)):
        if name in layers:
            alpha = layers[name][..., 3:4].astype(np.float32) / 255.0 * opacity
            rgb = rgb * (1.0 - alpha) + layers[name][..., :3].astype(np.float32) * alpha
    return (rgb + 0.5).astype(np.uint8)
