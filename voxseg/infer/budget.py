"""How much of the machine one case's prediction may take: the tiles per forward pass that fit the memory free
now, from the plan's network (`voxseg.data.memory.inference_bytes_per_tile`), and where the accumulator fits;
and the memory model of a whole case (`case_memory`, `fit_case`), checked against a budget (predict
--max-memory) before any work, so that a case that cannot fit is refused with the numbers instead of being
killed half way (docs/INFERENCE.md "Memory").

    limit = forward_limit(plan, device, spatial_shape=(129, 191, 203), amp_dtype=None)   # e.g. 5 on a 24 GB CPU
    sliding_window_inference(..., replace(tiling, max_forward_batch=limit))
    fitted = fit_case(plan, image.shape, spacing, device, restore_values, "disk", max_memory_gb=None)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from voxseg.data.memory import inference_bytes_per_tile
from voxseg.errors import MemoryBudgetError
from voxseg.infer.cpu_forward import SAMPLE_ALONE_VOXELS
from voxseg.plans import Plan

# share of the free device memory the accumulator may take; the rest is left for the network's activations
_ACCUMULATOR_MEMORY_SHARE = 0.5
# the share of the free memory the forward passes of a sliding window may take (the rest: accumulator, restore,
# other processes)
_FORWARD_MEMORY_SHARE = 0.5


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors: on CUDA the device's free memory, on a CPU the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def forward_batch_limit(tile_bytes: float, free_bytes: float, reserved_bytes: float = 0.0) -> int:
    """Tiles (mirrored copies included) one forward pass may hold: half of what is free after `reserved_bytes`
    (the accumulator), at `tile_bytes` each, at least 1. E.g. 1.8 GiB per tile, 20 GiB free -> 5."""
    return max(1, int(_FORWARD_MEMORY_SHARE * (free_bytes - reserved_bytes) // max(tile_bytes, 1.0)))


def split_forward_batch(tile_batch: int, num_mirrors: int, limit: int | None) -> tuple[int, int]:
    """(tiles, mirrored copies) per forward pass within `limit` tiles: halve the tiles first, then the copies."""
    mirror_group = num_mirrors
    while limit is not None and tile_batch * mirror_group > limit and (tile_batch > 1 or mirror_group > 1):
        if tile_batch > 1:
            tile_batch = max(1, tile_batch // 2)
        else:
            mirror_group = max(1, mirror_group // 2)
    return tile_batch, mirror_group


def choose_accumulator_device(device: torch.device, num_outputs: int, spatial_shape: Sequence[int]) -> torch.device:
    """The compute device when the (K + 1) float32 accumulators fit comfortably in its free memory, else CPU."""
    if device.type != "cuda":
        return device
    needed = (num_outputs + 1) * math.prod(int(s) for s in spatial_shape) * 4
    free, _ = torch.cuda.mem_get_info(device)
    return device if needed < _ACCUMULATOR_MEMORY_SHARE * free else torch.device("cpu")


def forward_limit(plan: Plan, device: torch.device, spatial_shape: Sequence[int], amp_dtype: torch.dtype | None,
                  free_bytes: int | None = None) -> int:
    """Tiles x mirrored copies one forward pass of `plan`'s network may hold on `device` for a case of
    `spatial_shape` voxels: half the free memory (`free_bytes`, default read now) after the case's (K + 1)
    float32 accumulators, at the network's bytes per tile."""
    tile = inference_bytes_per_tile(plan.network, list(plan.patch_size), plan.network_in_channels,
                                    plan.num_outputs, dtype_bytes=2 if amp_dtype is not None else 4)
    reserved = (plan.num_outputs + 1) * math.prod(int(s) for s in spatial_shape) * 4
    free = available_memory_bytes(torch.device(device)) if free_bytes is None else free_bytes
    return forward_batch_limit(tile, free, reserved)


# the share of the host memory available at the start of a case that its prediction may take by default
DEFAULT_BUDGET_SHARE = 0.85
GIB = 2**30


