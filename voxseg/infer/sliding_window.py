"""Sliding-window inference: tiles x mirrors x folds, batched on the device.

A volume larger than the training patch is cut into overlapping tiles. The network's logits for every tile are
weighted with a Gaussian importance map (voxels near a patch's centre saw more context than those at its border,
so they are trusted more), summed into a full-size accumulator and divided by the summed weights.

What is accumulated: **logits**, as nnU-Net does. Mirrored copies (test-time augmentation) and folds (an
ensemble of models) are averaged in logit space inside the same tile pass, so the result is the weighted mean
logit over tiles x mirrors x folds; the caller applies softmax / sigmoid once at the end.

The settings of a pass (step, tile batch, mirror axes, autocast) come as one `Tiling`, which
`voxseg.infer.config.InferConfig.tiling` resolves from the inference config; the patch is the plan's.

Batching: `tile_batch` tiles are cropped at once; their mirrored copies are concatenated along the batch axis
into one forward call per model; every fold model runs on the same gathered batch. The tile loop never syncs
with the host (no `.item()`, no `.cpu()`) unless the accumulator itself had to fall back to host memory.

Memory: a forward pass holds about `voxseg.data.memory.inference_bytes_per_tile` per tile (1.8 GiB in float32
for the reference 6-stage network at 96x128x160), so tiles x mirrors in one call can exceed the machine: on
a CPU there is no out-of-memory error to catch, the kernel kills the process. `Tiling.max_forward_batch` (the
predictor computes it with `voxseg.infer.budget.forward_limit` from the memory that is free) caps the tiles x
mirrored copies of one call before anything runs, taking fewer tiles first, then fewer mirrored copies; the result
is the same.
Out of GPU memory all the same, a pass backs off step by step (`OutOfMemoryFallback`): fewer tiles per forward,
then fewer mirrored copies per forward, then the accumulator in host memory, and only then a `DeviceMemoryError`.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from voxseg.infer.budget import choose_accumulator_device, split_forward_batch
from voxseg.infer.config import Tiling
from voxseg.infer.tile_pass import (
    Collected,
    CroppedRows,
    ModelLike,
    OutOfMemoryFallback,
    RowConsumer,
    TilePass,
    accumulate_with_fallback,
)


def pad_to_patch(image: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of `image` (B, C, *S) to at least `patch_size`, centred.

    Returns:
        the padded tensor and one slice per spatial axis that crops the padded result back to S.
    """
    spatial = image.shape[2:]
    pads, crop = [], []
    for size, patch in zip(spatial, patch_size):
        total = max(int(patch) - size, 0)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    if any(sum(p) for p in pads):
        # F.pad lists the last axis first
        image = F.pad(image, [v for pair in reversed(pads) for v in pair], mode="constant", value=0.0)
    return image, tuple(crop)


def axis_starts(size: int, patch: int, step: float) -> list[int]:
    """Tile start indices along one axis (size >= patch).

    The number of tiles is the smallest that keeps neighbouring tiles at most `patch * step` apart,
    ceil((size - patch) / (patch * step)) + 1, and the starts are spread evenly from 0 to size - patch, so
    the overlap is as uniform as possible. Example: size 100, patch 64, step 0.5 -> 3 tiles at 0, 18, 36.
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch ({patch}); pad it first")
    if size == patch:
        return [0]
    num = math.ceil((size - patch) / (patch * step)) + 1
    spacing = (size - patch) / (num - 1)
    return [int(round(spacing * i)) for i in range(num)]


def tile_positions(image_shape: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple[int, ...]]:
    """Start index of every tile of `patch_size` that together cover an image of spatial shape `image_shape`.

    An axis shorter than the patch is taken as padded to the patch size (see `pad_to_patch`), so it gets a
    single tile starting at 0 in padded coordinates.
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if len(image_shape) != len(patch_size):
        raise ValueError(f"image shape {tuple(image_shape)} and patch size {tuple(patch_size)} differ in length")
    per_axis = [axis_starts(max(int(s), int(p)), int(p), step) for s, p in zip(image_shape, patch_size)]
    return list(itertools.product(*per_axis))


