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
a CPU there is no out-of-memory error to catch, the kernel kills the process. `max_forward_batch` (the
predictor computes it with `voxseg.infer.budget.forward_limit` from the memory that is free) caps the tiles x
mirrored copies of one call before anything runs, taking fewer tiles first, then fewer mirrored copies; the result
is the same.
Out of GPU memory all the same, a pass backs off step by step (`OutOfMemoryFallback`): fewer tiles per forward,
then fewer mirrored copies per forward, then the accumulator in host memory, and only then a `DeviceMemoryError`.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from voxseg.errors import DeviceMemoryError
from voxseg.infer.budget import choose_accumulator_device, split_forward_batch
from voxseg.infer.config import Tiling

ModelLike = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


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
    max_forward_batch: int | None = None,
) -> torch.Tensor:
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
        max_forward_batch: the most tiles (mirrored copies included) one forward call may hold (None: tile_batch
            x mirrors); see `voxseg.infer.budget.forward_batch_limit`.

    Out of CUDA memory, the pass backs off (`OutOfMemoryFallback`) to the same result, or raises DeviceMemoryError.

    Returns:
        (K, *S) float32 averaged logits, where they were accumulated.
    """
    models = list(model_or_fn) if isinstance(model_or_fn, (list, tuple)) else [model_or_fn]
    patch_size = tuple(int(p) for p in patch_size)
    tiling = tiling or Tiling.default()
    mirror_axes = tiling.mirror_axes
    if image.ndim == len(patch_size) + 3:
        # 2D network over a 3D volume: tiles of depth 1 along the slice axis, moved first (and back at the end)
        if slice_axis:
            logits = sliding_window_inference(models, image.movedim(2 + slice_axis, 2), patch_size, num_outputs,
                                              tiling, case_name=case_name, max_forward_batch=max_forward_batch)
            return logits.movedim(1, 1 + slice_axis).contiguous()
        models = [_SliceModel(m) for m in models]
        patch_size = (1,) + patch_size
        mirror_axes = tuple(a + 1 for a in mirror_axes)
    if image.ndim != len(patch_size) + 2 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, *S) with {len(patch_size)} spatial axes, got {tuple(image.shape)}")
    padded, crop = pad_to_patch(image, patch_size)
    weight = gaussian_importance(patch_size, device=image.device) if tiling.use_gaussian else \
        torch.ones(patch_size, device=image.device)
    acc_device = _accumulator_device(tiling, image.device, num_outputs, padded.shape[2:])
    mirrors = mirror_combinations(mirror_axes)
    tile_batch, mirror_group = split_forward_batch(tiling.tile_batch, len(mirrors), max_forward_batch)
    tile_pass = TilePass(models, padded, tile_positions(padded.shape[2:], patch_size, tiling.step), patch_size,
                         num_outputs, mirrors, weight, tiling.amp_dtype,
                         OutOfMemoryFallback(tile_batch, len(mirrors), case_name, mirror_group))
    logits = _accumulate_with_fallback(acc_device, tile_pass)[(slice(None),) + crop]
    tile_pass.fallback.report()
    return logits


def _accumulator_device(tiling: Tiling, device: torch.device, num_outputs: int,
                        spatial: Sequence[int]) -> torch.device:
    """The tiling's accumulator device when it names one, else the compute device when the accumulators fit."""
    if tiling.accumulator_device is not None:
        return torch.device(tiling.accumulator_device)
    return choose_accumulator_device(device, num_outputs, spatial)


