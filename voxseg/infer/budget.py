"""How much of the machine one case's prediction may take: the tiles per forward pass that fit the memory free
now, from the plan's network (`voxseg.data.memory.inference_bytes_per_tile`).

    limit = forward_limit(plan, device, spatial_shape=(129, 191, 203), amp_dtype=None)   # e.g. 5 on a 24 GB CPU
    sliding_window_inference(..., max_forward_batch=limit)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from voxseg.data.memory import inference_bytes_per_tile
from voxseg.infer.sliding_window import available_memory_bytes, forward_batch_limit
from voxseg.plans import Plan


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
