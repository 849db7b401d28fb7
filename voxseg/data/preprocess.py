"""Preprocessing: crop to the nonzero region, normalise per channel, resample to the plan's target spacing.

The same `preprocess_case` serves training (with a label map) and inference (without one), so a model
always sees inputs prepared one way; `restore_to_original` undoes the geometric part for predictions.
Cropping is a numpy slice on the host; the arithmetic (statistics, normalisation, resampling) runs in torch on
`device`, so a GPU can do the heavy part when one is present. Prediction uses `preprocess_image`, whose result
stays on that device: read -> host -> device once -> network, never back to the host in between.

Order follows nnU-Net: crop -> normalise -> resample. Normalising before resampling keeps the z-score
statistics those of the voxels actually acquired, not of interpolated ones. Resampling follows nnU-Net's
rule too (see `voxseg.data.resample`): images with third-order splines, labels by their linearly resampled
masks, a coarse axis decided per case and resampled separately with nearest values; predictions go back
as linearly resampled logits, activated on the original grid.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from voxseg.atomicio import os_error_message, sweep_stale_temporaries
from voxseg.data.fingerprint import mask_bbox
from voxseg.data.io import Geometry, read_channels, read_image
from voxseg.data.resample import ANISOTROPY_RATIO, OUTPUT_ORDER, resample, separate_axis
from voxseg.data.store import case_paths, load_properties, sample_foreground_locations, save_case
from voxseg.errors import DatasetError, InputError, VoxsegError
from voxseg.locks import folder_lock
from voxseg.normalization import normalize
from voxseg.plans import Plan
from voxseg.workdir import WorkDir
from voxseg.workers import exit_with_parent

__all__ = ["resample", "separate_axis", "ANISOTROPY_RATIO", "preprocess_case", "preprocess_image",
           "restore_to_original", "preprocess_dataset", "plan_hash", "new_shape_for_spacing"]

PREPROCESS_VERSION = 3  # bump when the preprocessing code changes what it writes: every case is re-done
OUTSIDE_LABEL = -1  # background outside the nonzero mask, stored in CASE_seg.npy; losses treat it as background
FLOAT16_MAX = 65504.0


def plan_hash(plan: Plan) -> str:
    """Hash of the plan fields that change what preprocessing writes (stored in every CASE.json)."""
    relevant = {
        "version": PREPROCESS_VERSION,
        "target_spacing": [float(s) for s in plan.target_spacing],
        "normalization": [vars(n) for n in plan.normalization],
        "image_dtype": plan.image_dtype,
        "labels": plan.labels,
        "channel_names": plan.channel_names,
    }
    if plan.keep_slice_spacing:  # only then: the hashes of other plans stay as they were
        relevant["keep_slice_spacing"] = plan.slice_axis
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def new_shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """The shape at the target spacing: round(spacing / target * shape) per axis, at least 1 (nnU-Net's rule)."""
    return [max(1, int(round(float(sp) / float(t) * int(s)))) for s, sp, t in zip(shape, spacing, target)]


def nonzero_bbox(image: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Nonzero mask of a (C, D, H, W) image and its bounding box [[d0, d1], [h0, h1], [w0, w1]].

    The mask is where any channel is nonzero, with its holes filled (zero voxels enclosed by nonzero ones, e.g.
    an air cavity in a skull-stripped brain, belong to the object), as nnU-Net builds it: the z-score statistics
    of `use_nonzero_mask` channels include them and they are normalised rather than set to 0. An all-zero image
    keeps its full extent.
    """
    mask = ndimage.binary_fill_holes(np.any(image != 0, axis=0))  # (D, H, W)
    return mask, mask_bbox(mask)


def _slices(bbox: list[list[int]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in bbox)


def preprocess_case(
    image: np.ndarray,
    geometry: Geometry,
    plan: Plan,
    seg: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    name: str = "",
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Crop, normalise and resample one case (the preprocessed case store's arrays, on the host).

    Args:
        image: (C, D, H, W) float image in the raw geometry.
        geometry: its Geometry (spacing and affine).
        plan: the plan (target spacing, normalisation).
        seg: (D, H, W) integer label map on the same grid, or None at inference.
        device: where the normalisation and resampling run ("cpu", "cuda", ...).
        name: case name recorded in the properties.

    Returns:
        (image (C, d, h, w) float32, seg (1, d, h, w) int8 or None, properties dict, JSON-serialisable).
    """
    _check_image(image, plan, name)
    if seg is not None and tuple(seg.shape) != tuple(image.shape[1:]):
        raise DatasetError(f"case '{name}': label shape {tuple(seg.shape)} differs from the image's "
                           f"{tuple(image.shape[1:])}")
    image_pp, properties, mask = _preprocess_image(image, geometry, plan, device, name)
    seg_pp = None
    if seg is not None:
        seg_pp = _preprocess_labels(seg, mask, plan, properties, device, name)
    return image_pp.cpu().numpy(), seg_pp, properties


def preprocess_image(image: np.ndarray, geometry: Geometry, plan: Plan, device: str | torch.device = "cpu",
                     name: str = "") -> tuple[torch.Tensor, dict[str, Any]]:
    """`preprocess_case` for prediction: the (C, d, h, w) float32 network input stays a tensor on `device`.

    The image crosses from the host to the device once (the cropped box, with its nonzero mask) and is not
    copied back: on a GPU, prediction hands it to the network where it already is.
    """
    _check_image(image, plan, name)
    image_pp, properties, _ = _preprocess_image(image, geometry, plan, device, name)
    return image_pp, properties


def _check_image(image: np.ndarray, plan: Plan, name: str) -> None:
    if image.ndim != 4 or image.shape[0] != plan.num_channels:
        raise InputError(f"case '{name}': image shape {image.shape} is not (C={plan.num_channels}, D, H, W) as the "
                         "plan expects")


def _preprocess_image(image: np.ndarray, geometry: Geometry, plan: Plan, device: str | torch.device,
                      name: str) -> tuple[torch.Tensor, dict[str, Any], np.ndarray]:
    """(C, d, h, w) preprocessed image on `device`, the properties and the (D, H, W) nonzero mask (host)."""
    _check_finite(image, name)
    spacing = [float(s) for s in geometry.spacing]
    mask, bbox = nonzero_bbox(image)
    box = _slices(bbox)
    crop_np = np.ascontiguousarray(image[(slice(None), *box)], dtype=np.float32)
    if np.may_share_memory(crop_np, image):
        crop_np = crop_np.copy()  # normalisation works in place: never on the caller's (maybe read-only) array
    # the one host -> device copy of the image (the cropped box) and of its mask
    cropped = torch.from_numpy(crop_np).to(device)
    mask_t = torch.from_numpy(np.ascontiguousarray(mask[box])).to(device)
    cropped, stats = normalize(cropped, mask_t, plan.normalization)  # (C, d, h, w)
    shape_after_crop = [int(s) for s in cropped.shape[1:]]
    target = plan.case_target_spacing(spacing)
    new_shape = new_shape_for_spacing(shape_after_crop, spacing, target)
    axis = separate_axis(spacing, target)  # decided per case; the plan's axis is only recorded
    image_pp = resample(cropped, new_shape, is_label=False, anisotropy_axis=axis)
    properties = {
        "name": name,
        "original_shape": [int(s) for s in image.shape[1:]],
        "original_spacing": spacing,
        "affine": geometry.to_list(),
        "crop_bbox": bbox,
        "shape_after_crop": shape_after_crop,
        "shape_after_resample": new_shape,
        "target_spacing": target,
        "anisotropy_axis": axis,
        "normalization_stats": stats,
        "plan_hash": plan_hash(plan),
        "channel_files": [],
        "label_file": None,
    }
    return image_pp, properties, mask


def _preprocess_labels(seg: np.ndarray, mask: np.ndarray, plan: Plan, properties: dict[str, Any],
                       device: str | torch.device, name: str) -> np.ndarray:
    """(1, d, h, w) int8 label map on the preprocessed grid: cropped like the image, -1 outside the nonzero mask
    (when a channel normalises within it), resampled by its masks."""
    box = _slices(properties["crop_bbox"])
    seg_crop = _checked_labels(seg, name)[box]
    if any(n.use_nonzero_mask for n in plan.normalization):
        seg_crop = np.where((seg_crop == 0) & ~mask[box], OUTSIDE_LABEL, seg_crop).astype(np.int8)
    seg_t = torch.from_numpy(np.ascontiguousarray(seg_crop)).to(device)[None]  # (1, d, h, w)
    return resample(seg_t, properties["shape_after_resample"], is_label=True,
                    anisotropy_axis=properties["anisotropy_axis"]).cpu().numpy().astype(np.int8)


def _check_finite(image: np.ndarray, name: str) -> None:
    """NaN/Inf would spread through normalisation and silently empty the prediction: refuse them by name."""
    for channel, values in enumerate(image):
        if not np.isfinite(values).all():
            count = int(values.size - np.isfinite(values).sum())
            raise InputError(f"case '{name}': channel {channel} has {count} NaN/Inf voxel(s); replace them (e.g. with "
                             "0) or re-export the image ('voxseg check' lists every such file)")


def _checked_labels(seg: np.ndarray, name: str) -> np.ndarray:
    """Label map as int8, refusing values that are negative, fractional or above 127 (int8 storage)."""
    if seg.size and (seg.min() < 0 or seg.max() > 127):
        raise DatasetError(f"case '{name}': label values must lie in 0..127, found {seg.min()}..{seg.max()}; fix the "
                           "label file")
    if np.issubdtype(seg.dtype, np.floating) and not np.array_equal(seg, np.round(seg)):
        raise DatasetError(f"case '{name}': label map holds non-integer values; labels must be integers")
    return seg.astype(np.int8)


def restore_to_original(
    array: np.ndarray | torch.Tensor,
    properties: dict[str, Any],
    is_label: bool,
    device: str | torch.device = "cpu",
    background_channel: bool = True,
    as_tensor: bool = False,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray | torch.Tensor:
    """Map a prediction at the target spacing back onto the case's original grid.

    Args:
        array: (d, h, w) labels or (K, d, h, w) logits / probabilities, shape_after_resample; numpy or torch.
        properties: the case's properties from `preprocess_case`.
        is_label: labels are resampled without creating values; logits / probabilities linearly.
        device: where the resampling runs.
        background_channel: probabilities only: outside the crop box channel 0 is set to 1 and the others
            to 0 (softmax outputs, channel 0 = background). Pass False for region (sigmoid) outputs, which have
            no background channel: then every channel is 0 outside.
        as_tensor: return a tensor on `device` instead of a numpy array (no device-to-host copy).
        activation: applied to the resampled values before they are pasted into the crop box, e.g. a softmax
            when `array` holds logits (nnU-Net resamples logits, then activates them).

    Returns:
        (D, H, W) labels (input dtype; -1 "outside" values become 0) or (K, D, H, W) float32 probabilities.
    """
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = np.array(array)  # a memory-mapped case: torch refuses to wrap read-only memory
    tensor = torch.as_tensor(array).to(device)
    if is_label and tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or list(tensor.shape[1:]) != list(properties["shape_after_resample"]):
        raise InputError(
            f"case '{properties.get('name', '')}': prediction shape {tuple(array.shape)} does not match the "
            f"preprocessed shape {properties['shape_after_resample']}"
        )
    shape_after_crop = [int(s) for s in properties["shape_after_crop"]]
    axis = _restore_axis(properties) if list(tensor.shape[1:]) != shape_after_crop else None
    restored = resample(tensor, shape_after_crop, is_label, axis, order=OUTPUT_ORDER)
    if activation is not None:
        restored = activation(restored)
    shape = (restored.shape[0], *properties["original_shape"])
    out = torch.zeros(shape, dtype=restored.dtype, device=restored.device)
    if is_label:
        restored = restored.clamp_min(0)
    elif background_channel:
        out[0] = 1.0
    out[(slice(None), *_slices(properties["crop_bbox"]))] = restored
    result = out[0] if is_label else out
    return result if as_tensor else result.cpu().numpy()


def _restore_axis(properties: dict[str, Any]) -> int | None:
    """The separate axis from the target spacing back to the case's (nnU-Net asks in this order)."""
    try:
        return separate_axis(properties["target_spacing"], properties["original_spacing"])
    except KeyError as exc:
        raise InputError(f"case '{properties.get('name', '')}': its properties lack {exc}; preprocess the case "
                         "again with this voxseg version") from None


# ----- whole dataset ------------------------------------------------------------------------------------------
def _is_complete(directory: Path, name: str, expected_hash: str) -> bool:
    paths = case_paths(directory, name)
    if not (paths["properties"].is_file() and paths["image"].is_file() and paths["seg"].is_file()):
        return False
    try:
        if load_properties(directory, name).get("plan_hash") != expected_hash:
            return False
    except DatasetError:
        return False
    return all(_whole_array(paths[key]) for key in ("image", "seg"))


def _whole_array(path: Path) -> bool:
    """Whether a stored .npy holds all the data its header declares (a truncated or altered file is redone)."""
    try:
        np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return False
    return True


def _preprocess_one(case: Any, plan: Plan, out_dir: str, device: str, threads: int) -> tuple[str, int, str | None]:
    """Worker: read, preprocess and store one training case. Returns (name, raw bytes, error message or None)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        image, geometry = read_channels(case.image_files)
        seg, _ = read_image(case.label_file) if case.label_file is not None else (None, None)
        image_pp, seg_pp, properties = preprocess_case(image, geometry, plan, seg, device=device, name=case.name)
        properties["channel_files"] = [str(p) for p in case.image_files]
        properties["label_file"] = str(case.label_file) if case.label_file is not None else None
        if plan.image_dtype == "float16" and image_pp.size and float(np.abs(image_pp).max()) > FLOAT16_MAX:
            raise DatasetError(
                f"case '{case.name}': normalised intensities exceed the float16 range; set \"image_dtype\": "
                "\"float32\" in plans.json or use a normalisation scheme other than 'none'"
            )
        fg = sample_foreground_locations(seg_pp, plan.foreground_labels, seed=case.name) if seg_pp is not None else {}
        save_case(out_dir, case.name, image_pp, seg_pp, properties, fg, image_dtype=plan.image_dtype)
        return case.name, int(image.nbytes), None
    except VoxsegError as exc:
        return case.name, 0, str(exc)
    except OSError as exc:  # a file that cannot be read or written: its path and the cause
        return case.name, 0, os_error_message(exc)
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others; reported at the end
        return case.name, 0, f"{type(exc).__name__}: {exc}"


def _pool_context(device: str) -> Any:
    """fork starts workers fast and needs no `if __name__ == "__main__"` guard; CUDA cannot survive a fork."""
    cuda = str(device).startswith("cuda")
    return get_context("spawn" if cuda or os.name != "posix" else "fork")


def _run_cases(todo: list, plan: Plan, out_dir: Path, device: str, num_workers: int,
               advance: Callable[[], Any]) -> tuple[int, list[str]]:
    """Preprocess `todo` in this process or a pool of `num_workers`; (decoded bytes, ["case: why"] failures).
    `advance()` is called once per finished case."""
    failures, nbytes = [], 0
    num_workers = max(1, min(int(num_workers), len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // num_workers) if num_workers > 1 else 0
    if num_workers == 1:
        for name, size, error in (_preprocess_one(case, plan, str(out_dir), device, threads) for case in todo):
            nbytes += size
            failures += [f"{name}: {error}"] if error else []
            advance()
        return nbytes, failures
    with ProcessPoolExecutor(num_workers, mp_context=_pool_context(device), initializer=exit_with_parent) as pool:
        futures = {pool.submit(_preprocess_one, c, plan, str(out_dir), device, threads): c.name for c in todo}
        for future in as_completed(futures):
            try:
                name, size, error = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker killed (e.g. out of memory) fails its case
                name, size, error = futures[future], 0, f"worker process died ({type(exc).__name__}: {exc})"
            nbytes += size
            failures += [f"{name}: {error}"] if error else []
            advance()
    return nbytes, failures


def preprocess_dataset(
    workdir: str | Path, num_workers: int = 1, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Preprocess every training case of the plan's raw dataset into WORKDIR/preprocessed.

    Idempotent: a case whose CASE.json records the current plan hash is skipped; a changed plan re-does it.
    Cases run in a pool of `num_workers` processes (forked on CPU; spawned for CUDA, which needs the caller's
    script to have an `if __name__ == "__main__":` guard).

    Returns:
        {"done", "skipped", "seconds", "cases_per_s", "mb_per_s"}; mb_per_s counts decoded raw image data
        (float32) of the cases done.

    Raises:
        DatasetError: after all other cases finished, listing each failed case and why.
    """

    from voxseg.data.dataset import load_dataset

    workdir = WorkDir(workdir)
    plan = Plan.load(workdir.plans)
    dataset = load_dataset(plan.raw_dataset)
    out_dir = workdir.preprocessed
    with folder_lock(out_dir, "preprocessing into this case store"):
        return _preprocess_locked(plan, dataset, out_dir, device, num_workers, progress)


def _preprocess_locked(plan: Plan, dataset: Any, out_dir: Path, device: str, num_workers: int,
                       progress: bool) -> dict[str, Any]:
    """`preprocess` with the case store locked: a second preprocess of the same store is refused."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out_dir)  # left by a killed run; hidden files, but they hold disk space
    expected = plan_hash(plan)
    todo = [case for case in dataset.cases if not _is_complete(out_dir, case.name, expected)]
    skipped = len(dataset.cases) - len(todo)
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress) as bar:
        nbytes, failures = _run_cases(todo, plan, out_dir, device, num_workers, bar.update)
    seconds = time.perf_counter() - start
    if failures:
        raise DatasetError(f"preprocessing failed for {len(failures)} case(s):\n  " + "\n  ".join(sorted(failures)))
    done = len(todo)
    return {
        "done": done,
        "skipped": skipped,
        "seconds": seconds,
        "cases_per_s": done / seconds if seconds > 0 else 0.0,
        "mb_per_s": nbytes / 1e6 / seconds if seconds > 0 else 0.0,
    }
