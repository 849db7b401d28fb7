"""The preprocessed case store: one folder, four files per case.

```
CASE.npy       (C, D, H, W) float16 or float32 image, memory-mappable (np.load(mmap_mode="r"))
CASE_seg.npy   (1, D, H, W) int8 label values; -1 marks background outside the nonzero crop
CASE_fg.npz    "label_<value>" -> (N, 3) int32 voxel coordinates of that label (random subset)
CASE.json      properties (see docs/ARCHITECTURE.md); written last, so its presence marks a complete case
```
Plain `.npy` rather than compressed `.npz` because a training patch is a small window of a case: a
memory-mapped `.npy` reads only the pages the window touches, while a compressed archive must be inflated
whole (see benchmarks/preprocess_bench.py for the numbers).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from voxseg.atomicio import atomic_open, write_bytes
from voxseg.errors import DatasetError
from voxseg.jsonio import read_json

FG_KEY_PREFIX = "label_"
DEFAULT_MAX_PER_LABEL = 10000


def case_paths(directory: str | Path, name: str) -> dict[str, Path]:
    directory = Path(directory)
    return {
        "image": directory / f"{name}.npy",
        "seg": directory / f"{name}_seg.npy",
        "properties": directory / f"{name}.json",
        "foreground": directory / f"{name}_fg.npz",
    }


def save_case(
    directory: str | Path,
    name: str,
    image: np.ndarray,
    seg: np.ndarray | None,
    properties: dict[str, Any],
    foreground_locations: dict[int, np.ndarray] | None = None,
    image_dtype: str | None = None,
) -> None:
    """Write one preprocessed case atomically; CASE.json goes last and marks the case complete.

    Args:
        directory: the preprocessed folder (created if missing).
        name: case name.
        image: (C, D, H, W) float image.
        seg: (1, D, H, W) label values (stored as int8), or None for an image-only case.
        properties: JSON-serialisable dict (CASE.json).
        foreground_locations: {label value: (N, 3) coordinates}; stored as int32.
        image_dtype: "float16" / "float32" to cast the image to; None keeps its dtype.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = case_paths(directory, name)
    # an overwrite first removes the completion marker, so a crash half-way never leaves new arrays that an
    # old CASE.json vouches for
    paths["properties"].unlink(missing_ok=True)
    image = np.ascontiguousarray(image, dtype=np.dtype(image_dtype) if image_dtype else None)
    with atomic_open(paths["image"]) as handle:
        np.save(handle, image)
    if seg is not None:
        with atomic_open(paths["seg"]) as handle:
            np.save(handle, np.ascontiguousarray(seg).astype(np.int8, copy=False))
    else:
        paths["seg"].unlink(missing_ok=True)
    arrays = {f"{FG_KEY_PREFIX}{int(k)}": np.asarray(v, dtype=np.int32).reshape(-1, 3)
              for k, v in (foreground_locations or {}).items()}
    with atomic_open(paths["foreground"]) as handle:
        np.savez(handle, **arrays)
    write_bytes(paths["properties"], json.dumps(properties, indent=2).encode() + b"\n")


def load_properties(directory: str | Path, name: str) -> dict[str, Any]:
    return read_json(case_paths(directory, name)["properties"], DatasetError,
                     missing=f"case '{name}' is not preprocessed (or incomplete); run 'voxseg preprocess WORKDIR'",
                     invalid="delete it and run 'voxseg preprocess WORKDIR' again")


def load_case(
    directory: str | Path, name: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Load (image (C,D,H,W), seg (1,D,H,W) int8 or None, properties); memory-mapped read-only when mmap."""
    properties = load_properties(directory, name)
    paths = case_paths(directory, name)
    mode = "r" if mmap else None
    try:
        image = np.load(paths["image"], mmap_mode=mode)
        seg = np.load(paths["seg"], mmap_mode=mode) if paths["seg"].is_file() else None
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"{paths['image'].parent}: arrays of case '{name}' cannot be read ({exc}); "
            "delete the case's files and run 'voxseg preprocess WORKDIR' again"
        ) from None
    return image, seg, properties


def load_foreground_locations(directory: str | Path, name: str) -> dict[int, np.ndarray]:
    """{label value: (N, 3) int32 voxel coordinates}; a label absent from the case maps to a (0, 3) array."""
    path = case_paths(directory, name)["foreground"]
    if not path.is_file():
        raise DatasetError(f"{path}: missing; run 'voxseg preprocess WORKDIR' again")
    with np.load(path) as data:
        return {int(key[len(FG_KEY_PREFIX):]): data[key] for key in data.files if key.startswith(FG_KEY_PREFIX)}


def list_cases(directory: str | Path) -> list[str]:
    """Names of the complete cases (CASE.json and CASE.npy present), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = []
    for path in directory.glob("*.json"):
        if path.name.startswith("."):
            continue
        name = path.name[: -len(".json")]
        if case_paths(directory, name)["image"].is_file():
            names.append(name)
    return sorted(names)


def seed_from_name(name: str) -> int:
    """A stable seed from a case name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


def sample_foreground_locations(
    seg: np.ndarray,
    labels: Iterable[int],
    max_per_label: int = DEFAULT_MAX_PER_LABEL,
    seed: int | str = 0,
) -> dict[int, np.ndarray]:
    """Random voxel coordinates of each label value, for foreground oversampling.

    Args:
        seg: (D, H, W) or (1, D, H, W) label map.
        labels: label values to sample (values, not regions: a region sampler unions its members' lists).
        max_per_label: at most this many coordinates per value (all of them when fewer).
        seed: int, or a case name (hashed stably) so that re-running gives the same samples.

    Returns:
        {value: (N, 3) int32 coordinates in (D, H, W) order, sorted in memory order}; (0, 3) when absent.
    """
    seg = np.asarray(seg)
    if seg.ndim == 4:
        seg = seg[0]
    rng = np.random.default_rng(seed_from_name(seed) if isinstance(seed, str) else seed)
    flat = seg.reshape(-1)
    out = {}
    for value in labels:
        index = np.flatnonzero(flat == value)
        if index.size > max_per_label:
            # sorted so that a later read of these voxels walks memory forward
            index = np.sort(rng.choice(index, size=max_per_label, replace=False))
        out[int(value)] = np.stack(np.unravel_index(index, seg.shape), axis=1).astype(np.int32)
    return out
