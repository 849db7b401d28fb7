"""Resolving a training run once at its start: the device, autocast, compile and iterations for this machine and
this process's place in the run, the effective plan, the config as run (config.json) and the global seeds."""
from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voxseg.config import TrainConfig
from voxseg.data.memory import estimate_memory_gb
from voxseg.devices import amp_name, resolve_amp, resolve_device  # resolve_amp: shared with inference
from voxseg.distributed import World, local_batch_size
from voxseg.errors import ConfigError
from voxseg.plans import Plan
from voxseg.plans import apply_overrides as apply_plan_overrides
from voxseg.units import gib
from voxseg.workdir import WorkDir


@dataclass
class RunSetup:
    """What a run resolves once at its start from the config, the machine and the plan: device, autocast,
    compile, optimiser steps per epoch and this process's place in the run."""

    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    iterations: int
    world: World = field(default_factory=World)
    """This process's rank among the run's processes (torchrun) and its device."""


def resolve(config: TrainConfig, plan: Plan, num_train: int, world: World | None = None) -> RunSetup:
    """Device, autocast, compile and iterations per epoch for this machine, this effective plan and this
    process's place in the run (`world`, default a single process); the batch must divide over the ranks."""
    world = world or World(device=resolve_device(config.loop.device, option="loop.device"))
    device = world.device
    batch = plan.batch_size  # the global batch: iterations do not depend on the number of processes
    local_batch_size(batch, world.size)
    iterations = config.data.iterations_per_epoch or max(1, math.ceil(num_train * config.data.num_samples / batch))
    compile_ = config.loop.compile == "on" or (config.loop.compile == "auto" and device.type == "cuda")
    return RunSetup(device, resolve_amp(config.loop.amp, device), compile_, iterations, world)


def device_memory_gb(device: torch.device) -> float | None:
    """All the memory of `device` (GiB): a GPU's, or the machine's RAM for the CPU; None when unknown."""
    if device.type == "cuda":
        return gib(torch.cuda.get_device_properties(device).total_memory)
    try:
        return gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_step_fits(plan: Plan, setup: RunSetup) -> None:
    """Refuse a plan whose training step cannot fit in all of the device's memory (the planner's memory model,
    for this process's share of the batch), before anything is written or allocated: a hand-edited patch of
    4096^3 is named here, not met as a failed allocation of terabytes."""
    total = device_memory_gb(setup.device)
    if total is None:
        return
    batch = local_batch_size(plan.batch_size, setup.world.size)
    dtype_bytes = 4 if setup.amp_dtype is None else 2
    need = estimate_memory_gb(plan.network, plan.patch_size, batch, plan.network_in_channels, plan.num_outputs,
                              dtype_bytes)
    if need > total:
        where = "GPU" if setup.device.type == "cuda" else "machine's RAM"
        raise ConfigError(f"the plan's training step needs about {need:,.1f} GiB (patch_size {plan.patch_size}, "
                          f"batch {batch} per process, features {plan.network.features}), more than all "
                          f"{total:.1f} GiB of this {where}; lower plan.patch_size or plan.batch_size (--set "
                          "plan.patch_size=..., plan.batch_size=...), or re-plan for this memory (voxseg plan "
                          "--gpu-memory GB)")


def effective_plan(workdir: Path, config: TrainConfig) -> Plan:
    """The run's plan: WORKDIR/plans.json with the config's plan overrides, built once per run.

    Nothing is re-fitted (see `voxseg.plans.apply_overrides`); the memory estimate, which sizes the GPU
    cache, is recomputed for the overridden patch, batch and network.
    """
    planned = Plan.load(WorkDir(workdir).plans)  # a cascade stage trains on its first stage's predictions
    plan = apply_plan_overrides(planned, config.plan)
    if plan != planned:
        plan.estimated_memory_gb = round(estimate_memory_gb(plan.network, plan.patch_size, plan.batch_size,
                                                            plan.network_in_channels, plan.num_outputs), 3)
    return plan


def resolved_config(config: TrainConfig, setup: RunSetup) -> TrainConfig:
    """The config with every 'auto' that depends on the machine filled in (config.json)."""
    out = copy.deepcopy(config)
    out.loop.device = str(setup.device)
    out.loop.amp = amp_name(setup.amp_dtype)
    out.loop.compile = "on" if setup.compile else "off"
    return out




def cache_budget_gb(config: TrainConfig, plan: Plan, device: torch.device) -> float | None:
    """GPU memory (GiB) the training cache may take: the configured budget, else the free memory (the model
    is already allocated) minus the plan's estimate of the step's activations, with a margin."""
    if config.data.cache_budget_gb is not None or device.type != "cuda":
        return config.data.cache_budget_gb
    free_gb = gib(torch.cuda.mem_get_info(device)[0])
    return max(0.0, 0.8 * (free_gb - 1.2 * (plan.estimated_memory_gb or 0.0)))


def seed_everything(seed: int, deterministic: bool, num_threads: int) -> None:
    """Seed every global generator; cap torch's CPU threads at the machine's cores."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(num_threads, os.cpu_count() or 1)))
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
