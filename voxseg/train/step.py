"""One training step (forward, loss, backward, optimiser) and the data that feeds it (caches, samplers,
augmentation, an optional prefetch thread).

Nothing here reads a tensor on the host: losses come back as detached device tensors and are summed on the
device by `RunningMeans`; the loop reads them only at log intervals and at the end of an epoch, which are the
only host-device syncs of the hot loop (besides the GradScaler's inf check with fp16).
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from voxseg.augment import BatchRows, augment_batch, source_size
from voxseg.config import TrainConfig
from voxseg.distributed import local_batch_size
from voxseg.errors import ConfigError
from voxseg.plans import Plan
from voxseg.train.cache import CacheBudget, CaseCache
from voxseg.train.sampler import ForegroundSampling, PatchSampler

Batch = tuple[Tensor, Tensor]


class TrainStep:
    """Owns model, loss, optimiser, GradScaler and autocast dtype; `step(image, seg)` is one micro-batch.

    With `grad_accum` > 1 the loss is divided by it and the optimiser steps every `grad_accum` micro-batches,
    so the gradient equals that of one batch `grad_accum` times larger (for losses that average over the batch).

    Args:
        model: the network (kept uncompiled here, so its state_dict has no compile prefixes).
        loss_fn: `loss_fn(output, target) -> (total, components)`.
        optimizer: the optimiser.
        device: where the batches live.
        amp_dtype: torch.bfloat16 / torch.float16 autocast, or None for float32.
        grad_accum: micro-batches per optimiser step.
        grad_clip: max gradient norm (0 = no clipping); with fp16 the gradients are unscaled first.
        compile: torch.compile the forward + loss (the caller decides when this pays: CUDA).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None = None, grad_accum: int = 1,
                 grad_clip: float = 12.0, compile: bool = False) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.grad_accum = max(1, int(grad_accum))
        self.grad_clip = float(grad_clip)
        # only fp16 needs loss scaling; bf16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.micro_steps = 0
        self.grad_norm: Tensor | None = None
        self._forward_loss = torch.compile(self._forward_loss_eager) if compile else self._forward_loss_eager

    def compile_with(self, compiler: Callable[[Callable], Callable]) -> None:
        """Run the forward + loss as `compiler(eager forward + loss)` from now on (`voxseg estimate` compiles
        each configuration it times itself, after clearing what earlier ones compiled)."""
        self._forward_loss = compiler(self._forward_loss_eager)

    def _forward_loss_eager(self, image: Tensor, seg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            output = self.model(image)
        # the loss runs in float32: Dice sums over ~1e6 voxels lose too much in half precision
        if isinstance(output, (list, tuple)):
            output = [o.float() for o in output]
        else:
            output = output.float()
        return self.loss_fn(output, seg)

    def step(self, image: Tensor, seg: Tensor) -> dict[str, Tensor]:
        """One micro-batch: image (B, C, *P), seg (B, 1, *P). Returns {"loss": total, **components}, detached."""
        self.model.train()
        last = (self.micro_steps + 1) % self.grad_accum == 0
        # DDP: all-reduce gradients only on the micro-batch that steps the optimiser
        sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            total, components = self._forward_loss(image, seg)
            self.scaler.scale(total / self.grad_accum).backward()
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self._optimizer_step()
        out = {"loss": total.detach()}
        out.update({name: value.detach() for name, value in components.items() if name != "loss"})
        return out

    __call__ = step

    def _optimizer_step(self) -> None:
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            # returns a device tensor: no sync
            self.grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro_steps = int(state.get("micro_steps", 0))


class RunningMeans:
    """Sums named 0-dim device tensors without syncing; `means()` reads them all in one transfer.

    Args:
        reduce: applied to the stacked sums before the transfer (the mean over the ranks of a distributed run).
    """

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.reduce = reduce
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        """Host-device sync point: one stacked copy to the host (after `reduce`, e.g. the mean over ranks)."""
        if not self.sums:
            return {}
        stacked = torch.stack(list(self.sums.values()))
        values = (self.reduce(stacked) if self.reduce is not None else stacked).cpu().tolist()
        return {name: v / self.count for name, v in zip(self.sums, values)}


class BatchStream:
    """Yields `count` batches from `make_batch()`, prepared `depth` ahead in a background thread (0 = inline).

    Exactly `count` batches are made per iteration over the stream, so the random generators that
    `make_batch` uses end an epoch in the same state with or without prefetching (resumed runs stay exact).
    On CUDA the thread works on its own stream and the consumer waits on an event, so a batch is never read
    before its kernels finish. An exception in the thread is re-raised in the consumer; leaving the loop
    early (break, an error, or closing the iterator) stops and joins the thread. `wait_seconds` accumulates
    the time the consumer waited for data.

    Raises:
        ConfigError: a negative depth.
    """

    THREAD_NAME = "voxseg-prefetch"

    def __init__(self, make_batch: Callable[[], Batch], count: int, depth: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if depth < 0:
            raise ConfigError(f"prefetch depth {depth} must be >= 0 (0 prepares batches inline)")
        self.make_batch = make_batch
        self.count = int(count)
        self.depth = int(depth)
        self.device = torch.device(device)
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator[Batch]:
        if self.depth == 0:
            for _ in range(self.count):
                start = time.perf_counter()
                batch = self.make_batch()
                self.wait_seconds += time.perf_counter() - start
                yield batch
            return
        yield from self._threaded()

    def _threaded(self) -> Iterator[Batch]:
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        device = self.device
        if cuda and device.index is None:
            # "cuda" means the consumer's current device; a new thread's current device is always cuda:0
            device = torch.device("cuda", torch.cuda.current_device())
        thread = threading.Thread(target=self._produce, args=(slots, stop, device), name=self.THREAD_NAME,
                                  daemon=True)
        thread.start()
        try:
            for _ in range(self.count):
                start = time.perf_counter()
                item = slots.get()
                self.wait_seconds += time.perf_counter() - start
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if cuda:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)
                    for tensor in batch:
                        tensor.record_stream(current)  # the side stream's allocator must not reuse it early
                yield batch
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    slots.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _produce(self, slots: queue.Queue, stop: threading.Event, device: torch.device) -> None:
        stream = None
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the thread's current device starts as cuda:0
                stream = torch.cuda.Stream(device)
            for _ in range(self.count):
                if stop.is_set():
                    return
                event = None
                if stream is not None:
                    with torch.cuda.stream(stream):
                        batch = self.make_batch()
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch = self.make_batch()
                while not stop.is_set():
                    try:
                        slots.put((batch, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which re-raises it in the training thread
            slots.put(exc)


def prefetch_depth(configured: int, cache_mode: str) -> int:
    """The configured depth, or for -1 (auto): 0 for a device-resident cache, 2 when reads happen on the host."""
    if configured >= 0:
        return configured
    return 0 if cache_mode == "gpu" else 2


class TrainData:
    """The data side of training: case caches, patch samplers and the augmentation generator.

    Training batches: sample crops of `source_size` -> augment on the device -> (B, C, *P), (B, 1, *P).
    Validation batches: crops of P without augmentation, from a sampler re-seeded at every validation, so
    every validation sees the same patches (a fair comparison between epochs, and no state to checkpoint).

    Args:
        preprocessed_dir: WORKDIR/preprocessed.
        plan: the run's effective plan: patch and batch size, foreground oversampling, labels/regions.
        config: the run's settings (data and augment sections).
        train_names, val_names: the fold's cases.
        device: training device.
        seed: base seed, the same on every rank.
        cache_budget_gb: memory the training and validation caches together may take in gpu mode (None = the
            cache's default, `CacheBudget.for_device`).
        previous: a cascade stage's stored first-stage predictions (see `CaseCache`), else None.
        rank, world_size: this process's slice of the global batch. Every rank draws the whole global batch
            (patch positions and augmentation decisions) from the same seeded streams and keeps rows
            [rank * b, (rank + 1) * b), b = B / N, which it alone crops and augments, so the run is the same
            on 1 or N processes. Validation batches are dealt round-robin: rank r crops batches r, r + N, ...
    """

    def __init__(self, preprocessed_dir: str | os.PathLike, plan: Plan, config: TrainConfig, train_names: list[str],
                 val_names: list[str], device: torch.device, seed: int,
                 cache_budget_gb: float | None = None, rank: int = 0, world_size: int = 1,
                 previous: Any = None) -> None:
        patch_size = list(plan.patch_size)
        self.rank, self.world_size = rank, world_size
        local = local_batch_size(plan.batch_size, world_size)
        self.rows = slice(rank * local, (rank + 1) * local)
        self.config, self.patch_size, self.device = config, patch_size, torch.device(device)
        self.seed = seed
        # one budget for both caches: the validation cache takes only what the training cache left, so a plan
        # sized to the device keeps room for the step's activations
        budget = CacheBudget.for_device(torch.device(device), cache_budget_gb)
        self.train_cache = CaseCache(preprocessed_dir, train_names, device, mode=config.data.cache,
                                     previous=previous, budget=budget)
        self.val_cache: CaseCache | None = None
        if sorted(val_names) == sorted(train_names):  # fold "all": validate on the cached training cases
            self.val_cache = self.train_cache
        elif val_names:
            self.val_cache = CaseCache(preprocessed_dir, val_names, device, mode=config.data.cache,
                                       previous=previous, budget=budget)
        foreground = ForegroundSampling(plan.foreground_oversampling,
                                        regions=plan.regions if plan.is_region_based else None,
                                        ignore_label=plan.ignore_label)
        self._sampler_args = dict(batch_size=plan.batch_size, foreground=foreground, slice_axis=plan.slice_axis)
        self.sampler = PatchSampler(self.train_cache, patch_size, num_samples=config.data.num_samples,
                                    source_size=source_size(patch_size, config.augment),
                                    seed=seed, **self._sampler_args)
        # decisions are drawn on the host; with data parallelism seed it alike on every rank (global batch)
        self.augment_generator = np.random.default_rng(seed + 1)

    def next_batch(self) -> Batch:
        # this rank's rows of the global batch (all of it in one process): the sampler and the augmentation
        # draw for all B samples, so every rank's generators stay in step, and cut / augment only these rows
        image, seg = self.sampler.sample(self.rows if self.world_size > 1 else None)  # (B / N, C, *S)
        return augment_batch(image, seg, self.config.augment, self.augment_generator, self.patch_size,
                             rows=BatchRows(self.rows.start, self.sampler.batch_size),
                             extra_channels=self.train_cache.extra_channels)

    def train_stream(self, count: int) -> BatchStream:
        """`count` augmented batches, prefetched `data.prefetch` ahead (-1: see DataConfig.prefetch)."""
        depth = prefetch_depth(self.config.data.prefetch, self.train_cache.mode)
        return BatchStream(self.next_batch, count, depth, self.device)

    def val_batches(self, count: int) -> Iterator[Batch]:
        """This rank's share of `count` unaugmented validation batches, the same ones at every call."""
        if self.val_cache is None:
            return
        sampler = PatchSampler(self.val_cache, self.patch_size, num_samples=1,
                               seed=self.seed + 2, **self._sampler_args)
        for index in range(count):
            if index % self.world_size == self.rank:
                yield sampler.sample()
            else:
                sampler.draw()  # another rank's batch: the same host draws, no crops

    def describe(self) -> str:
        text = self.train_cache.describe()
        if self.val_cache is not None and self.val_cache is not self.train_cache:
            text += f"; validation {self.val_cache.describe()}"
        return text

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position generator and foreground credit, and the augmentation's generator."""
        return {"sampler": self.sampler.state_dict(), "augment": self.augment_generator.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if "augment" in state:  # checkpoints from before host-side draws restore the sampler only
            self.augment_generator.bit_generator.state = state["augment"]