def gaussian_importance(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian weight map (*patch_size) centred on the patch, sigma = patch * sigma_scale per axis.

    Normalised to a maximum of 1; every value is clamped to at least the smallest nonzero value, so border
    voxels (where the Gaussian may underflow, in half precision especially) never get weight 0 and every
    voxel of the image receives a positive total weight.
    """
    # built on `device` directly: no host-to-device copy, and no boolean-mask indexing (a dynamic shape is a
    # host-device sync on CUDA), so a sliding-window pass never waits for the GPU
    weight = torch.ones((), dtype=torch.float64, device=device)
    for axis, patch in enumerate(patch_size):
        offsets = torch.arange(int(patch), dtype=torch.float64, device=device) - int(patch) // 2
        sigma = max(float(patch) * sigma_scale, 1e-6)
        profile = torch.exp(-0.5 * (offsets / sigma) ** 2)
        shape = [1] * len(patch_size)
        shape[axis] = int(patch)
        weight = weight * profile.reshape(shape)
    weight = (weight / weight.max()).to(dtype)
    smallest = torch.where(weight > 0, weight, math.inf).amin()  # smallest nonzero value, as a device tensor
    return weight.clamp(min=smallest)


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `mirror_axes` (spatial axis indices), the empty one (no flip) first."""
    axes = tuple(sorted(set(int(a) for a in mirror_axes)))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


class _SliceModel(torch.nn.Module):
    """Runs a 2D network on 3D tiles of depth 1: (B, C, 1, H, W) -> (B, K, 1, H, W)."""

    def __init__(self, model: ModelLike) -> None:
        super().__init__()
        self.model = model

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        out = self.model(tiles[:, :, 0])
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.unsqueeze(2)


def sliding_window_inference(
    model_or_fn: ModelLike | Sequence[ModelLike],
    image: torch.Tensor,
    patch_size: Sequence[int],
    num_outputs: int,
    tiling: Tiling | None = None,
    slice_axis: int = 0,
    case_name: str = "",
    consume: RowConsumer | None = None,
) -> torch.Tensor | None:
    """Blended logits of one image, averaged over tiles x mirrors x models.

    Args:
        model_or_fn: a network (or any callable) mapping (B, C, *P) to (B, K, *P) logits (a deep-supervision
            list is accepted; its first entry is used), or a list of them (folds) that are averaged.
            Models must already be on `image.device` and in eval mode.
        image: (1, C, *S) tensor on the compute device. When `patch_size` has one axis fewer than S, the
            spatial axis `slice_axis` is treated as a stack of slices for a 2D network.
        patch_size: tile size in voxels (the plan's).
        num_outputs: K, the number of output channels.
        tiling: step, tiles per forward call, mirror axes (in patch axes), autocast, blending and accumulator
            device (`voxseg.infer.config.Tiling`; `InferConfig.tiling` resolves one). None: `Tiling.default()`,
            InferConfig's step and tile batch without mirroring, in float32.
        slice_axis: for a 2D network, the spatial axis of `image` the slices are taken along (the plan's).
        case_name: the case, named in the out-of-memory message and error.
        consume: called as `consume(rows, logits)` with the finished (K, len(rows), *S[1:]) float32 logits of the
            rows `rows` of the first spatial axis, in order, each row once, as soon as no later tile touches
            them; then nothing is returned and the whole (K, *S) never exists (`StreamingRestore` takes them).

    Memory: tiles run in order of their first coordinate, and the sums live in a band as deep as the patch
    (K x patch depth x S[1] x S[2] float32, plus the weights) that moves down the image; finished rows leave it
    for `consume` (or a (K, *S) result). The sums are the same, in the same order, as with one accumulator for
    the whole image.

    Out of CUDA memory, the pass backs off (`OutOfMemoryFallback`) to the same result, or raises DeviceMemoryError.

    Returns:
        (K, *S) float32 averaged logits (on the compute device when they fit, else on the host), or None when
        `consume` takes them.
    """
    models = list(model_or_fn) if isinstance(model_or_fn, (list, tuple)) else [model_or_fn]
    patch_size = tuple(int(p) for p in patch_size)
    tiling = tiling or Tiling.default()
    mirror_axes = tiling.mirror_axes
    if image.ndim == len(patch_size) + 3:
        # 2D network over a 3D volume: tiles of depth 1 along the slice axis
        if slice_axis:
            return _slices_along(models, image, patch_size, num_outputs, tiling, slice_axis, case_name, consume)
        models = [_SliceModel(m) for m in models]
        patch_size = (1,) + patch_size
        mirror_axes = tuple(a + 1 for a in mirror_axes)
    if image.ndim != len(patch_size) + 2 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, *S) with {len(patch_size)} spatial axes, got {tuple(image.shape)}")
    return _run_pass(models, image, patch_size, num_outputs, tiling, mirror_axes, case_name, consume)


