"""The measuring stages of benchmarks/gpu_check.py; each returns a plain dict of what it measured.

Every stage reuses the project's own timing code (voxseg.bench and benchmarks/augment_bench.py) so that the
figures a GPU session records are the ones `voxseg benchmark` and the augmentation benchmark report.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DATASET_NAME = "Dataset001_Synth"
CUDA_PLAN_FALLBACK_GB = 8.0
"""GPU memory to plan for on a CPU (the planner's default budget)."""


@dataclass
class Sizes:
    """How big each stage's work is for one device and mode; budgets are seconds per stage."""

    cases: int
    shape: tuple[int, int, int]
    iterations: int
    warmup: int
    repeats: int
    augment_patch: int
    augment_batches: int
    infer_repeats: int
    max_features: int | None = None
    """Cap of the feature maps (a CPU shrinks the plan as `voxseg demo` does); None keeps the plan's network."""
    max_patch: int = 0
    budgets: dict[str, float] = field(default_factory=dict)
    total_budget_s: float = 0.0
    """The whole check's budget: a stage gets its own budget or what is left of this, whichever is less."""


# The training step is timed in two stages. "warmup" builds the training as "training" will and runs its first
# steps: a cold torch.compile of the 3D U-Net's forward + loss + backward (1-3 minutes on an H100) happens
# there, is timed and reported, and leaves the compiled graphs in torch's in-memory and on-disk caches.
# "training" then finds them warm (seconds) and times the steady state. A warm-up that runs past its budget
# does not fail the check: the training stage is timed without compile and says so (`training_overrides`).
CUDA_BUDGETS = {"environment": 20, "pytest": 80, "dataset": 110, "calibrate": 45, "warmup": 180, "training": 90,
                "inference": 90, "augment": 30}
CPU_BUDGETS = {"environment": 20, "pytest": 180, "dataset": 180, "calibrate": 10, "warmup": 120, "training": 300,
               "inference": 300, "augment": 120}
CUDA_TOTAL_S = 510.0
"""The CUDA check ends within 8.5 minutes whatever a stage does (typically 4-6 minutes)."""
CPU_TOTAL_S = 1500.0
MIN_STAGE_S = 5.0
"""A stage is not started with less than this left of the total budget."""
SIZES = {
    ("cuda", False): Sizes(6, (155, 240, 240), iterations=20, warmup=5, repeats=3, augment_patch=128,
                           augment_batches=10, infer_repeats=2, budgets=CUDA_BUDGETS, total_budget_s=CUDA_TOTAL_S),
    ("cuda", True): Sizes(6, (64, 64, 64), iterations=10, warmup=3, repeats=3, augment_patch=128,
                          augment_batches=5, infer_repeats=2, budgets=CUDA_BUDGETS, total_budget_s=CUDA_TOTAL_S),
    ("cpu", False): Sizes(6, (64, 64, 64), iterations=6, warmup=2, repeats=3, augment_patch=64,
                          augment_batches=3, infer_repeats=1, max_features=64, max_patch=48, budgets=CPU_BUDGETS,
                          total_budget_s=CPU_TOTAL_S),
    ("cpu", True): Sizes(6, (48, 48, 48), iterations=4, warmup=1, repeats=3, augment_patch=48,
                         augment_batches=2, infer_repeats=1, max_features=32, max_patch=32, budgets=CPU_BUDGETS,
                         total_budget_s=CPU_TOTAL_S),
}


def stage_budget(own_s: float, elapsed_s: float, total_s: float) -> float | None:
    """Seconds a stage may run: its own budget, cut to what is left of the total; None when less than
    MIN_STAGE_S is left (the stage is not started). Example: own 90, 480 of 510 s spent -> 30."""
    left = total_s - elapsed_s
    return None if left < MIN_STAGE_S else min(float(own_s), left)


def sizes_for(device: torch.device, args: argparse.Namespace) -> Sizes:
    """The preset for the device and --quick, with --cases / --shape / --iterations applied."""
    preset = SIZES[(device.type, bool(args.quick))]
    sizes = Sizes(**{**preset.__dict__, "budgets": dict(preset.budgets)})
    if args.cases:
        sizes.cases = args.cases
    if args.shape:
        sizes.shape = tuple(args.shape)  # type: ignore[assignment]
    if args.iterations:
        sizes.iterations = args.iterations
    return sizes


# ----- 1. environment --------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Device, software versions, GPU memory and CPU count."""
    from voxseg.bench.benchmark import device_name

    info: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "gpu_memory_gb": None, "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = round(properties.total_memory / 2**30, 2)
        info["compute_capability"] = f"{properties.major}.{properties.minor}"
    return info


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


# ----- 2. pytest -m gpu ------------------------------------------------------------------------------------
def gpu_tests(timeout_s: float) -> dict[str, Any]:
    """Run `pytest -m gpu -q` in a subprocess; counts per outcome and the output's tail."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr) + f"\n[timed out after {timeout_s:.0f} s]"
        returncode = None
    counts = {outcome: 0 for outcome in ("passed", "failed", "skipped", "errors", "deselected")}
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)
    if not found:  # no summary line: pytest missing, a collection crash or the timeout
        raise RuntimeError(f"pytest gave no summary (exit status {returncode}): ...{output[-600:]}")
    for number, outcome in found:
        counts["errors" if outcome.startswith("error") else outcome] = int(number)
    return {"command": " ".join(command[1:]), "returncode": returncode, **counts,
            "seconds": round(time.perf_counter() - start, 1), "tail": output[-3000:]}


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


# ----- 3. dataset: synthesise, plan, preprocess ------------------------------------------------------------
def dataset(root: Path, device: torch.device, sizes: Sizes, gpu_memory_gb: float | None) -> dict[str, Any]:
    """Write the synthetic dataset under `root`, plan it into root/work and preprocess it."""
    from voxseg.bench.benchmark import time_preprocessing
    from voxseg.data.plan import plan_dataset
    from voxseg.data.preprocess import preprocess_dataset
    from voxseg.data.synth import make_synthetic_dataset
    from voxseg.demo import shrink_plan_for_cpu
    from voxseg.workdir import WorkDir

    workdir = root / "work"
    memory = gpu_memory_gb or (_gpu_memory_gb(device) if device.type == "cuda" else CUDA_PLAN_FALLBACK_GB)
    start = time.perf_counter()
    raw = make_synthetic_dataset(root / DATASET_NAME, num_cases=sizes.cases, shape=sizes.shape, seed=0)
    synth_s = time.perf_counter() - start
    start = time.perf_counter()
    workers = max(1, min(8, os.cpu_count() or 1))
    plan = plan_dataset(raw, workdir, gpu_memory_gb=memory, num_workers=workers)
    if sizes.max_features is not None:  # a CPU trains the planned network far too slowly: shrink as the demo does
        plan = shrink_plan_for_cpu(plan, sizes.max_features, patch=sizes.max_patch)
        plan.save(WorkDir(workdir).plans)
    plan_s = time.perf_counter() - start
    stats = preprocess_dataset(workdir, num_workers=workers, progress=False)
    return {
        "workdir": str(workdir), "cases": sizes.cases, "shape": list(sizes.shape), "channels": 4,
        "synth_s": round(synth_s, 2), "plan_s": round(plan_s, 2), "preprocess_s": round(stats["seconds"], 2),
        "preprocess_cases_per_s": stats.get("cases_per_s"), "preprocess_workers": workers,
        "plan": {"gpu_memory_gb": memory, "patch_size": plan.patch_size, "batch_size": plan.batch_size,
                 "features": plan.network.features, "estimated_memory_gb": plan.estimated_memory_gb,
                 "shrunk_for_cpu": sizes.max_features is not None},
        "one_case": time_preprocessing(plan, device),
    }


def _gpu_memory_gb(device: torch.device) -> float:
    return round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)


# ----- 4. memory calibration ------------------------------------------------------------------------------
def calibration(workdir: Path, device: torch.device) -> dict[str, Any]:
    """`voxseg plan --calibrate` on the work directory: the fit, and the plan before and after it.

    On CUDA the training stage then runs the calibrated plan, so its peak memory checks the calibrated estimate.
    """
    from voxseg.plans import Plan

    if device.type != "cuda":
        return {"skipped": "needs a CUDA device; the memory formula is used as it is"}
    from voxseg.bench.calibrate import calibrate_workdir, cuda_measure, device_name
    from voxseg.workdir import WorkDir

    before = Plan.load(WorkDir(workdir).plans)
    start = time.perf_counter()
    after, fit = calibrate_workdir(workdir, cuda_measure(device), device_name(device))
    return {
        "seconds": round(time.perf_counter() - start, 2), "device": fit.device, "scale": fit.scale,
        "fixed_gb": fit.fixed_gb, "points": fit.points,
        "before": {"patch_size": before.patch_size, "batch_size": before.batch_size,
                   "estimated_memory_gb": before.estimated_memory_gb},
        "after": {"patch_size": after.patch_size, "batch_size": after.batch_size,
                  "estimated_memory_gb": after.estimated_memory_gb},
    }


# ----- 5. training step: the compile warm-up, then the steady state ---------------------------------------
def _training_config(workdir: Path, device: torch.device, threads: int, overrides: list[str] | None = None
                     ) -> tuple[Any, Any, Any, int]:
    """(config, effective plan, run setup, threads) of the timed training, as `voxseg benchmark` sets it up."""
    from voxseg.bench.timing import config_for, training_cases
    from voxseg.train.loop import effective_plan, resolve

    threads = max(1, min(threads, os.cpu_count() or threads))  # more threads than cores only adds contention
    torch.set_num_threads(threads)
    config = config_for(device.type, threads, overrides)
    plan = effective_plan(workdir, config)
    return config, plan, resolve(config, plan, len(training_cases(workdir))), threads


def compile_warmup(workdir: Path, device: torch.device, sizes: Sizes, threads: int) -> dict[str, Any]:
    """Build the training exactly as the training stage will and run its first steps on one batch: the time of
    the build, of the first step (a cold torch.compile) and of the whole warm-up; nothing when compile is off."""
    from voxseg.bench.timing import sync, training_cases
    from voxseg.train.loop import build_training, seed_everything

    config, plan, setup, _ = _training_config(workdir, device, threads)
    if not setup.compile:
        return {"compile": False, "skipped": f"torch.compile is off on {device.type} (loop.compile=auto)"}
    seed_everything(config.loop.seed, False, config.data.num_threads)
    start = time.perf_counter()
    built = build_training(workdir, plan, config, setup, training_cases(workdir), [])
    build_s = time.perf_counter() - start
    batch = built.data.next_batch()
    step_s = []
    for _ in range(max(2, sizes.warmup)):  # the first compiles; a second may recompile (e.g. grad state)
        step_start = time.perf_counter()
        built.step(*batch)
        sync(device)
        step_s.append(time.perf_counter() - step_start)
    return {"compile": True, "build_s": round(build_s, 2), "first_step_s": round(step_s[0], 2),
            "steps": len(step_s), "last_step_s": round(step_s[-1], 4),
            "warmup_s": round(time.perf_counter() - start, 2)}


def training_overrides(warmup: dict[str, Any] | None, warmup_error: str | None) -> tuple[list[str], str | None]:
    """The training stage's config overrides after the warm-up, and why: none when the warm-up compiled (or
    compile is off); compile off when the warm-up failed or ran past its budget, so that a cold compile can
    neither fail nor time out the timed stage."""
    if warmup is not None and warmup.get("skipped") is True:  # --skip warmup: no cold compile in the timing
        return ["loop.compile=off"], "timed without torch.compile: the compile warm-up was skipped (--skip warmup)"
    if warmup_error is None and warmup is not None:
        return [], None
    why = warmup_error or "the warm-up stage did not run"
    return ["loop.compile=off"], f"timed without torch.compile: the compile warm-up failed ({why.splitlines()[0]})"


def training(workdir: Path, device: torch.device, sizes: Sizes, threads: int,
             overrides: tuple[list[str], str | None] = ([], None)) -> dict[str, Any]:
    """Device step and end-to-end step with `threads` CPU threads; peak memory against the plan's estimate.
    `overrides` comes from `training_overrides` (the warm-up's outcome)."""
    from voxseg.bench.timing import time_training

    items, note = overrides
    if items and not _training_config(workdir, device, threads)[2].compile:
        items, note = [], None  # compile is off on this device anyway
    config, plan, setup, threads = _training_config(workdir, device, threads, items)
    start = time.perf_counter()
    timing = time_training(workdir, config, iterations=sizes.iterations, warmup=sizes.warmup,
                           repeats=sizes.repeats).to_dict()
    estimate = plan.estimated_memory_gb
    amp = str(setup.amp_dtype).replace("torch.", "") if setup.amp_dtype else None
    return {
        **timing, "cpu_threads": threads, "amp": amp,
        "compile": setup.compile, "iterations": sizes.iterations, "warmup": sizes.warmup, "repeats": sizes.repeats,
        "seconds": round(time.perf_counter() - start, 2), "compile_note": note, "estimated_memory_gb": estimate,
        "peak_over_estimate": round(timing["peak_memory_gb"] / estimate, 3) if estimate else None,
    }


# ----- 6. inference, file to file --------------------------------------------------------------------------
def inference(workdir: Path, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Seconds per case: 1 fold without TTA, and 5 folds (one initialised checkpoint copied) with 8 mirrors."""
    from voxseg.bench.benchmark import time_predictor
    from voxseg.data.dataset import load_dataset
    from voxseg.infer.predictor import Predictor

    plan = _write_fold_checkpoints(workdir, folds=5)
    case = load_dataset(plan.raw_dataset).cases[0]
    files = (case.name, list(case.image_files))
    one = Predictor.from_workdir(workdir, folds=[0], device=device, mirror_axes=None)
    one_s = time_predictor(one, files, device, repeats=sizes.infer_repeats)
    del one
    five = Predictor.from_workdir(workdir, folds=[0, 1, 2, 3, 4], device=device, mirror_axes="all")
    five_s = time_predictor(five, files, device, repeats=sizes.infer_repeats)
    return {"case": case.name, "1_fold_no_tta_s": one_s, "5_folds_8_mirrors_s": five_s,
            "repeats": sizes.infer_repeats, "amp": device.type == "cuda"}


def _write_fold_checkpoints(workdir: Path, folds: int) -> Any:
    """training/fold_0..fold_{folds-1}/checkpoint_final.pt: one freshly built network of the effective plan.

    Speed does not depend on the weights, so no training is needed; the files are in the format
    `voxseg.checkpoint.network_from_checkpoint` reads, so this also checks what `voxseg predict` loads.
    """
    from voxseg.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from voxseg.config import TrainConfig
    from voxseg.models import build_network
    from voxseg.train.loop import Progress, effective_plan
    from voxseg.workdir import WorkDir

    config = TrainConfig()
    plan = effective_plan(workdir, config)
    state = {"format": CHECKPOINT_FORMAT, "model": build_network(plan, deep_supervision=False).state_dict(),
             "plan": plan.to_dict(), "config": config.to_dict(), "progress": Progress().state_dict()}
    first = save_checkpoint(WorkDir(workdir).fold(0).checkpoint("final"), state)
    for fold in range(1, folds):
        target = WorkDir(workdir).fold(fold).checkpoint("final")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, target)
    return plan


# ----- 7. augmentation throughput --------------------------------------------------------------------------
def augmentation(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """samples/s of `augment_batch` on batches of 2 x 4 channels x P^3 (benchmarks/augment_bench.py's timing)."""
    import augment_bench  # benchmarks/ is on sys.path (see gpu_check.py)

    args = argparse.Namespace(device=str(device), patch=sizes.augment_patch, batch=2, channels=4,
                              batches=sizes.augment_batches, repeats=3, no_reference=True)
    rates = augment_bench.bench_voxseg(args)["voxseg"]
    return {"patch": sizes.augment_patch, "batch": 2, "channels": 4, "batches": sizes.augment_batches,
            "samples_per_s": rates["median"], "samples_per_s_range": [rates["min"], rates["max"]]}
