"""Synthetic brain-tumour-like MRI cases and datasets, deterministic by seed.

Each case is a skull-stripped "brain" (a noise-perturbed ellipsoid, exactly zero outside so that cropping to
the nonzero region matters) with grey/white matter, ventricles and a tumour: edema (label 1) around a core that
is necrotic / non-enhancing (label 2) inside an enhancing rim (label 3); about one case in five has no
enhancing part. Four channels mimic T1, T1ce, T2 and FLAIR contrasts, with intensity ranges that overlap
between tissues, a smooth multiplicative bias field per channel, slight partial-volume blur and Rician noise.

Everything is built in physical millimetres, so the spacing shapes the anatomy: a (32, 64, 64) volume at
(2, 1, 1) mm holds the same round brain as (64, 64, 64) at 1 mm. Tumour radii are drawn in mm relative to
the brain's size, which keeps tiny test volumes (16^3) meaningful and full-size volumes realistic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from voxseg.configtree import replace_fields
from voxseg.data.io import Geometry, write_image
from voxseg.errors import ConfigError
from voxseg.jsonio import write_json_atomic

CHANNEL_NAMES = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
LABELS = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
REGION_LABELS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
REGIONS_CLASS_ORDER = [1, 2, 3]
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
# our label -> BraTS 2021 label (0 background, 1 necrosis/non-enhancing, 2 edema, 4 enhancing)
OURS_TO_BRATS = np.array([0, 2, 1, 4], dtype=np.uint8)

# tissue codes of the internal tissue map (0 = outside the brain)
_CSF, _GM, _WM, _EDEMA, _NECROSIS, _ENHANCING = 1, 2, 3, 4, 5, 6
# mean intensity per tissue (rows, by tissue code) and channel (T1, T1ce, T2, FLAIR), before per-case jitter.
# Ranges overlap on purpose (edema vs grey matter in T1/T1ce, necrosis vs edema in T2) so no single channel
# separates the classes and a model must combine them.
_TISSUE_MEANS = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # outside
        [0.25, 0.25, 1.00, 0.15],  # CSF: dark T1, bright T2, suppressed in FLAIR
        [0.55, 0.58, 0.60, 0.60],  # grey matter
        [0.80, 0.80, 0.40, 0.45],  # white matter
        [0.50, 0.52, 0.80, 0.85],  # edema: bright in T2 and FLAIR
        [0.30, 0.33, 0.90, 0.55],  # necrosis / non-enhancing core
        [0.55, 1.10, 0.65, 0.70],  # enhancing tumour: bright in T1ce only
    ],
    dtype=np.float32,
)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """Smooth random field of unit standard deviation, shape `shape`, with about `cells` bumps per axis.

    Coarse Gaussian noise is interpolated with separable Gaussian kernels (one small matrix product per axis),
    which costs O(N * cells) and is far cheaper than filtering a full-size noise volume.
    """
    field = rng.standard_normal(tuple(max(2, c) for c in cells)).astype(np.float32)
    for axis, size in enumerate(shape):
        nodes = np.linspace(0.0, 1.0, field.shape[axis])
        positions = np.linspace(0.0, 1.0, size)
        width = 0.6 / (len(nodes) - 1)
        weights = np.exp(-0.5 * ((positions[:, None] - nodes[None, :]) / width) ** 2)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)  # (size, nodes)
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _cells(extent_mm: np.ndarray, feature_mm: float, low: int = 3, high: int = 32) -> tuple[int, ...]:
    """Coarse-grid size per axis giving bumps of about `feature_mm`."""
    return tuple(int(np.clip(round(e / feature_mm), low, high)) for e in extent_mm)


def _coordinates(shape: tuple[int, ...], spacing: np.ndarray, origin_mm: np.ndarray) -> list[np.ndarray]:
    """Broadcastable per-axis coordinates in mm relative to `origin_mm`: shapes (D,1,1), (1,H,1), (1,1,W)."""
    coords = []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        view = [1, 1, 1]
        view[axis] = n
        coords.append(((np.arange(n, dtype=np.float32) * s) - origin_mm[axis]).reshape(view))
    return coords


def _ellipsoid_radius(coords: list[np.ndarray], semi_axes: np.ndarray,
                      rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) at `coords` (mm, centred); `rotation` (3, 3) columns = axes."""
    if rotation is None:
        local = coords
    else:
        local = [sum(rotation[j, i] * coords[j] for j in range(3)) for i in range(3)]
    return np.sqrt(sum((q / a) ** 2 for q, a in zip(local, semi_axes)))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def _brain_tissues(rng: np.random.Generator, shape: tuple[int, ...],
                   spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue map (D, H, W) int8 of the healthy brain, plus its centre and semi-axes in mm."""
    extent = np.asarray(shape) * spacing
    centre = extent / 2 + rng.uniform(-0.03, 0.03, 3) * extent
    semi = extent * rng.uniform(0.38, 0.45, 3)
    # a lumpy outline (radius scaled by up to 1 +- 0.1) that still leaves at least one empty voxel on every side
    room = np.minimum(centre, extent - centre) - 1.5 * spacing
    semi = np.minimum(semi, room * 0.9)
    coords = _coordinates(shape, spacing, centre)
    radius = _ellipsoid_radius(coords, semi)
    radius *= 1.0 + 0.04 * np.clip(_smooth_noise(rng, shape, _cells(extent, 40.0)), -2.5, 2.5)
    tissues = np.zeros(shape, dtype=np.int8)
    brain = radius <= 1.0
    tissues[brain] = _WM
    # cortex: an outer shell folded by a finer noise field
    folds = radius + 0.07 * _smooth_noise(rng, shape, _cells(extent, 12.0, high=40))
    tissues[brain & (folds > 0.8)] = _GM
    tissues[brain & (radius > 0.97)] = _CSF
    # two lateral ventricles near the centre, elongated front to back (array axis 1)
    for side in (-1.0, 1.0):
        offset = np.array([0.05, 0.0, side * 0.14]) * semi
        ventricle = _ellipsoid_radius(_coordinates(shape, spacing, centre + offset),
                                      semi * np.array([0.16, 0.32, 0.08]))
        tissues[brain & (ventricle <= 1.0)] = _CSF
    return tissues, centre, semi


def _add_tumour(rng: np.random.Generator, tissues: np.ndarray, spacing: np.ndarray, centre: np.ndarray,
                semi: np.ndarray, enhancing: bool) -> None:
    """Paint edema, necrosis and (optionally) an enhancing rim into `tissues`, inside the brain only."""
    brain_size = float(semi.min())
    # position: a random point in the inner part of the brain
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    tumour_centre = centre + semi * direction * rng.uniform(0.0, 0.45)
    edema_semi = brain_size * rng.uniform(0.3, 0.5) * rng.uniform(0.75, 1.25, 3)
    core_scale = rng.uniform(0.5, 0.75)
    core_semi = edema_semi * core_scale * rng.uniform(0.85, 1.15, 3)
    core_centre = tumour_centre + rng.uniform(-0.2, 0.2, 3) * (edema_semi - core_semi)
    edema_wobble, core_wobble = rng.uniform(0.12, 0.3), rng.uniform(0.08, 0.2)
    rotation = _random_rotation(rng)

    # work inside the tumour's bounding box only: cheap for full-size volumes
    reach = edema_semi.max() * (1.0 + 3.0 * edema_wobble)
    low = np.maximum(((tumour_centre - reach) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((tumour_centre + reach) / spacing).astype(int) + 1, tissues.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    box_shape = tuple(int(b - a) for a, b in zip(low, high))
    box_origin = low * spacing
    box_extent = np.asarray(box_shape) * spacing

    edema_r = _ellipsoid_radius(_coordinates(box_shape, spacing, tumour_centre - box_origin), edema_semi, rotation)
    edema_r *= 1.0 + edema_wobble * _smooth_noise(rng, box_shape, _cells(box_extent, 0.5 * edema_semi.mean()))
    core_r = _ellipsoid_radius(_coordinates(box_shape, spacing, core_centre - box_origin), core_semi, rotation)
    core_r *= 1.0 + core_wobble * _smooth_noise(rng, box_shape, _cells(box_extent, 0.5 * core_semi.mean()))
    # rim at least ~1.2 voxels thick so it survives on coarse grids, and never the whole core
    rim_mm = max(core_semi.mean() * rng.uniform(0.15, 0.35), 1.2 * float(spacing.max()))
    rim_inner = max(1.0 - rim_mm / core_semi.mean(), 0.35)

    region = tissues[box]  # a view: writes go into `tissues`
    inside = region > 0
    region[inside & (edema_r <= 1.0)] = _EDEMA
    core = inside & (core_r <= 1.0)
    region[core] = _NECROSIS
    if enhancing:
        region[core & (core_r > rim_inner)] = _ENHANCING
    # on tiny grids the necrotic centre can fall between voxels: keep one voxel so every label appears
    if core.any() and not (region == _NECROSIS).any():
        flat = np.where(core, core_r, np.inf).argmin()
        region[np.unravel_index(flat, box_shape)] = _NECROSIS


def generate_case(shape: tuple[int, int, int] = (32, 32, 32), spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  seed: int = 0, enhancing: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case.

    Args:
        shape: (D, H, W) array shape.
        spacing: voxel size in mm, array axis order.
        seed: all randomness comes from `np.random.default_rng(seed)`.
        enhancing: force an enhancing rim on/off; None draws it (present in ~80% of seeds).

    Returns:
        image (4, D, H, W) float32 (T1, T1ce, T2, FLAIR; exactly 0 outside the brain, > 0 inside) and
        seg (D, H, W) uint8 with 0 background, 1 edema, 2 necrotic/non-enhancing core, 3 enhancing tumour.
    """
    shape = tuple(int(s) for s in shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 8 or len(spacing_arr) != 3 or (spacing_arr <= 0).any():
        raise ConfigError(f"synthetic data: shape {shape} / spacing {tuple(spacing)} invalid; "
                          "use three sizes >= 8 and three positive spacings")
    rng = np.random.default_rng(seed)
    has_enhancing = bool(rng.random() >= 0.2) if enhancing is None else bool(enhancing)
    tissues, centre, semi = _brain_tissues(rng, shape, spacing_arr)
    _add_tumour(rng, tissues, spacing_arr, centre, semi, has_enhancing)

    seg_of_tissue = np.array([0, 0, 0, 0, 1, 2, 3], dtype=np.uint8)
    seg = seg_of_tissue[tissues]
    brain = tissues > 0
    image = _render(rng, tissues, brain, spacing_arr)
    return image, seg


def _render(rng: np.random.Generator, tissues: np.ndarray, brain: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Intensities (4, D, H, W) float32 from the tissue map: contrasts, texture, blur, bias field, Rician noise."""
    shape = tissues.shape
    extent = np.asarray(shape) * spacing
    means = _TISSUE_MEANS * rng.uniform(0.92, 1.08, _TISSUE_MEANS.shape).astype(np.float32)
    texture = _smooth_noise(rng, shape, _cells(extent, 6.0, high=48))
    is_tumour = tissues >= _EDEMA
    channel_scale = rng.uniform(200.0, 1200.0, 4)
    image = np.empty((4,) + shape, dtype=np.float32)
    # partial-volume blur is renormalised by the blurred mask so the brain edge does not fade to zero
    weight = ndimage.gaussian_filter(brain.astype(np.float32), 0.6, mode="constant")
    for c in range(4):
        channel = means[:, c][tissues]  # (D, H, W)
        # tumour tissue is more heterogeneous than healthy tissue
        amplitude = np.where(is_tumour, np.float32(0.1), np.float32(0.04))
        channel *= 1.0 + amplitude * texture * rng.uniform(0.5, 1.5)
        channel = ndimage.gaussian_filter(channel, 0.6, mode="constant")
        channel = np.divide(channel, weight, out=np.zeros_like(channel), where=weight > 1e-3)
        bias = np.exp(0.12 * _smooth_noise(rng, shape, (3, 3, 3)))
        signal = channel * bias * np.float32(channel_scale[c])
        sigma = np.float32(0.03 * channel_scale[c])
        real = signal + sigma * rng.standard_normal(shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(shape, dtype=np.float32)
        noisy = np.sqrt(real * real + imag * imag)  # Rician: magnitude of complex Gaussian noise
        noisy[~brain] = 0.0
        # keep the brain strictly nonzero so the nonzero mask is exactly the brain
        image[c] = np.where(brain, np.maximum(noisy, np.float32(1e-3)), np.float32(0.0))
    return image


def _case_seed(seed: int, index: int) -> int:
    """Independent per-case seed from the dataset seed (not seed + index, which would overlap across datasets)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _geometry(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Geometry:
    """Axis-aligned geometry centred near the world origin (a non-trivial origin, as scanners write)."""
    geometry = Geometry.from_spacing(spacing)
    centre_index = (np.asarray(shape, dtype=float) - 1) / 2
    geometry.affine[:3, 3] = -geometry.affine[:3, :3] @ centre_index + np.array([1.5, -12.25, 7.0])
    return geometry


@dataclass(frozen=True)
class SynthOptions:
    """What `make_synthetic_dataset` writes (the one home of `voxseg synth`'s defaults)."""

    num_cases: int = 20
    """training cases (imagesTr/labelsTr)."""
    num_test: int = 0
    """test cases (imagesTs/labelsTs; in the BraTS layout without seg files)."""
    shape: tuple[int, int, int] = (64, 64, 64)
    """(D, H, W) voxels of every case."""
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """mm per voxel, array axis order."""
    seed: int = 0
    """the same seed writes the same dataset."""
    regions: bool = False
    """declare the BraTS regions (whole tumour, tumour core, enhancing) instead of the three labels."""
    layout: str = "nnunet"
    """"nnunet" (imagesTr/CASE_0000 ... with dataset.json) or "brats" (one folder per case)."""
    file_ending: str = ".nii.gz"
    """image file ending."""


def make_synthetic_dataset(out_dir: str | Path, options: SynthOptions | None = None, **fields: Any) -> Path:
    """Write a synthetic dataset and return its folder.

    layout="nnunet": nnU-Net v2 raw layout with dataset.json; cases SYN_000..., test cases continue the
    numbering in imagesTs/ with their references in labelsTs/. `regions=True` declares the BraTS regions
    (whole tumour, tumour core, enhancing) instead of the three labels; the label files are the same.
    layout="brats": BraTS 2021 folders BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz with BraTS
    label values (1 necrosis, 2 edema, 4 enhancing); test cases have no seg file. Convert with `convert_brats`.
    `options`/`fields`: what to write (`SynthOptions`; `fields` replace single ones, e.g. `num_cases=5`).
    """
    options = replace_fields(options or SynthOptions(), "synthetic data option", **fields)
    num_cases, num_test, shape, spacing = options.num_cases, options.num_test, options.shape, options.spacing
    seed, regions, layout, file_ending = options.seed, options.regions, options.layout, options.file_ending
    if layout not in ("nnunet", "brats"):
        raise ConfigError(f"synthetic data: layout '{layout}' is unknown; use 'nnunet' or 'brats'")
    if layout == "brats" and file_ending not in (".nii.gz", ".nii"):
        raise ConfigError(f"synthetic data: the BraTS layout is NIfTI; file_ending '{file_ending}' is not possible")
    if num_cases < 1 or num_test < 0:
        raise ConfigError(f"synthetic data: num_cases={num_cases}, num_test={num_test}; need at least one case")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = _geometry(shape, spacing)
    for index in range(num_cases + num_test):
        image, seg = generate_case(shape, spacing, _case_seed(seed, index))
        is_test = index >= num_cases
        if layout == "brats":
            _write_brats_case(out, index, image, seg, geometry, file_ending, with_seg=not is_test)
            continue
        name = f"SYN_{index:03d}"
        images_dir, labels_dir = ((out / "imagesTs", out / "labelsTs") if is_test
                                  else (out / "imagesTr", out / "labelsTr"))
        for channel in range(image.shape[0]):
            write_image(images_dir / f"{name}_{channel:04d}{file_ending}", image[channel], geometry)
        write_image(labels_dir / f"{name}{file_ending}", seg, geometry)
    if layout == "nnunet":
        meta = {
            "name": out.name,
            "description": f"voxseg synthetic brain tumour data (seed {seed}, shape {list(shape)}, "
                           f"spacing {list(spacing)})",
            "channel_names": dict(CHANNEL_NAMES),
            "labels": dict(REGION_LABELS) if regions else dict(LABELS),
            "numTraining": num_cases,
            "file_ending": file_ending,
        }
        if regions:
            meta["regions_class_order"] = list(REGIONS_CLASS_ORDER)
        write_json_atomic(out / "dataset.json", meta)
    return out


def _write_brats_case(out: Path, index: int, image: np.ndarray, seg: np.ndarray, geometry: Geometry,
                      ending: str, with_seg: bool) -> None:
    name = f"BraTS2021_{index:05d}"
    folder = out / name
    for channel, modality in enumerate(BRATS_MODALITIES):
        write_image(folder / f"{name}_{modality}{ending}", image[channel], geometry)
    if with_seg:
        write_image(folder / f"{name}_seg{ending}", OURS_TO_BRATS[seg], geometry)