def size_text(count: float) -> str:
    """Bytes in words: '3.5 GiB', or '12 MiB' below 1 GiB."""
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.0f} MiB"


@dataclass(frozen=True)
class CaseMemory:
    """Bytes of host memory one case's prediction holds at its peak, by part (a CPU computes everything on the
    host; on a GPU the network's parts live on the device and are not counted here).

    The peak is the largest of preprocessing (the case as read plus what preprocessing adds), prediction
    (the case as read, the network input, the band of sums, one forward pass, one restore slab, the labels and
    the probabilities) and, for a cascade stage, its first stage (which runs before, on the same image)."""

    image: int  # the case as read: C x original voxels, float32
    preprocessing: int  # added while preprocessing: the nonzero mask and its filling, the cropped copy, resampling
    network_input: int  # C x target voxels, float32 (padded to the patch)
    band: int  # (K + 1) x patch depth x target rows x target columns, float32: the sliding window's sums
    forward: int  # the forward passes: tiles per pass x `inference_bytes_per_tile`
    restore: int  # one restore slab (restore values x 4) and the rows kept between slabs
    labels: int  # original voxels x 1 byte (2 above label value 255), and the copy written
    probabilities: int  # K x original voxels x 4 in memory; a slab's float16 planes when written to disk
    first_stage: int = 0  # a cascade stage: its first stage's peak (this model of it) and the labels it leaves

    @property
    def peak(self) -> int:
        predicting = sum(getattr(self, f.name) for f in fields(self)) - self.preprocessing - self.first_stage
        return max(self.image + self.preprocessing, predicting, self.first_stage)

    def describe(self) -> str:
        """'image 0.29, preprocessing 1.2, ... GiB'."""
        return ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name) / GIB:.2f}" for f in fields(self)
                         if f.name != "first_stage" or self.first_stage) + " GiB"


@dataclass(frozen=True)
class FittedCase:
    """A case's memory model within its budget: the restore slab and the tiles per forward pass chosen for it."""

    memory: CaseMemory
    restore_values: int
    forward_tiles: int | None  # None: a GPU's own limit (`forward_limit`)
    budget: int


def target_shape(plan: Plan, shape: Sequence[int], spacing: Sequence[float]) -> list[int]:
    """The network input's spatial shape for a case of `shape` voxels at `spacing`, before cropping (an upper
    bound), padded to the patch."""
    target = plan.case_target_spacing([float(s) for s in spacing])
    resampled = [max(1, int(round(float(sp) / float(t) * int(n)))) for n, sp, t in zip(shape, spacing, target)]
    patch = list(plan.patch_size)
    if len(patch) == 2:  # a 2D network: slices along the plan's axis, one at a time
        patch.insert(plan.slice_axis, 1)
    return [max(n, int(p)) for n, p in zip(resampled, patch)]


