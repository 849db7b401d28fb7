"""Measure the real network's training memory, to check and recalibrate the planner's memory model.

`voxseg.data.memory` estimates memory analytically (the planner must not build networks); these functions
build the network a plan describes and count what it really keeps: `measure_saved_activation_elements` on
a CPU, `measure_peak_memory_gb` (GiB) on a CUDA device. tests/test_plan.py compares the two.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from voxseg.models.factory import build_network
from voxseg.plans import Plan
from voxseg.units import gib

__all__ = ["measure_peak_memory_gb", "measure_saved_activation_elements"]


def measure_saved_activation_elements(plan: Plan, patch_size: list[int] | None = None) -> float:
    """Count the elements autograd saves for backward in one forward pass of the real network, per sample.

    Runs on CPU in float32 with batch 1: every tensor passed to a saved-tensors pack hook is attributed to
    its storage, each storage is counted once (views and in-place results share one), parameters are left
    out. Compare with `voxseg.data.memory.activation_elements` to check SAVED_TENSORS_PER_CONV and friends.
    """
    patch = list(patch_size or plan.patch_size)
    model = build_network(plan).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    image = torch.randn(1, plan.network_in_channels, *patch)  # (1, C, *P)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(image)
    return sum(saved.values()) / image.element_size()


def measure_peak_memory_gb(plan: Plan, device: Any = "cuda", steps: int = 2, reserved: bool = False,
                           warmup: int = 0) -> float:
    """Peak allocator memory (GiB) of real training steps with the plan's patch and batch on a CUDA device.

    Builds the network, runs `warmup` steps (cuDNN autotuning tries algorithms with their own workspaces on
    the first step: a one-off), resets the peak statistics, then runs `steps` bf16-autocast
    forward/backward/SGD steps (from the second step on, with the optimiser's momentum) with a cross-entropy
    over every deep-supervision output, and returns
    torch.cuda.max_memory_allocated (`reserved=True`: max_memory_reserved, what the caching allocator took from
    the device, rounding and fragmentation included: what decides an out-of-memory error). It excludes the CUDA
    context, so compare it with `voxseg.data.memory.estimate_memory_gb(...) - CUDA_CONTEXT_GB`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_peak_memory_gb needs a CUDA device, got '{device}'")
    model = build_network(plan).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    shape = (plan.batch_size, plan.network_in_channels, *plan.patch_size)
    image = torch.randn(shape, device=device)  # (B, C, *P)
    target = torch.randint(0, plan.num_outputs, (plan.batch_size, 1, *plan.patch_size), device=device)
    for index in range(warmup + steps):
        if index == warmup:
            torch.cuda.synchronize(device)
            if warmup:  # release the blocks autotuning reserved, so the peak is the steady state's
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = model(image)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            loss = sum(
                F.cross_entropy(out.float(), F.interpolate(target.float(), size=out.shape[2:])[:, 0].long())
                for out in outputs
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device) if reserved else torch.cuda.max_memory_allocated(device)
    del model, optimizer, image, target
    return gib(peak)
