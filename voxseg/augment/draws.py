"""Random draws and mask helpers shared by the spatial and intensity transforms.

Every draw happens on the generator's device and is never read on the host (no device sync); per-sample
decisions are boolean masks that `broadcast_mask` lines up with the batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["broadcast_mask", "device_vector", "random_mask", "random_uniform"]


def random_uniform(
    low: float, high: float, shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform float32 samples in [low, high)."""
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, device=device)


def random_mask(
    p: float, shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Bernoulli(p) bool mask."""
    return torch.rand(tuple(shape), generator=generator, device=device) < p


def device_vector(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Small float32 constant on `device` without a sync.

    `torch.tensor(values, device=cuda)` is a blocking copy (PyTorch synchronises the stream after it). A
    non_blocking copy from pageable memory is no better: CUDA documents that the driver may synchronise with
    the stream to stage it. From pinned memory the copy is truly asynchronous, and PyTorch's caching host
    allocator keeps the pinned block alive until the copy has run.
    """
    host = torch.tensor(list(values), dtype=torch.float32)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def broadcast_mask(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a (B,) or (B, C) mask so that it broadcasts against a tensor with `ndim` dimensions."""
    return mask.view(*mask.shape, *([1] * (ndim - mask.ndim)))
