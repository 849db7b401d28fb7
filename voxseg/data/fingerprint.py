"""Dataset fingerprint: the per-case geometry and dataset-wide intensity statistics the planner needs.

One pass over the training cases records, per case, the spacing, the shape before and after cropping to the
nonzero region, the voxel count of every label value and a seeded sample of foreground intensities. From those
the dataset-wide numbers are derived: per-channel foreground intensity statistics (used by CT normalisation),
mean class volumes in mm^3, and how much cropping shrank the cases (which decides whether z-scoring uses the
nonzero mask). The result is a plain JSON-serialisable dict written to `WORKDIR/fingerprint.json`.

Keys of the fingerprint (lists are in case order, spacings and shapes in array axis order):
    case_names, spacings, shapes_before_crop, shapes_after_crop, crop_bboxes,
    relative_sizes_after_crop, median_relative_size_after_cropping,
    foreground_intensity: {channel index: {mean, std, median, min, max, percentile_00_5, percentile_99_5,
        num_samples}},
    class_voxel_counts: {label value: [count per case]}, class_volumes_mm3: {label value: mean over cases},
    channel_names, num_cases, samples_per_case, seed.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.data.dataset import RawCase, RawDataset
from voxseg.data.io import read_channels, read_image
from voxseg.errors import DatasetError
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.workdir import WorkDir
from voxseg.workers import exit_with_parent


def nonzero_bbox(image: np.ndarray, seg: np.ndarray | None = None) -> list[list[int]]:
    """Bounding box `[[start, stop], ...]` (stop exclusive) of voxels where any channel is nonzero.

    The label's nonzero voxels are included too, so cropping never cuts away annotated foreground. A case with
    no nonzero voxel at all keeps its full extent.

    Args:
        image: (C, D, H, W) channels.
        seg: (D, H, W) labels or None.
    """
    mask = np.any(image != 0, axis=0)  # (D, H, W)
    if seg is not None:
        mask |= seg != 0
    return mask_bbox(mask)


def mask_bbox(mask: np.ndarray) -> list[list[int]]:
    """`[[start, stop], ...]` (stop exclusive) of a boolean mask's True voxels; the full extent if it has none."""
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    return bbox


def case_fingerprint(
    case: RawCase, samples_per_case: int = 10000, seed: int = 0, ignore_label: int | None = None
) -> dict[str, Any]:
    """Fingerprint of one case (reads its files). Foreground = label > 0 and not the ignore label."""
    image, geometry = read_channels(case.image_files)  # (C, D, H, W)
    if case.label_file is None:
        raise DatasetError(f"case {case.name}: no label file; the fingerprint needs labelled training cases")
    seg, _ = read_image(case.label_file)
    if seg.shape != image.shape[1:]:
        raise DatasetError(
            f"case {case.name}: label shape {seg.shape} differs from image shape {image.shape[1:]}; "
            "run 'voxseg check' and fix the case"
        )
    seg = np.rint(seg).astype(np.int64) if np.issubdtype(seg.dtype, np.floating) else seg.astype(np.int64)
    bbox = nonzero_bbox(image, seg)
    shape_after = [stop - start for start, stop in bbox]
    foreground = seg > 0
    if ignore_label is not None:
        foreground &= seg != ignore_label
    # fixed-size seeded sample of foreground voxels, the same voxels for every channel
    indices = np.flatnonzero(foreground)
    rng = np.random.default_rng(seed)
    if indices.size > samples_per_case:
        indices = np.sort(rng.choice(indices, samples_per_case, replace=False))
    samples = image.reshape(image.shape[0], -1)[:, indices]  # (C, N)
    values, counts = np.unique(seg, return_counts=True)
    return {
        "name": case.name,
        "spacing": [float(s) for s in geometry.spacing],
        "shape_before_crop": [int(s) for s in seg.shape],
        "shape_after_crop": [int(s) for s in shape_after],
        "crop_bbox": bbox,
        "relative_size_after_crop": float(np.prod(shape_after) / np.prod(seg.shape)),
        "class_voxel_counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "foreground_samples": samples.astype(np.float32),
    }


