"""How much of the machine one case's prediction may take: the tiles per forward pass that fit the memory free
now, from the plan's network (`voxseg.data.memory.inference_bytes_per_tile`), and where the accumulator fits.

    limit = forward_limit(plan, device, spatial_shape=(129, 191, 203), amp_dtype=None)   # e.g. 5 on a 24 GB CPU
    sliding_window_inference(..., max_forward_batch=limit)
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from voxseg.data.memory import inference_bytes_per_tile
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