def _slices_along(models: list[ModelLike], image: torch.Tensor, patch_size: tuple[int, ...], num_outputs: int,
                  tiling: Tiling, slice_axis: int, case_name: str, consume: RowConsumer | None) -> torch.Tensor | None:
    """A 2D network over slices along `slice_axis` > 0: that axis moved first and back at the end; the whole
    logits are made (the slices run along another axis than the rows handed to `consume`)."""
    logits = sliding_window_inference(models, image.movedim(2 + slice_axis, 2), patch_size, num_outputs, tiling,
                                      case_name=case_name)
    logits = logits.movedim(1, 1 + slice_axis).contiguous()
    if consume is None:
        return logits
    consume(slice(0, logits.shape[1]), logits)
    return None


def _run_pass(models: list[ModelLike], image: torch.Tensor, patch_size: tuple[int, ...], num_outputs: int,
              tiling: Tiling, mirror_axes: tuple[int, ...], case_name: str,
              consume: RowConsumer | None) -> torch.Tensor | None:
    """The pass over a (1, C, *S) image whose spatial axes are the patch's (see `sliding_window_inference`)."""
    padded, crop = pad_to_patch(image, patch_size)
    weight = gaussian_importance(patch_size, device=image.device) if tiling.use_gaussian else \
        torch.ones(patch_size, device=image.device)
    band_shape = (int(patch_size[0]), *padded.shape[3:])
    acc_device = _accumulator_device(tiling, image.device, num_outputs, band_shape)
    mirrors = mirror_combinations(mirror_axes)
    tile_batch, mirror_group = split_forward_batch(tiling.tile_batch, len(mirrors), tiling.max_forward_batch)
    tile_pass = TilePass(models, padded, tile_positions(padded.shape[2:], patch_size, tiling.step), patch_size,
                         num_outputs, mirrors, weight, tiling.amp_dtype,
                         OutOfMemoryFallback(tile_batch, len(mirrors), case_name, mirror_group))
    collected = None
    if consume is None:  # the whole result, where it fits
        full_device = _accumulator_device(tiling, image.device, num_outputs, image.shape[2:])
        collected = Collected(num_outputs, image.shape[2:], full_device)
        consume = collected
    accumulate_with_fallback(acc_device, tile_pass, CroppedRows(crop, consume))
    tile_pass.fallback.report()
    return None if collected is None else collected.logits


def _accumulator_device(tiling: Tiling, device: torch.device, num_outputs: int,
                        spatial: Sequence[int]) -> torch.device:
    """The tiling's accumulator device when it names one, else the compute device when (K + 1) float32 values
    of `spatial` fit comfortably."""
    if tiling.accumulator_device is not None:
        return torch.device(tiling.accumulator_device)
    return choose_accumulator_device(device, num_outputs, spatial)


