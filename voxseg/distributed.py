"""Data parallelism on torch.distributed: the process group, the rank's device, collectives and sharding.

torchrun (`torchrun --nproc_per_node N -m voxseg train ...`) starts N processes and tells each, in the
environment, who it is: RANK (0..WORLD_SIZE-1 over all machines), WORLD_SIZE, LOCAL_RANK (its GPU on this
machine), MASTER_ADDR/MASTER_PORT (where rank 0 listens). `process_group` reads them, initialises the group
(NCCL on CUDA, Gloo on the CPU) with a timeout, binds cuda:LOCAL_RANK and destroys the group at the end. A plain
single process (no RANK/WORLD_SIZE, or WORLD_SIZE=1) gets `World()` and no process group: nothing changes.

    with process_group("cuda", timeout_min=30) as world:      # World(rank=1, size=4, device=cuda:1)
        loss = all_reduce_autograd(stats)                     # sums over ranks, gradients flow back
        mine = shard_balanced(cases, sizes, world.rank, world.size)

The collectives are no-ops without a process group, so callers never branch on the world size.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from voxseg.devices import resolve_device
from voxseg.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of processes, rank on this machine, compute device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.lstrip("-").isdigit():
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; torchrun sets it, do not "
                          "set it by hand")
    return int(value)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={size} from the environment are inconsistent; launch with "
                          "torchrun, which sets both")
    return rank, size, local_rank


def local_device(device: torch.device, local_rank: int | None = None) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA device under torchrun (one GPU per process), the device itself otherwise."""
    if device.type != "cuda":
        return device
    rank, size, env_local = env_world()
    if size == 1:
        return device
    index = env_local if local_rank is None else local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {index} needs GPU {index}, but this machine has {torch.cuda.device_count()}; "
                          "start at most one process per GPU (--nproc_per_node)")
    return torch.device("cuda", index)


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto", timeout_min: float = 30.0,
                  option: str = "loop.device") -> Iterator[World]:
    """The run's `World`; under torchrun (WORLD_SIZE > 1) with an initialised process group around it.

    Args:
        device: the device option ("auto", "cpu", "cuda", "cuda:N"); on CUDA each rank gets cuda:LOCAL_RANK.
        timeout_min: a collective waiting longer than this fails (a rank that died or hangs does not leave the
            others blocked forever).
        option: how the user spelled the device option, for error messages.

    A group initialised by the caller (tests, notebooks) is used as it is and left alive.
    """
    resolved = resolve_device(device, option=option)
    rank, size, local_rank = env_world()
    if size == 1 and not dist.is_initialized():
        yield World(device=resolved)
        return
    resolved = local_device(resolved, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min),
                                device_id=resolved if resolved.type == "cuda" else None)
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, resolved)
    try:
        yield world
        barrier()  # every rank returns after rank 0 finished writing
    finally:
        if owned:
            dist.destroy_process_group()


def current_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return current_world()[1] > 1


# ----- collectives (no-ops without a process group) -------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; no autograd). No host sync: the collective is queued on the device."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor; no autograd)."""
    return all_reduce_sum(tensor) / current_world()[1] if is_distributed() else tensor


def all_reduce_autograd(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that gradients flow through: the backward pass sums the ranks' gradients.

    For a loss L(sum_r s_r) that every rank computes identically, rank r's gradient of s_r becomes
    N dL/ds; DDP's averaging over N ranks then leaves exactly the single-process gradient of the global batch.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in torch 2.13 for functional collectives, not yet differentiable
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_gather_objects(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order; [value] without a process group."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * current_world()[1]
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----- sharding -----------------------------------------------------------------------------------------------
def shard_balanced(items: Sequence[T], weights: Sequence[float], rank: int, size: int) -> list[T]:
    """Rank `rank`'s share of `items`: largest first, each to the least loaded rank (ties: the lower rank).

    Deterministic for the same inputs on every rank; the shares partition `items` and each keeps the input
    order. E.g. weights [5, 4, 3, 3, 1] over 2 ranks -> shares [5, 3] and [4, 3, 1], loads 8 and 8.
    """
    if len(weights) != len(items):
        raise ValueError(f"{len(items)} items but {len(weights)} weights")
    if size <= 1:
        return list(items)
    loads = [0.0] * size
    owner = [0] * len(items)
    for index in sorted(range(len(items)), key=lambda i: (-float(weights[i]), i)):
        target = min(range(size), key=lambda r: (loads[r], r))
        owner[index] = target
        loads[target] += float(weights[index])
    return [item for item, who in zip(items, owner) if who == rank]


def local_batch_size(global_batch: int, size: int) -> int:
    """The batch each of `size` ranks computes: the plan's batch is the global batch of the whole run."""
    if global_batch % size:
        raise ConfigError(f"batch size {global_batch} does not divide over {size} processes: the plan's batch is "
                          f"the global batch, each process computes batch / processes. Use a batch that is a "
                          f"multiple of {size} (--set plan.batch_size=N) or another --nproc_per_node")
    return global_batch // size


def data_parallel(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel for a distributed world (gradients averaged over the ranks
    during backward, parameters broadcast from rank 0 once); the model itself for a single process.

    Keep the unwrapped model for checkpoints and validation: its state_dict has no `module.` prefix, so a
    checkpoint does not depend on the number of processes that wrote it.
    """
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