def case_memory(plan: Plan, image_shape: Sequence[int], spacing: Sequence[float], device: torch.device,
                restore_values: int, forward_tiles: int, probabilities: str,
                previous: Plan | None = None) -> CaseMemory:
    """The memory model of predicting one (C, D, H, W) case (see `CaseMemory`); `probabilities` is "none",
    "memory" (returned as an array) or "disk" (written slab by slab); `previous`: a cascade stage's first stage,
    whose labels reach this stage's grid slab by slab and become one-hot input channels here."""
    channels, original = int(image_shape[0]), math.prod(int(s) for s in image_shape[1:])
    shape = target_shape(plan, image_shape[1:], spacing)
    target = math.prod(shape)
    outputs = plan.num_outputs
    on_host = torch.device(device).type == "cpu"
    patch = list(plan.patch_size)
    depth = int(patch[0]) if len(patch) == 3 else 1
    plane = shape[1] * shape[2]
    tile = inference_bytes_per_tile(plan.network, patch, plan.network_in_channels, outputs)
    label_bytes = 1 if max(plan.label_scheme.class_order or [0]) <= 255 else 2
    restore_rows = math.ceil(max(shape[0], 1) / max(int(image_shape[1]), 1)) + 2  # rows kept between slabs
    if probabilities == "memory":
        probability_bytes = outputs * original * 4
    elif probabilities == "disk":
        probability_bytes = 2 * restore_values // max(outputs, 1)  # a slab's float16 planes of one channel
    else:
        probability_bytes = 0
    band = (outputs + 1) * depth * plane * 4
    if len(patch) == 2 and plan.slice_axis != 0:  # slices along another axis: the whole logits are made
        band = (outputs + 1) * target * 4
    return CaseMemory(
        image=channels * original * 4,
        preprocessing=original * 10 + 3 * channels * max(original, target) * 4,
        # the input (a cascade's with its one-hot channels) and its padded copy
        network_input=2 * max(channels, plan.network_in_channels) * target * 4 if on_host else 0,
        band=band if on_host else 0,
        forward=int(forward_tiles * tile) if on_host else 0,
        restore=(min(restore_values, 4 * outputs * original) + outputs * restore_rows * plane) * 4 if on_host else 0,
        labels=2 * original * label_bytes,
        probabilities=probability_bytes,
        first_stage=0 if previous is None else (
            case_memory(previous, image_shape, spacing, device, restore_values, 1, "none").peak + target),
    )


def budget_bytes(max_memory_gb: float | None) -> tuple[int, str]:
    """The memory a case may take, and where that figure comes from: --max-memory, else DEFAULT_BUDGET_SHARE
    of the host memory available now."""
    if max_memory_gb is not None:
        return int(max_memory_gb * GIB), f"--max-memory {max_memory_gb:g}"
    free = available_memory_bytes(torch.device("cpu"))
    return int(DEFAULT_BUDGET_SHARE * free), (f"{DEFAULT_BUDGET_SHARE:.0%} of the {free / GIB:.1f} GiB available; "
                                              "--max-memory GB sets it")


def fit_case(plan: Plan, image_shape: Sequence[int], spacing: Sequence[float], device: torch.device,
             restore_values: int, probabilities: str, max_memory_gb: float | None,
             previous: Plan | None = None) -> FittedCase:
    """Fit one case's prediction into the budget before any work: the restore slab shrinks (down to a few rows)
    and, on a CPU, the tiles per forward pass are as many as the rest leaves room for (at least 1); a case that
    does not fit even so is refused (MemoryBudgetError) with its parts and the budget (the caller names the
    case). `previous`: a cascade stage's first stage (`case_memory`)."""
    budget, source = budget_bytes(max_memory_gb)
    on_host = torch.device(device).type == "cpu"
    smallest = min(restore_values, 1 << 22)  # 16 MiB of slab: a few rows even for a CT case with 100 classes
    values = restore_values
    while True:
        memory = case_memory(plan, image_shape, spacing, device, values, 1, probabilities, previous)
        if memory.peak <= budget or values <= smallest:
            break
        values = max(smallest, values // 2)
    if memory.peak > budget:
        raise MemoryBudgetError(
            f"predicting {'x'.join(str(int(s)) for s in image_shape)} voxels with {plan.num_outputs} outputs "
            f"needs about {size_text(memory.peak)} at its peak ({memory.describe()}), more than the "
            f"{size_text(budget)} allowed ({source}). Give a larger --max-memory if the machine has it, free "
            "memory, or predict on a GPU" + ("; --save-probabilities writes them to disk as they come"
                                             if probabilities == "memory" else ""))
    tiles = None
    if on_host and math.prod(int(p) for p in plan.patch_size) >= SAMPLE_ALONE_VOXELS:
        tiles = 1  # the network runs such tiles alone anyway: more per pass would only hold more K x tile outputs
    elif on_host:
        tile = inference_bytes_per_tile(plan.network, list(plan.patch_size), plan.network_in_channels,
                                        plan.num_outputs)
        tiles = max(1, 1 + int((budget - memory.peak) // max(tile, 1.0)))
    return FittedCase(memory, values, tiles, budget)
