"""The data that feeds the training step: case caches, patch samplers and the augmentation (`TrainData`).

Training batches are cropped, then augmented on the device; every random decision is drawn on the host from
numpy Generators whose states `TrainData.state_dict` saves, so a resumed run draws what an uninterrupted one
would have drawn.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import torch

from voxseg.augment import BatchRows, augment_batch, source_size
from voxseg.config import TrainConfig
from voxseg.distributed import World, local_batch_size
from voxseg.plans import Plan
from voxseg.train.cache import CacheBudget, CaseCache
from voxseg.train.prefetch import Batch, BatchStream, prefetch_depth
from voxseg.train.sampler import ForegroundSampling, PatchSampler


class TrainData:
    """The data side of training: case caches, patch samplers and the augmentation generator.

    Training batches: sample crops of `source_size` -> augment on the device -> (B, C, *P), (B, 1, *P).
    Validation batches: crops of P without augmentation, from a sampler re-seeded at every validation, so
    every validation sees the same patches (a fair comparison between epochs, and no state to checkpoint).

    Args:
        preprocessed_dir: WORKDIR/preprocessed.
        plan: the run's effective plan: patch and batch size, foreground oversampling, labels/regions.
        config: the run's settings (data and augment sections; `loop.seed` seeds the positions and the
            augmentation, the same on every rank).
        train_names, val_names: the fold's cases.
        world: this process's device and slice of the global batch (default: one process on the CPU). Every
            rank draws the whole global batch (patch positions and augmentation decisions) from the same seeded
            streams and keeps rows [rank * b, (rank + 1) * b), b = B / N, which it alone crops and augments, so
            the run is the same on 1 or N processes. Validation batches are dealt round-robin: rank r crops
            batches r, r + N, ...
        cache_budget_gb: memory the training and validation caches together may take in gpu mode (None = the
            cache's default, `CacheBudget.for_device`).
        previous: a cascade stage's stored first-stage predictions (see `CaseCache`), else None.
    """

    def __init__(self, preprocessed_dir: str | os.PathLike, plan: Plan, config: TrainConfig, train_names: list[str],
                 val_names: list[str], world: World | None = None, cache_budget_gb: float | None = None,
                 previous: Any = None) -> None:
        world = world or World()
        device = world.device
        patch_size = list(plan.patch_size)
        self.rank, self.world_size = world.rank, world.size
        local = local_batch_size(plan.batch_size, world.size)
        self.rows = slice(world.rank * local, (world.rank + 1) * local)
        self.config, self.patch_size, self.device = config, patch_size, torch.device(device)
        self.seed = seed = config.loop.seed
        # one budget for both caches: the validation cache takes only what the training cache left, so a plan
        # sized to the device keeps room for the step's activations
        budget = CacheBudget.for_device(self.device, cache_budget_gb)
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