def _case_job(args: tuple[RawCase, int, int, int | None]) -> dict[str, Any]:
    return case_fingerprint(*args)


def intensity_statistics(samples: np.ndarray) -> dict[str, float | int | None]:
    """mean, std, median, min, max and the 0.5 / 99.5 percentiles of a 1D sample (None when empty)."""
    keys = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    if samples.size == 0:
        return {**{k: None for k in keys}, "num_samples": 0}
    samples = samples.astype(np.float64)
    low, median, high = np.percentile(samples, [0.5, 50.0, 99.5])
    return {
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "median": float(median),
        "min": float(samples.min()),
        "max": float(samples.max()),
        "percentile_00_5": float(low),
        "percentile_99_5": float(high),
        "num_samples": int(samples.size),
    }


def compute_fingerprint(
    dataset: RawDataset, num_workers: int = 1, samples_per_case: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Fingerprint every training case of `dataset` (in parallel processes when num_workers > 1).

    Args:
        dataset: the raw dataset (its training cases are read; test cases are ignored).
        num_workers: worker processes; cases are independent, so this scales until the disk saturates.
        samples_per_case: foreground voxels sampled per case for the intensity statistics; sampling keeps
            large cases from dominating and bounds memory.
        seed: the sample of case i is drawn with seed + i, so results do not depend on num_workers.

    Returns:
        the fingerprint dict described in the module docstring.
    """
    if not dataset.cases:
        raise DatasetError(f"{dataset.root}: no training cases found in imagesTr/; nothing to fingerprint")
    labels = dataset.labels
    ignore = int(labels["ignore"]) if "ignore" in labels else None
    jobs = [(case, samples_per_case, seed + i, ignore) for i, case in enumerate(dataset.cases)]
    if num_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), initializer=exit_with_parent) as pool:
            cases = list(pool.map(_case_job, jobs))
    else:
        cases = [_case_job(job) for job in jobs]
    return summarize_cases(cases, dataset.channel_names, samples_per_case, seed)


def summarize_cases(
    cases: list[dict[str, Any]], channel_names: dict[str, str], samples_per_case: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Combine per-case fingerprints (from `case_fingerprint`) into the dataset fingerprint."""
    num_channels = len(channel_names)
    samples = np.concatenate([c["foreground_samples"] for c in cases], axis=1)  # (C, N)
    label_values = sorted({int(v) for c in cases for v in c["class_voxel_counts"]})
    counts = {str(v): [int(c["class_voxel_counts"].get(str(v), 0)) for c in cases] for v in label_values}
    voxel_mm3 = [float(np.prod(c["spacing"])) for c in cases]
    volumes = {v: float(np.mean([n * mm3 for n, mm3 in zip(per_case, voxel_mm3)])) for v, per_case in counts.items()}
    relative = [c["relative_size_after_crop"] for c in cases]
    return {
        "num_cases": len(cases),
        "channel_names": dict(channel_names),
        "case_names": [c["name"] for c in cases],
        "spacings": [c["spacing"] for c in cases],
        "shapes_before_crop": [c["shape_before_crop"] for c in cases],
        "shapes_after_crop": [c["shape_after_crop"] for c in cases],
        "crop_bboxes": [c["crop_bbox"] for c in cases],
        "relative_sizes_after_crop": relative,
        "median_relative_size_after_cropping": float(np.median(relative)),
        "foreground_intensity": {str(ch): intensity_statistics(samples[ch]) for ch in range(num_channels)},
        "class_voxel_counts": counts,
        "class_volumes_mm3": volumes,
        "samples_per_case": int(samples_per_case),
        "seed": int(seed),
    }


def save_fingerprint(path: str | Path, fingerprint: dict[str, Any]) -> None:
    """Write fingerprint.json atomically."""
    write_json_atomic(path, fingerprint)


def load_fingerprint(path: str | Path) -> dict[str, Any]:
    """Read fingerprint.json (a work directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = WorkDir(path).fingerprint
    return read_json(path, DatasetError, missing="run 'voxseg plan DATASET -o WORKDIR' first",
                     invalid="delete it and re-run 'voxseg plan'")
