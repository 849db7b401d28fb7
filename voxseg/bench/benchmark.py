"""`voxseg benchmark WORKDIR`: where the time goes on this device, measured.

Reports the device step time (data already on the device), the end-to-end step time (sampling +
augmentation + step), waiting for data (on CUDA the GPU's time between steps; where batches are made on the
host, the training thread's wait), samples/s, peak memory after warm-up (on CUDA reserved + context, set
against the plan's estimate, which models the same quantity), the time to preprocess one raw case, and
inference time per case file-to-file (1 fold without mirroring; 5 folds with mirroring along every axis the
model allows), with `voxseg predict`'s defaults otherwise (`voxseg.infer.config.InferConfig`). `--threads`
limits the CPU threads, so the same command shows what 2, 4 or 16 cores give. Inference uses freshly
initialised networks of the planned shape when no trained fold exists: speed does not depend on the weights.
"""
from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxseg.bench.timing import config_for, sync, time_training
from voxseg.configtree import replace_fields
from voxseg.errors import DatasetError
from voxseg.infer.config import InferConfig
from voxseg.jsonio import write_json_atomic
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _first_raw_case(plan: Plan) -> tuple[str, list[Path]]:
    from voxseg.data.dataset import load_dataset

    dataset = load_dataset(plan.raw_dataset)
    if not dataset.cases:
        raise DatasetError(f"{plan.raw_dataset}: no training cases to time preprocessing and inference on")
    case = dataset.cases[0]
    return case.name, case.image_files


def time_preprocessing(plan: Plan, device: torch.device, repeats: int = 2) -> dict[str, float]:
    """Seconds to read one raw case and to preprocess it (crop, normalise, resample)."""
    from voxseg.data.io import read_channels
    from voxseg.data.preprocess import preprocess_case

    _, files = _first_raw_case(plan)
    start = time.perf_counter()
    image, geometry = read_channels(files)
    read_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        preprocess_case(image, geometry, plan, device=str(device))
        sync(device)
        best = min(best, time.perf_counter() - start)
    return {"read_s": read_s, "preprocess_s": best}


def _models(plan: Plan, count: int, device: torch.device) -> list[torch.nn.Module]:
    from voxseg.models import build_network

    return [build_network(plan, deep_supervision=False).to(device).eval() for _ in range(count)]


def time_inference(plan: Plan, device: torch.device, folds: int, config: InferConfig, repeats: int = 2,
                   workdir: str | Path | None = None) -> float:
    """Seconds per case, file to file (read, preprocess, sliding window, restore, write) with `folds` networks
    and the inference settings `config` (tile step and batch, mirroring, precision, as `voxseg predict` takes
    them); best of `repeats`.

    A cascade stage's time includes its first stage (found from `workdir`), which runs first on every case.
    """
    from voxseg.infer.predictor import Predictor

    def predictor_for(stage: Plan) -> Predictor:
        previous = None
        if stage.previous_stage is not None:
            if workdir is None:
                raise ValueError("time_inference: a cascade stage needs its workdir to find its first stage")
            from voxseg.data.configs import stage_workdir

            previous = predictor_for(Plan.load(WorkDir(stage_workdir(workdir, stage.previous_stage)).plans))
        return Predictor(stage, _models(stage, folds, device), config, device, previous=previous)

    return time_predictor(predictor_for(plan), _first_raw_case(plan), device, repeats)


def time_predictor(predictor: Any, case: tuple[str, list[Path]], device: torch.device, repeats: int = 2) -> float:
    """Seconds for `predictor` to predict `case` file to file; best of `repeats` after one warm-up run."""
    best = float("inf")
    with tempfile.TemporaryDirectory() as out:
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            predictor.predict_files([case], out, progress=False, postprocess=False)
            sync(device)
            if attempt:  # the first run warms up kernels and the allocator
                best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class BenchmarkOptions:
    """What `voxseg benchmark` measures and how long."""

    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    num_threads: int = 4
    """CPU threads torch may use."""
    iterations: int = 20
    """timed training steps per round."""
    warmup: int = 5
    """untimed steps first (autotuning, compile, caches)."""
    repeats: int = 3
    """timing rounds; the figures are their median and range."""
    inference: bool = True
    """also time prediction (1 fold without mirroring, 5 folds with)."""
    overrides: tuple[str, ...] = ()
    """training config overrides (section.field=value) the timed steps run with."""


