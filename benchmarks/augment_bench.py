"""Augmentation throughput: voxseg's default recipe (fast path and the compute-everything reference) against
nnU-Net's default training transforms, and patch-sampling time.

samples/s of the default recipe on B x C x P^3 patches (default 2 x 4 x 128^3) cut from crops of
`source_size(P)` (192^3), on `--threads` CPU threads (default 1):
  - voxseg: `augment_batch` (draws on the host, each transform only for the samples it fires for);
  - voxseg reference: the same draws, every transform computed for every sample and kept with torch.where
    (voxseg.augment.reference, what `augment_batch` did before);
  - nnU-Net: batchgeneratorsv2's transforms with nnU-Net v2.8.1's default parameters
    (nnUNetTrainer.get_training_transforms for a 3D patch without deep supervision, regions or cascade:
    spatial, noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, mirroring), one sample
    at a time as nnU-Net's data loader workers run them, in a separate interpreter from
    benchmarks/.venv-nnunet (create it with --setup-nnunet: pip install torch==2.13.0 nnunetv2==2.8.1).
    Only the transforms are timed: each sample's input copy (they write into it) is made off the clock, as
    voxseg's crop is.
Each figure: `--batches` batches (fresh draws each, the same sequence in every repeat), timed `--repeats`
times after one warm-up on the same draws; median samples/s with min..max.

Which transforms fire is random, and with few samples the two pipelines' draws differ a lot (8 samples may
hold 0 or 3 rotations; a rotated sample costs ~10x an unrotated one). `--rounds R` measures every column R times,
each round on the draws of its own seed (--seed, --seed + 1, ...) and the columns one after the other within a round,
so that load on a shared machine hits them alike; the pooled figure is samples over the summed round times.
`--clock cpu` (one thread only) times the process's CPU time instead of wall time: other work on the machine
then no longer counts against a column, though it still slows both through shared caches and memory.

Run: python benchmarks/augment_bench.py [--patch 128] [--batch 2] [--channels 4] [--threads 1] [--repeats 3]
         [--batches 10] [--rounds 1] [--seed 1] [--clock wall|cpu] [--device cpu] [--no-reference] [--no-nnunet]
         [--sampler] [--setup-nnunet]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's voxseg, not an installed one
VENV = Path(__file__).resolve().parent / ".venv-nnunet"
VENV_PYTHON = VENV / "bin" / "python"
CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time; see main)


def throughput(run_batches: Callable[[], float | None], samples: int, repeats: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """samples/s of `run_batches()` (which processes `samples` samples): median, min, max over repeats (1 warm-up).

    A `run_batches` that returns a number has timed its own work (seconds), leaving out its input copies.
    """
    run_batches()
    rates = []
    for _ in range(repeats):
        sync()
        start = CLOCK()
        own = run_batches()
        sync()
        rates.append(samples / (own if own is not None else CLOCK() - start))
    return {"median": float(np.median(rates)), "min": float(min(rates)), "max": float(max(rates))}


def _inputs(args: argparse.Namespace, device: torch.device, size: tuple[int, ...]):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, args.channels, *size, generator=generator).to(device)
    seg = torch.randint(0, 4, (args.batch, 1, *size), dtype=torch.int8, generator=generator).to(device)
    return image, seg


def bench_voxseg(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from voxseg.augment import AugmentConfig, augment_batch, draw_batch_params, source_size
    from voxseg.augment.reference import augment_reference

    device = torch.device(args.device)
    patch, config = (args.patch,) * 3, AugmentConfig()
    image, seg = _inputs(args, device, source_size(patch, config))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    seed = getattr(args, "seed", 1)

    def fast() -> None:
        rng = np.random.default_rng(seed)
        for _ in range(args.batches):
            augment_batch(image, seg, config, rng, patch)

    def reference() -> None:
        rng = np.random.default_rng(seed)
        for _ in range(args.batches):
            params = draw_batch_params(args.batch, args.channels, patch, config, rng)
            augment_reference(image, seg, params, config, patch)

    samples = args.batch * args.batches
    result = {"voxseg": throughput(fast, samples, args.repeats, sync)}
    if not args.no_reference:
        result["voxseg reference (compute everything)"] = throughput(reference, samples, args.repeats, sync)
    return result


def nnunet_transforms(patch: tuple[int, ...]):
    """nnU-Net v2.8.1's default 3D training transforms (get_training_transforms), built from batchgeneratorsv2."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    angle = 30 / 360 * 2 * np.pi  # nnU-Net's rotation_for_DA for 3D patches
    gamma = dict(gamma=BGContrast((0.7, 1.5)), synchronize_channels=False, p_per_channel=1, p_retain_stats=1)
    return ComposeTransforms([
        SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=(-angle, angle), p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                         border_mode_seg="constant", padding_value_seg=-1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(p_invert_image=1, **gamma), apply_probability=0.1),
        RandomTransform(GammaTransform(p_invert_image=0, **gamma), apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])


