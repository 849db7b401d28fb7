"""Batched augmentation and patch-sampling throughput.

Prints ms per batch of `augment_batch` for a batch of B x C x P^3 patches (default 2 x 4 x 128^3, cut from
crops of `source_size(P)` = 192^3):
  - the default (nnU-Net) recipe,
  - every transform firing on every sample (worst case),
  - each transform alone at p = 1 (where the time goes);
and the time of `PatchSampler.sample()` for the same batch from a BraTS-sized case in each cache mode.

Run: python benchmarks/augment_bench.py [--device cuda] [--patch 128] [--batch 2] [--channels 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from voxseg.augment import AugmentConfig, augment_batch, source_size
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.train.cache import CaseCache
from voxseg.train.sampler import PatchSampler

OFF = dict(rotation_p=0.0, scale_p=0.0, elastic_p=0.0, mirror_p=0.0, rot90_p=0.0, noise_p=0.0, blur_p=0.0,
           brightness_p=0.0, contrast_p=0.0, low_res_p=0.0, gamma_p=0.0, inverted_gamma_p=0.0)
ALONE = {
    "rotation+scale (one grid_sample)": dict(rotation_p=1.0, scale_p=1.0),
    "elastic": dict(elastic_p=1.0),
    "mirror (3 axes)": dict(mirror_p=1.0),
    "noise": dict(noise_p=1.0),
    "blur": dict(blur_p=1.0, blur_per_channel_p=1.0),
    "brightness": dict(brightness_p=1.0),
    "contrast": dict(contrast_p=1.0),
    "low resolution": dict(low_res_p=1.0, low_res_per_channel_p=1.0),
    "gamma": dict(gamma_p=1.0),
}


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median ms per call; synchronises around each call (a benchmark may sync, the training loop must not)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def bench_augment(args: argparse.Namespace, device: torch.device) -> None:
    patch = (args.patch,) * 3
    default = AugmentConfig()
    size = source_size(patch, default)
    generator = torch.Generator(device=device).manual_seed(0)
    image = torch.randn(args.batch, args.channels, *size, device=device, generator=generator)
    seg = torch.randint(0, 4, (args.batch, 1, *size), device=device, dtype=torch.int8, generator=generator)
    print(f"augment_batch on {device}: batch {args.batch} x {args.channels} ch x {patch}, source crop {size}")
    every = AugmentConfig(**{k: 1.0 for k in OFF}, blur_per_channel_p=1.0, low_res_per_channel_p=1.0)
    for name, config in [("default recipe", default), ("every transform on", every)]:
        ms = timed(lambda: augment_batch(image, seg, config, generator, patch), device, args.repeats)
        print(f"  {name:34s} {ms:9.1f} ms/batch")
    for name, settings in ALONE.items():
        config = dataclasses.replace(AugmentConfig(**OFF), **settings)
        crop = size if config.rotation_p or config.elastic_p else patch
        ms = timed(lambda: augment_batch(image[(slice(None), slice(None), *[slice(0, c) for c in crop])],
                                         seg[(slice(None), slice(None), *[slice(0, c) for c in crop])],
                                         config, generator, patch), device, args.repeats)
        print(f"    {name:32s} {ms:9.1f} ms/batch")


def bench_sampler(args: argparse.Namespace, device: torch.device) -> None:
    shape = (155, 240, 240)
    patch = (args.patch,) * 3
    size = source_size(patch, AugmentConfig())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        image = rng.normal(size=(args.channels, *shape)).astype(np.float16)
        seg = np.zeros((1, *shape), np.int8)
        seg[0, 60:90, 100:140, 100:150] = 1
        save_case(tmp, "case", image, seg, {"name": "case"}, sample_foreground_locations(seg, [1]))
        print(f"PatchSampler.sample on {device}: {args.batch} crops of {size} from a {args.channels} x {shape} float16 case")
        modes = ["gpu", "pinned", "mmap"]
        for mode in modes:
            cache = CaseCache(tmp, ["case"], device=device, mode=mode)
            sampler = PatchSampler(cache, patch, args.batch, source_size=size, seed=0, device=device)
            ms = timed(sampler.sample, device, args.repeats)
            print(f"  {mode:6s} {ms:9.1f} ms/batch   ({cache.describe()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-sampler", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench_augment(args, device)
    if not args.skip_sampler:
        bench_sampler(args, device)


if __name__ == "__main__":
    main()
