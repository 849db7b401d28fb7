"""Preprocessing and case-store measurements on one BraTS-sized synthetic case (4 x 155 x 240 x 240).

Prints:
  - preprocess_case time (crop + z-score, and with resampling) per device;
  - random 128^3 patch read time from a memory-mapped float16 .npy (warm page cache and, where the OS allows,
    cold: pages evicted with posix_fadvise) vs a compressed .npz (which must be inflated whole for any patch);
  - float16 storage error of z-scored intensities.

Run: python benchmarks/preprocess_bench.py [--repeats 20] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from voxseg.data.io import Geometry
from voxseg.data.preprocess import preprocess_case
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan

SHAPE = (155, 240, 240)
PATCH = 128


def make_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Brain-like ellipsoid of smooth intensities plus noise; zeros outside; spherical labels."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in SHAPE], indexing="ij", sparse=True)
    radius2 = grids[0] ** 2 / 0.7 + grids[1] ** 2 / 0.8 + grids[2] ** 2 / 0.6
    brain = radius2 < 1.0
    image = np.zeros((4, *SHAPE), np.float32)
    for c in range(4):
        smooth = 300 + 100 * c + 80 * np.sin(3 * grids[0] + c) * np.cos(2 * grids[1]) + 40 * grids[2]
        image[c] = np.where(brain, smooth + rng.normal(0, 25, SHAPE).astype(np.float32), 0)
    seg = np.zeros(SHAPE, np.uint8)
    seg[radius2 < 0.15], seg[radius2 < 0.06], seg[radius2 < 0.02] = 1, 2, 3
    return image, seg


def make_plan(target: tuple[float, float, float]) -> Plan:
    return Plan(
        dataset_name="bench", raw_dataset="", channel_names={str(c): f"ch{c}" for c in range(4)},
        labels={"background": 0, "a": 1, "b": 2, "c": 3}, file_ending=".nii.gz", target_spacing=list(target),
        patch_size=[128, 128, 128], batch_size=2, network=NetworkPlan(),
        normalization=[ChannelNormalization("zscore", use_nonzero_mask=True) for _ in range(4)],
    )


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_preprocess(image: np.ndarray, seg: np.ndarray, device: str) -> None:
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    mb = image.nbytes / 1e6
    for target in [(1.0, 1.0, 1.0), (1.5, 1.2, 1.2)]:
        plan = make_plan(target)
        preprocess_case(image, geometry, plan, seg, device=device)  # warm-up (CUDA context, allocator)
        seconds = timed(lambda: preprocess_case(image, geometry, plan, seg, device=device), repeats=2)
        print(f"preprocess_case {device:5s} target {target}: {seconds:.2f} s ({mb / seconds:.0f} MB/s raw float32)")


def random_slices(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[slice, ...]:
    starts = [int(rng.integers(0, s - PATCH + 1)) for s in shape[1:]]
    return (slice(None), *[slice(a, a + PATCH) for a in starts])


def evict(path: Path) -> bool:
    """Drop the file's pages from the page cache (no root needed for clean pages); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def bench_patch_reads(image_pp: np.ndarray, seg_pp: np.ndarray, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fg = sample_foreground_locations(seg_pp, [1, 2, 3], seed="bench")
        seconds = timed(lambda: save_case(tmp, "case", image_pp, seg_pp, {"name": "case"}, fg, image_dtype="float16"))
        npy = tmp / "case.npy"
        print(f"save_case (float16 .npy + seg + fg + json): {seconds:.2f} s, "
              f"image file {npy.stat().st_size / 1e6:.0f} MB")
        npz = tmp / "case.npz"
        seconds = timed(lambda: np.savez_compressed(npz, image=image_pp.astype(np.float16)))
        print(f"np.savez_compressed: {seconds:.2f} s, file {npz.stat().st_size / 1e6:.0f} MB")

        rng = np.random.default_rng(0)
        mapped = np.load(npy, mmap_mode="r")
        warm = [timed(lambda: np.array(mapped[random_slices(mapped.shape, rng)])) for _ in range(repeats)]
        print(f"128^3 patch, mmap .npy, warm cache: median {np.median(warm) * 1e3:.1f} ms")
        cold = []
        for _ in range(repeats):
            if not evict(npy):
                break
            cold.append(timed(lambda: np.array(np.load(npy, mmap_mode="r")[random_slices(mapped.shape, rng)])))
        if cold:
            print(f"128^3 patch, mmap .npy, cold cache (fadvise): median {np.median(cold) * 1e3:.1f} ms")
        packed = [timed(lambda: np.load(npz)["image"][random_slices(mapped.shape, rng)])
                  for _ in range(max(3, repeats // 4))]
        print(f"128^3 patch, compressed .npz: median {np.median(packed) * 1e3:.1f} ms")


def bench_float16(image_pp: np.ndarray) -> None:
    inside = image_pp != 0
    half = image_pp.astype(np.float16).astype(np.float32)
    error = np.abs(half - image_pp)[inside]
    relative = error / np.maximum(np.abs(image_pp[inside]), 1e-3)
    print(
        f"float16 storage of z-scored values (range {image_pp.min():.1f}..{image_pp.max():.1f}): "
        f"max abs error {error.max():.2e}, mean abs error {error.mean():.2e}, max relative error {relative.max():.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, case 4x{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}")
    image, seg = make_case()
    bench_preprocess(image, seg, "cpu")
    if args.device != "cpu":
        bench_preprocess(image, seg, args.device)
    image_pp, seg_pp, _ = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), make_plan((1.0, 1.0, 1.0)),
                                          seg)
    bench_float16(image_pp)
    bench_patch_reads(image_pp, seg_pp, args.repeats)


if __name__ == "__main__":
    main()