def bench_nnunet_worker(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Runs inside benchmarks/.venv-nnunet: nnU-Net's transforms on the same inputs, one sample at a time."""
    patch = (args.patch,) * 3
    transforms = nnunet_transforms(patch)
    image, seg = _inputs(args, torch.device("cpu"), tuple(args.source))
    seg = seg.to(torch.int16)

    def run() -> float:
        """Seconds in the transforms; each sample's fresh input copy (the transforms write into it, as they do
        into the crop nnU-Net's data loader makes) is made outside the clock, as voxseg's crop is."""
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        elapsed = 0.0
        for _ in range(args.batches):
            for b in range(args.batch):
                sample = {"image": image[b].clone(), "segmentation": seg[b].clone()}
                start = CLOCK()
                transforms(**sample)
                elapsed += CLOCK() - start
        return elapsed

    return {"nnU-Net (batchgeneratorsv2)": throughput(run, args.batch * args.batches, args.repeats)}


def run_nnunet(args: argparse.Namespace, source: tuple[int, ...]) -> dict[str, dict[str, float]] | str:
    """nnU-Net's figure from its own interpreter, or why there is none."""
    if not VENV_PYTHON.exists():
        return f"no {VENV} (run with --setup-nnunet)"
    command = [str(VENV_PYTHON), __file__, "--nnunet-worker", "--source", *map(str, source)]
    for name in ("patch", "batch", "channels", "threads", "repeats", "batches", "seed", "clock"):
        command += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode:
        return f"nnU-Net run failed: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def setup_nnunet() -> None:
    """Create benchmarks/.venv-nnunet with nnU-Net (the torch pin takes the local CPU wheel)."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "torch==2.13.0", "nnunetv2==2.8.1"], check=True)


def bench_sampler(args: argparse.Namespace) -> None:
    """PatchSampler.sample for the same batch from a BraTS-sized case in each cache mode (ms per batch)."""
    import tempfile

    from voxseg.augment import AugmentConfig, source_size
    from voxseg.data.store import sample_foreground_locations, save_case
    from voxseg.train.cache import CaseCache
    from voxseg.train.sampler import PatchSampler

    shape, patch, device = (155, 240, 240), (args.patch,) * 3, torch.device(args.device)
    size = source_size(patch, AugmentConfig())
    with tempfile.TemporaryDirectory() as tmp:
        image = np.random.default_rng(0).normal(size=(args.channels, *shape)).astype(np.float16)
        seg = np.zeros((1, *shape), np.int8)
        seg[0, 60:90, 100:140, 100:150] = 1
        save_case(tmp, "case", image, seg, {"name": "case"}, sample_foreground_locations(seg, [1]))
        for mode in ("gpu", "pinned", "mmap"):
            cache = CaseCache(tmp, ["case"], device=device, mode=mode)
            sampler = PatchSampler(cache, patch, args.batch, source_size=size, seed=0)
            rate = throughput(sampler.sample, args.batch, args.repeats)
            print(f"PatchSampler {mode:6s} {args.batch / rate['median'] * 1000:8.1f} ms/batch of {size} crops")


def pooled(rates: list[dict[str, float]]) -> dict[str, float]:
    """Rounds of equal sample counts as one figure: samples over the summed median times (harmonic mean)."""
    medians = [r["median"] for r in rates]
    return {"median": len(medians) / sum(1 / m for m in medians), "min": min(medians), "max": max(medians)}


def report(results: dict[str, dict[str, float]]) -> None:
    """One line per column; the ratio is against nnU-Net (or the reference when nnU-Net was not run)."""
    peer = results.get("nnU-Net (batchgeneratorsv2)") or results.get("voxseg reference (compute everything)")
    for name, rate in results.items():
        ratio = f"{rate['median'] / peer['median']:5.2f}x" if peer else ""
        print(f"  {name:40s} {rate['median']:7.2f} samples/s  ({rate['min']:.2f}..{rate['max']:.2f})  {ratio}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    for name, default in (("patch", 128), ("batch", 2), ("channels", 4), ("threads", 1), ("repeats", 3),
                          ("batches", 10), ("rounds", 1), ("seed", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time this process's CPU time, not wall time (a machine shared with other work)")
    parser.add_argument("--no-reference", action="store_true", help="skip the compute-everything reference")
    parser.add_argument("--no-nnunet", action="store_true")
    parser.add_argument("--sampler", action="store_true", help="also time PatchSampler.sample")
    parser.add_argument("--setup-nnunet", action="store_true", help=f"create {VENV} first")
    parser.add_argument("--nnunet-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.threads != 1 or args.device != "cpu":
            parser.error("--clock cpu measures one CPU thread: use it with --threads 1 --device cpu")
        global CLOCK
        CLOCK = time.process_time
    if args.nnunet_worker:
        print(json.dumps(bench_nnunet_worker(args)))
        return
    if args.setup_nnunet:
        setup_nnunet()
    from voxseg.augment import AugmentConfig, source_size

    source = source_size((args.patch,) * 3, AugmentConfig())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), {args.device}: batch {args.batch} x "
          f"{args.channels} ch x {args.patch}^3 from {source} crops, {args.batches} batches x {args.repeats} repeats"
          f" x {args.rounds} round(s), {args.clock} clock")
    rounds, first_seed = [], args.seed
    for index in range(args.rounds):  # each round: every column once, on the draws of its own seed
        args.seed = first_seed + index
        results = bench_voxseg(args)
        nnunet = None if args.no_nnunet or args.device != "cpu" else run_nnunet(args, source)
        if isinstance(nnunet, dict):
            results.update(nnunet)
        elif nnunet:
            print(f"nnU-Net not measured: {nnunet}")
        if args.rounds > 1:
            print(f"round {index + 1} (seed {args.seed}):")
        report(results)
        rounds.append(results)
    if args.rounds > 1:
        print(f"all {args.rounds} rounds ({args.rounds * args.batch * args.batches} samples, each round's median "
              f"time): samples / total time, and the min..max of the rounds' medians")
        report({name: pooled([r[name] for r in rounds]) for name in rounds[0]})
    if args.sampler:
        bench_sampler(args)


if __name__ == "__main__":
    main()