def run_benchmark(workdir: str | Path, options: BenchmarkOptions | None = None, output: str | Path | None = None,
                  **fields: Any) -> dict[str, Any]:
    """Measure everything listed in the module docstring; writes benchmark.json (or `output`) and returns it.
    `options`/`fields`: what to measure (`BenchmarkOptions`; `fields` replace single ones)."""
    from voxseg.devices import resolve_device

    options = replace_fields(options or BenchmarkOptions(), "benchmark option", **fields)
    workdir = Path(workdir)
    torch.set_num_threads(options.num_threads)
    config = config_for(options.device, options.num_threads, list(options.overrides) or None)
    dev = resolve_device(config.loop.device)
    plan = Plan.load(WorkDir(workdir).plans)
    training = time_training(workdir, config, iterations=options.iterations, warmup=options.warmup,
                             repeats=options.repeats)
    result: dict[str, Any] = {
        "device": device_name(dev), "torch": torch.__version__, "cpu_threads": options.num_threads,
        "plan": {"patch_size": plan.patch_size, "batch_size": plan.batch_size, "features": plan.network.features,
                 "estimated_memory_gb": plan.estimated_memory_gb},
        "training": training.to_dict(),
        "preprocessing": time_preprocessing(plan, dev),
    }
    if options.inference:
        result["inference"] = {
            "1_fold_no_tta_s": time_inference(plan, dev, 1, InferConfig(mirror_axes="none"), workdir=workdir),
            "5_folds_mirror_s": time_inference(plan, dev, 5, InferConfig(), workdir=workdir),
        }
    write_json_atomic(Path(output) if output else WorkDir(workdir).benchmark, result)
    return result


def _milliseconds(median_s: float, range_s: list[float] | None) -> str:
    """'12.3 ms (11.9..13.0)': the median of the rounds and their min..max."""
    text = f"{median_s * 1000:.1f} ms"
    return text + (f" ({range_s[0] * 1000:.1f}..{range_s[1] * 1000:.1f})" if range_s else "")


def _fraction(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value * 100:.1f} %"


def memory_row(training: dict[str, Any], estimate_gb: float | None) -> tuple[str, str]:
    """The peak memory row: on CUDA reserved + context against the plan's estimate (like with like, with their
    ratio); on a CPU the process's peak RSS, which the GPU estimate says nothing about."""
    peak = training["peak_memory_gb"]
    if training.get("memory_kind") == "rss":
        return "peak memory (process RSS)", f"{peak:.2f} GB"
    name = "peak GPU memory (reserved + context) / plan estimate"
    if not estimate_gb:
        return name, f"{peak:.2f} GB / -"
    return name, f"{peak:.2f} GB / {estimate_gb:.2f} GB ({peak / estimate_gb:.2f}x)"


def format_benchmark(result: dict[str, Any]) -> str:
    t = result["training"]
    rows = [
        ("device", f"{result['device']}, torch {result['torch']}, {result['cpu_threads']} CPU threads"),
        ("patch x batch", f"{t['patch_size']} x {t['batch_size']}"),
        ("step, data on device", _milliseconds(t["device_step_s"], t.get("device_step_range_s"))),
        ("step, end to end", _milliseconds(t["end_to_end_step_s"], t.get("end_to_end_range_s"))),
        ("GPU time between steps (data)", _fraction(t.get("gpu_data_wait_fraction"), "n/a (no CUDA device)")),
        ("host waiting for a batch", _fraction(t.get("host_data_wait_fraction"),
                                                "n/a (batches are made on the GPU)")),
        ("samples/s", f"{t['samples_per_s']:.2f}"),
        memory_row(t, result.get("plan", {}).get("estimated_memory_gb")),
        ("read one raw case", f"{result['preprocessing']['read_s']:.2f} s"),
        ("preprocess one case", f"{result['preprocessing']['preprocess_s']:.2f} s"),
    ]
    if "inference" in result:
        rows += [("predict, 1 fold, no TTA", f"{result['inference']['1_fold_no_tta_s']:.2f} s/case"),
                 ("predict, 5 folds, mirroring", f"{result['inference']['5_folds_mirror_s']:.2f} s/case")]
    if t.get("noisy"):
        rows.append(("timing", "NOISE: rounds spread > 20% or end to end < device step; rerun on a quiet machine"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
