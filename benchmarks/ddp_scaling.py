"""Data-parallel step time on 1 and N Gloo processes (CPU) for a tiny plan, and the scaling efficiency.

Each process runs one thread (one core each), builds the same network, wraps it in DistributedDataParallel
and times `TrainStep` (forward, Dice + CE with the batch Dice statistics all-reduced, backward with DDP's
gradient all-reduce, clipping, SGD) on random batches:
  - strong scaling: the plan's global batch B split over N processes (B / N each), what `voxseg train` does
    under torchrun; efficiency = t(1) / (N t(N));
  - weak scaling: B per process (an N times larger global batch); efficiency = t(1) / t(N);
  - the gradient all-reduce alone: parameters x 4 bytes, timed with `dist.all_reduce`.
On a CPU this shows the mechanism only: the cores are shared with the data side and with each other, and Gloo
over loopback is not NCCL over NVLink/InfiniBand. Medians over --steps steps after 3 warm-up steps, with the
spread (min-max) of the per-step times.

Run: python benchmarks/ddp_scaling.py [--processes 2] [--batch 4] [--patch 32] [--features 8,16,32] [--steps 20]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from voxseg.distributed import World, data_parallel
from voxseg.losses import build_loss
from voxseg.models import build_network
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.train.step import TrainStep


def tiny_plan(patch: int, features: list[int], batch: int) -> Plan:
    stages = len(features)
    return Plan(
        dataset_name="Bench", raw_dataset="/nowhere", channel_names={"0": "A"},
        labels={"background": 0, "a": 1, "b": 2}, file_ending=".nii.gz", target_spacing=[1.0, 1.0, 1.0],
        patch_size=[patch] * 3, batch_size=batch,
        network=NetworkPlan(features=features, kernel_sizes=[[3, 3, 3]] * stages,
                            strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1), conv_per_stage=2),
        normalization=[ChannelNormalization()], image_dtype="float32",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _time_steps(step: TrainStep, local_batch: int, patch: int, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    image = torch.randn(local_batch, 1, patch, patch, patch, generator=generator)
    seg = torch.randint(0, 3, (local_batch, 1, patch, patch, patch), generator=generator, dtype=torch.int8)
    times = []
    for index in range(steps + 3):
        start = time.perf_counter()
        step(image, seg)
        if index >= 3:
            times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, size: int, port: int, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(1)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    world = World(rank, size, rank, torch.device("cpu"))
    plan = tiny_plan(args.patch, args.features, args.batch)
    torch.manual_seed(0)
    model = build_network(plan)
    loss = build_loss("dice_ce", plan, sync_batch_dice=world.distributed)
    step = TrainStep(data_parallel(model, world), loss, torch.optim.SGD(model.parameters(), lr=1e-3), world.device)
    out = {}
    for mode, local_batch in (("strong", args.batch // size), ("weak", args.batch)):
        times = _time_steps(step, local_batch, args.patch, args.steps)
        out[mode] = times
    if size > 1:
        flat = torch.zeros(sum(p.numel() for p in model.parameters()))
        reduce_times = []
        for index in range(args.steps + 3):
            start = time.perf_counter()
            dist.all_reduce(flat)
            if index >= 3:
                reduce_times.append(time.perf_counter() - start)
        out["all_reduce"] = reduce_times
        dist.destroy_process_group()
    out["parameters"] = sum(p.numel() for p in model.parameters())
    if rank == 0:
        results.update(out)


def _measure(size: int, args: argparse.Namespace) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(size, _free_port(), args, results), nprocs=size, join=True)
        return dict(results)


def _summary(times: list[float]) -> str:
    return f"{1e3 * statistics.median(times):7.1f} ms ({1e3 * min(times):.1f}-{1e3 * max(times):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch of the strong-scaling run")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--features", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    one, many = _measure(1, args), _measure(args.processes, args)
    n = args.processes
    median = statistics.median
    megabytes = 4 * one["parameters"] / 1e6
    print(f"tiny plan: patch {args.patch}^3, features {args.features}, {one['parameters']} parameters "
          f"({megabytes:.2f} MB of float32 gradients per all-reduce), {args.steps} steps, 1 thread per process")
    print(f"strong scaling, global batch {args.batch}:")
    print(f"  1 process  (batch {args.batch}):      {_summary(one['strong'])}")
    print(f"  {n} processes (batch {args.batch // n} each): {_summary(many['strong'])}  "
          f"speed-up {median(one['strong']) / median(many['strong']):.2f}, "
          f"efficiency {median(one['strong']) / (n * median(many['strong'])):.0%}")
    print(f"weak scaling, batch {args.batch} per process:")
    print(f"  1 process:   {_summary(one['weak'])}")
    print(f"  {n} processes: {_summary(many['weak'])}  efficiency {median(one['weak']) / median(many['weak']):.0%}")
    print(f"gradient all-reduce alone ({megabytes:.2f} MB, gloo, {n} processes): {_summary(many['all_reduce'])}")


if __name__ == "__main__":
    main()
