"""Synthetic whole-body-CT-like cases and datasets with many classes, deterministic by seed.

Each case is a body (an elliptic cylinder along the first axis: fat under the skin, soft tissue inside, air
outside) holding one ellipsoidal "organ" per foreground class, each with its own mean Hounsfield value (some
bone-like and bright, most soft-tissue-like, so neighbouring classes overlap in intensity and a model needs
their shape and place), plus Gaussian noise. Values are stored as int16 Hounsfield units, as CT is.

Built for the sizes whole-body CT brings (512 x 512 x 300 voxels and more, dozens of classes): every organ is
drawn in its own bounding box, so a 78-million-voxel case with 40 organs takes seconds.

    voxseg synth data/Dataset002_CT --kind ct --classes 41 --cases 4 --test-cases 1 --shape 300,512,512 \\
        --spacing 2.5,0.8,0.8
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from voxseg.data.io import Geometry, write_image
from voxseg.errors import ConfigError
from voxseg.jsonio import write_json_atomic

AIR, FAT, SOFT_TISSUE = -1000, -100, 40
NOISE_HU = 20.0


def class_names(num_classes: int) -> dict[str, int]:
    """{"background": 0, "organ_01": 1, ...} for `num_classes` outputs (background included)."""
    return {"background": 0, **{f"organ_{k:02d}": k for k in range(1, num_classes)}}


def generate_ct_case(shape: tuple[int, int, int] = (64, 96, 96), spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
                     num_classes: int = 41, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like case: image (1, D, H, W) int16 Hounsfield units and seg (D, H, W) uint8 (0 = background).

    Every class 1..num_classes-1 is one ellipsoid inside the body (later organs overwrite earlier ones where
    they meet; each keeps at least its centre voxel), so every case holds every class.
    """
    shape = tuple(int(s) for s in shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 8 or len(spacing_arr) != 3 or (spacing_arr <= 0).any():
        raise ConfigError(f"synthetic CT: shape {shape} / spacing {tuple(spacing)} invalid; use three sizes >= 8 "
                          "and three positive spacings")
    if not 2 <= num_classes <= 255:
        raise ConfigError(f"synthetic CT: --classes {num_classes}; use 2..255 (background included)")
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape) * spacing_arr  # mm
    image = np.full(shape, AIR, dtype=np.int16)
    seg = np.zeros(shape, dtype=np.uint8)
    # the body: an elliptic cylinder along axis 0 filling most of the in-plane field of view
    body_semi = extent[1:] * rng.uniform(0.38, 0.45, 2)
    yy = (np.arange(shape[1]) + 0.5) * spacing_arr[1] - extent[1] / 2
    xx = (np.arange(shape[2]) + 0.5) * spacing_arr[2] - extent[2] / 2
    radius = np.sqrt((yy[:, None] / body_semi[0]) ** 2 + (xx[None, :] / body_semi[1]) ** 2)  # (H, W)
    image[:, radius <= 1.0] = FAT
    image[:, radius <= 0.92] = SOFT_TISSUE
    means = rng.uniform(-60, 220, num_classes)
    means[rng.random(num_classes) < 0.15] = rng.uniform(500, 1100)  # some bone-like classes
    centres = []
    for label in range(1, num_classes):
        semi = rng.uniform(0.03, 0.12, 3) * extent.min() + 2.0 * spacing_arr  # mm, at least 2 voxels
        semi[0] *= rng.uniform(1.0, 2.0)  # organs are longer along the body's axis
        angle = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(0, 0.7) * body_semi * np.array([np.cos(angle), np.sin(angle)])
        centre = np.array([rng.uniform(0.15, 0.85) * extent[0], extent[1] / 2 + offset[0], extent[2] / 2 + offset[1]])
        _draw_ellipsoid(seg, image, label, int(round(means[label])), centre, semi, spacing_arr)
        centres.append(tuple(np.clip((centre / spacing_arr).astype(int), 0, np.asarray(shape) - 1)))
    for label, index in enumerate(centres, start=1):  # an organ covered by later ones keeps its centre
        if seg[index] != label and not (seg == label).any():
            seg[index], image[index] = label, int(round(means[label]))
    noise = rng.normal(0.0, NOISE_HU, shape).astype(np.float32)
    image = np.clip(image + noise, -1024, 3071).astype(np.int16)
    return image[None], seg


def _draw_ellipsoid(seg: np.ndarray, image: np.ndarray, label: int, value: int, centre_mm: np.ndarray,
                    semi_mm: np.ndarray, spacing: np.ndarray) -> None:
    """Set the voxels of one axis-aligned ellipsoid, visiting only its bounding box."""
    low = np.maximum(np.floor((centre_mm - semi_mm) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((centre_mm + semi_mm) / spacing).astype(int) + 1, seg.shape)
    if (high <= low).any():
        return
    axes = [((np.arange(lo, hi) + 0.5) * sp - c) / s
            for lo, hi, sp, c, s in zip(low, high, spacing, centre_mm, semi_mm)]
    inside = (axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2) <= 1.0
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    seg[box][inside] = label
    image[box][inside] = value


def make_ct_dataset(out_dir: str | Path, num_cases: int = 4, num_test: int = 0,
                    shape: tuple[int, int, int] = (64, 96, 96), spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
                    num_classes: int = 41, seed: int = 0, file_ending: str = ".nii.gz") -> Path:
    """Write a CT-like dataset in the nnU-Net v2 layout (one channel "CT", classes organ_01...) and return it."""
    from voxseg.data.synth import _case_seed, _geometry

    if num_cases < 1 or num_test < 0:
        raise ConfigError(f"synthetic CT: num_cases={num_cases}, num_test={num_test}; need at least one case")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry: Geometry = _geometry(shape, spacing)
    for index in range(num_cases + num_test):
        image, seg = generate_ct_case(shape, spacing, num_classes, _case_seed(seed, index))
        name = f"CT_{index:03d}"
        test = index >= num_cases
        images_dir, labels_dir = (out / "imagesTs", out / "labelsTs") if test else (out / "imagesTr", out / "labelsTr")
        write_image(images_dir / f"{name}_0000{file_ending}", image[0], geometry)
        write_image(labels_dir / f"{name}{file_ending}", seg, geometry)
    write_json_atomic(out / "dataset.json", {
        "name": out.name,
        "description": f"voxseg synthetic CT (seed {seed}, shape {list(shape)}, spacing {list(spacing)}, "
                       f"{num_classes} classes)",
        "channel_names": {"0": "CT"}, "labels": class_names(num_classes), "numTraining": num_cases,
        "file_ending": file_ending,
    })
    return out