class OutOfMemoryFallback:
    """How far a sliding-window pass had to back off after CUDA out-of-memory errors, and the one report of it.

    A forward that runs out is retried with a smaller forward batch (tiles x mirrored copies): half the tiles,
    down to 1 (`tile_batch`), then half the mirrored copies, down to 1 (`mirror_group`). When that is not
    enough, or the accumulator itself does not fit, the pass starts again with the accumulator in host memory
    (`host_accumulator`); only then `error()` names the case and what to try. The result does not depend on
    the fallback taken: the same tiles are summed in the same order. `report()` writes one line on stderr.
    """

    def __init__(self, tile_batch: int, num_mirrors: int, case_name: str = "",
                 mirror_group: int | None = None) -> None:
        self.requested_tile_batch = tile_batch
        self.tile_batch = tile_batch
        self.requested_mirror_group = num_mirrors if mirror_group is None else mirror_group
        self.mirror_group = self.requested_mirror_group
        self.num_mirrors = num_mirrors
        self.host_accumulator = False
        self.case_name = case_name

    def shrink(self) -> bool:
        """Halve the tiles per forward, else the mirrored copies per forward; False when both are at 1."""
        if self.tile_batch > 1:
            self.tile_batch = max(1, self.tile_batch // 2)
        elif self.mirror_group > 1:
            self.mirror_group = max(1, self.mirror_group // 2)
        else:
            return False
        return True

    def taken(self) -> list[str]:
        """The fallbacks taken, in words (empty when none)."""
        steps = []
        if self.tile_batch != self.requested_tile_batch:
            steps.append(f"{self.tile_batch} tile(s) per forward pass instead of {self.requested_tile_batch}")
        if self.mirror_group != self.requested_mirror_group:
            steps.append(f"{self.mirror_group} of the {self.num_mirrors} mirrored copies per forward pass")
        if self.host_accumulator:
            steps.append("the accumulator in host memory")
        return steps

    def report(self) -> None:
        """One line on stderr when a fallback was taken."""
        steps = self.taken()
        if steps:
            hint = (f"--tile-batch {self.tile_batch}" if self.mirror_group == self.num_mirrors else
                    "--tile-batch 1 and fewer --mirror-axes")
            print(f"{self._case()}out of GPU memory; finished with {' and '.join(steps)} (slower; {hint} "
                  "avoids the retries)", file=sys.stderr, flush=True)

    def error(self) -> DeviceMemoryError:
        return DeviceMemoryError(
            f"{self._case()}out of GPU memory even with 1 tile and 1 mirrored copy per forward pass and the "
            f"accumulator in host memory (asked: --tile-batch {self.requested_tile_batch}); predict on the CPU "
            "(--device cpu), free the GPU memory other processes hold, or use a GPU with more memory")

    def _case(self) -> str:
        return f"case '{self.case_name}': " if self.case_name else ""


@dataclass
class TilePass:
    """One sliding-window pass over a padded image: what every group of tiles reads."""

    models: list[ModelLike]
    image: torch.Tensor  # (1, C, *S) padded to at least the patch
    positions: list[tuple[int, ...]]  # start of every tile
    patch_size: tuple[int, ...]
    num_outputs: int
    mirrors: list[tuple[int, ...]]  # every combination of mirrored axes, () first
    weight: torch.Tensor  # (*P) blending weights on the compute device
    amp_dtype: torch.dtype | None
    fallback: OutOfMemoryFallback  # the forward batch, shrunk after out-of-memory errors


def _accumulate_with_fallback(acc_device: torch.device, tile_pass: TilePass) -> torch.Tensor:
    """Accumulate on `acc_device`; when CUDA runs out of memory beyond what smaller forward batches solve,
    again with the accumulator on the host; DeviceMemoryError when even that runs out."""
    fallback = tile_pass.fallback
    for device in (acc_device,) if acc_device.type == "cpu" else (acc_device, torch.device("cpu")):
        fallback.host_accumulator = device.type == "cpu" and acc_device.type != "cpu"
        try:
            return _accumulate_tiles(tile_pass, device)
        except torch.cuda.OutOfMemoryError:
            pass  # retried outside the except block, so the failed attempt's tensors (held by the traceback) go
        _free_cached_memory()
    raise fallback.error()


def _free_cached_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _accumulate_tiles(tile_pass: TilePass, acc_device: torch.device) -> torch.Tensor:
    """Sum weighted tile logits into (K, *S) and divide by the summed weights (the image is already padded)."""
    spatial = tuple(tile_pass.image.shape[2:])
    logits = torch.zeros((tile_pass.num_outputs, *spatial), dtype=torch.float32, device=acc_device)  # (K, *S)
    weight_sum = torch.zeros(spatial, dtype=torch.float32, device=acc_device)  # (*S)
    weight_on_acc = tile_pass.weight.to(acc_device, torch.float32)
    positions, first = tile_pass.positions, 0
    # no_grad rather than inference_mode: callers may modify the returned logits in place
    with torch.no_grad():
        while first < len(positions):
            slices = [
                tuple(slice(s, s + p) for s, p in zip(start, tile_pass.patch_size))
                for start in positions[first : first + tile_pass.fallback.tile_batch]
            ]
            out = _weighted_tiles(tile_pass, slices)
            if out is None:  # out of memory: the same tiles again with a smaller forward batch
                _free_cached_memory()
                continue
            # the only device->host copy of the loop, and only when the accumulator lives on the host
            out = out.to(acc_device)
            for i, sl in enumerate(slices):
                logits[(slice(None),) + sl] += out[i]
                weight_sum[sl] += weight_on_acc
            first += len(slices)
        logits /= weight_sum
    return logits


def _weighted_tiles(tile_pass: TilePass, slices: list[tuple[slice, ...]]) -> torch.Tensor | None:
    """Weighted mean logits (n, K, *P) of the tiles at `slices`; None after an out-of-memory error that a
    smaller forward batch may avoid (the pass's fallback has shrunk it); the error itself when nothing is left
    to shrink."""
    fallback = tile_pass.fallback
    try:
        tiles = torch.stack([tile_pass.image[0][(slice(None),) + sl] for sl in slices])  # (n, C, *P)
        mean = _predict_tiles(tile_pass.models, tiles, tile_pass.mirrors, tile_pass.num_outputs, tile_pass.amp_dtype,
                              fallback.mirror_group)
        return mean * tile_pass.weight
    except torch.cuda.OutOfMemoryError:
        if not fallback.shrink():
            raise
    return None


def _predict_tiles(
    models: list[ModelLike],
    tiles: torch.Tensor,
    mirrors: list[tuple[int, ...]],
    num_outputs: int,
    amp_dtype: torch.dtype | None,
    mirror_group: int | None = None,
) -> torch.Tensor:
    """Mean logits (n, K, *P) over mirror combinations and models for a batch of tiles (n, C, *P).

    The mirrored copies of the tiles go through each model `mirror_group` combinations at a time (default all
    in one batch); the sum runs over models, then combinations, in the same order whatever the grouping.
    """
    n = tiles.shape[0]
    group = len(mirrors) if mirror_group is None else max(1, int(mirror_group))
    total = None
    with torch.autocast(device_type=tiles.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for model in models:
            for first in range(0, len(mirrors), group):
                combos = mirrors[first : first + group]
                # every mirrored copy of the group in one batch: (n * len(combos), C, *P)
                batch = torch.cat([tiles.flip([a + 2 for a in combo]) if combo else tiles for combo in combos])
                out = model(batch)
                out = out[0] if isinstance(out, (list, tuple)) else out
                if out.shape[0] != batch.shape[0] or out.shape[1] != num_outputs or out.shape[2:] != batch.shape[2:]:
                    raise ValueError(
                        f"model output {tuple(out.shape)} does not match the expected "
                        f"({batch.shape[0]}, {num_outputs}, {', '.join(map(str, batch.shape[2:]))})"
                    )
                out = out.float()
                for j, combo in enumerate(combos):
                    chunk = out[j * n : (j + 1) * n]
                    chunk = chunk.flip([a + 2 for a in combo]) if combo else chunk
                    total = chunk if total is None else total + chunk
    assert total is not None
    return total / (len(models) * len(mirrors))
