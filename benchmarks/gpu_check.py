"""Everything a GPU session must measure, in one command: benchmarks/gpu_check.sh [--device cuda|cpu] [--quick]
[--out DIR] [--keep].

Stages (benchmarks/gpu_check_stages.py), each with a time budget and its own error handling, so that one broken
stage records {"error": ...} and the others still report:
  1. environment: device, torch / CUDA / cuDNN versions, GPU memory, CPU count;
  2. `pytest -m gpu -q` in a subprocess: passed / failed / skipped and the output's tail;
  3. a BraTS-sized synthetic dataset (4 channels, 155x240x240, 6 cases on CUDA; 64^3 with --quick, smaller and
     with the demo's shrunk network on a CPU), planned for the device's memory (8 GB on a CPU) and preprocessed;
  4. on CUDA, `voxseg plan --calibrate`: the memory model fitted to real steps of candidate configurations and
     the work directory planned again with it (the fit and the plan before/after are recorded);
  5. the training step with data on the device and end to end with 4 CPU threads (`time_training`: bf16 and
     compile as the defaults choose), waiting for data (GPU time between steps on CUDA, the host's wait for a
     batch on a CPU), peak memory after warm-up (reserved + context on CUDA) against the (calibrated) estimate;
  6. inference file to file: 1 fold without TTA and 5 folds with 8 mirrors (one initialised checkpoint copied
     to fold_0..fold_4: speed does not depend on the weights);
  7. augmentation throughput (`augment_batch`, 2 x 4 x 128^3 on CUDA).
Writes OUT/gpu_check.json (OUT default benchmarks/results), on CUDA also OUT/gpu_check_<device>.json, and
OUT/gpu_check.md, the Markdown table it prints for BENCHMARKS.md. The synthetic data lives in a temporary
directory, removed at the end unless --keep.

Time: the training step's cold torch.compile runs in a stage of its own ("warmup", before "training"), timed
and reported but not part of the step timings; if it runs past its budget the training stage is timed
without compile (and says so) instead of failing. Every stage's budget is cut to what is left of the check's
total (`gpu_check_stages.stage_budget`: 510 s on CUDA), so a CUDA run ends within 8.5 minutes whatever happens.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's voxseg, then augment_bench / gpu_check_stages

KEYS = ("step_ms_device", "step_ms_end_to_end", "data_wait_fraction", "peak_memory_gb", "infer_s_1fold",
        "infer_s_5fold_tta")
STAGES = ("environment", "pytest", "dataset", "calibrate", "warmup", "training", "inference", "augment")


class StageTimeout(Exception):
    """A stage ran past its budget (raised in the main thread by SIGALRM)."""


def run_stage(name: str, budget_s: float, function: Callable[[], Any], report: dict[str, Any]) -> Any:
    """`function()` within `budget_s` seconds; on any failure records report["errors"][name] and returns None."""
    print(f"[gpu_check] {name} (budget {budget_s:.0f} s)", flush=True)
    alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def on_alarm(signum: int, frame: Any) -> None:
        raise StageTimeout(f"ran past its budget of {budget_s:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm) if alarm else None
    if alarm:
        signal.setitimer(signal.ITIMER_REAL, budget_s)
    start = time.perf_counter()
    try:
        return function()
    except Exception as exc:  # one broken stage must not lose the others' numbers
        traceback.print_exc()
        report["errors"][name] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        return None
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        report["stage_seconds"][name] = round(time.perf_counter() - start, 1)
        release_memory()


def release_memory() -> None:
    """Free what a stage left (an out-of-memory stage above all) before the next one measures."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="small cases (64^3 on CUDA, 48^3 on a CPU)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and the table")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data and work directory")
    parser.add_argument("--skip", action="append", default=[], choices=STAGES, help="leave out a stage")
    parser.add_argument("--cases", type=int, default=0, help="override the number of synthetic cases")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="override the synthetic case shape")
    parser.add_argument("--iterations", type=int, default=0, help="override the timed steps per round")
    parser.add_argument("--threads", type=int, default=4,
                        help="CPU threads of the training step (default 4, at most the CPU count)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB to plan for (default: the device's memory on CUDA, 8 on a CPU)")
    return parser.parse_args(argv)


def check_install() -> None:
    """Exit with a clear message when voxseg or its dependencies cannot be imported."""
    try:
        import voxseg  # noqa: F401
        import voxseg.bench.timing  # noqa: F401  (pulls in torch, numpy)
        import voxseg.data.synth  # noqa: F401  (scipy, the image I/O)
    except ImportError as exc:
        sys.exit(f"gpu_check: cannot import voxseg ({exc}); install the project first, as the README says "
                 "(pip install -e . in the repository root); this script installs nothing")


def resolve_device(name: str | None) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda was asked for but torch sees no CUDA device "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def measure(args: argparse.Namespace, device: Any, root: Path, report: dict[str, Any]) -> None:
    """Run every stage not skipped, filling `report`; later stages need the dataset stage's work directory."""
    import gpu_check_stages as stages

    sizes = stages.sizes_for(device, args)
    report["sizes"] = {k: v for k, v in sizes.__dict__.items() if k != "budgets"}
    budgets = sizes.budgets
    report["budgets_s"] = budgets
    report["total_budget_s"] = sizes.total_budget_s

    def after_warmup() -> tuple[list[str], str | None]:  # read when the training stage starts
        return stages.training_overrides(report.get("warmup"), report["errors"].get("warmup"))

    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("environment", lambda: stages.environment(device)),
        ("pytest", lambda: stages.gpu_tests(budgets["pytest"] * 0.95)),
        ("dataset", lambda: stages.dataset(root, device, sizes, args.gpu_memory)),
        ("calibrate", lambda: stages.calibration(root / "work", device)),
        ("warmup", lambda: stages.compile_warmup(root / "work", device, sizes, args.threads)),
        ("training", lambda: stages.training(root / "work", device, sizes, args.threads, after_warmup())),
        ("inference", lambda: stages.inference(root / "work", device, sizes)),
        ("augment", lambda: stages.augmentation(device, sizes)),
    ]
    start = time.perf_counter()
    for name, job in jobs:
        budget = stages.stage_budget(budgets[name], time.perf_counter() - start, sizes.total_budget_s)
        if name in args.skip:
            report[name] = {"skipped": True}
        elif name in ("calibrate", "warmup", "training", "inference") and not report.get("dataset"):
            report["errors"][name] = "not run: the dataset stage failed or was skipped"
        elif budget is None:
            report["errors"][name] = f"not run: the check's total budget of {sizes.total_budget_s:g} s was spent"
        else:
            report[name] = run_stage(name, budget, job, report)


def headline(report: dict[str, Any]) -> None:
    """The top-level keys BENCHMARKS.md quotes (None, with an entry in errors, when their stage failed)."""
    training, inference = report.get("training") or {}, report.get("inference") or {}

    def milliseconds(key: str) -> float | None:
        return round(training[key] * 1000, 2) if key in training else None

    report.update({
        "step_ms_device": milliseconds("device_step_s"), "step_ms_end_to_end": milliseconds("end_to_end_step_s"),
        **_data_wait(training), "peak_memory_gb": training.get("peak_memory_gb"),
        "estimated_memory_gb": training.get("estimated_memory_gb"),
        "infer_s_1fold": inference.get("1_fold_no_tta_s"), "infer_s_5fold_tta": inference.get("5_folds_8_mirrors_s"),
        "augment_samples_per_s": (report.get("augment") or {}).get("samples_per_s"),
    })
    for key in KEYS:
        if report[key] is None:
            stage = "training" if key in KEYS[:4] else "inference"
            skipped = report.get(stage) == {"skipped": True}
            report["errors"].setdefault(stage, f"skipped (--skip {stage})" if skipped else
                                        f"the {stage} stage gave no '{key}'")


def _data_wait(training: dict[str, Any]) -> dict[str, Any]:
    """The headline data wait, named for what it measures: on CUDA the GPU's time between steps, else the
    training thread's wait for a batch prepared on the host."""
    if training.get("gpu_data_wait_fraction") is not None:
        return {"data_wait_fraction": training["gpu_data_wait_fraction"], "data_wait_kind": "GPU time between steps"}
    return {"data_wait_fraction": training.get("host_data_wait_fraction"),
            "data_wait_kind": "host waiting for a batch"}


def _cell(value: Any, form: str, unit: str = "") -> str:
    return "n/a (see errors)" if value is None else f"{value:{form}}{unit}"


def markdown_table(report: dict[str, Any]) -> str:
    """The measurements as a Markdown table for BENCHMARKS.md."""
    env, data = report.get("environment") or {}, report.get("dataset") or {}
    plan, training, tests = data.get("plan") or {}, report.get("training") or {}, report.get("pytest") or {}
    augment, sizes = report.get("augment") or {}, report.get("sizes") or {}
    ranges = {k: training.get(k) or [None, None] for k in ("device_step_range_s", "end_to_end_range_s")}
    spread = {k: f" ({v[0] * 1000:.1f}..{v[1] * 1000:.1f})" if v[0] is not None else "" for k, v in ranges.items()}
    rows = [
        ("device", f"{report['device']}, torch {env.get('torch')}, "
                   + (f"CUDA {env.get('cuda')}, {env.get('gpu_memory_gb')} GB GPU memory, " if env.get("cuda") else "")
                   + f"{env.get('cpu_count')} CPUs"),
        ("pytest -m gpu", f"{tests.get('passed')} passed, {tests.get('failed')} failed, "
                          f"{tests.get('skipped')} skipped, {tests.get('errors')} errors"
                          if tests and tests.get("skipped") is not True else "n/a"),
        ("synthetic data", f"{sizes.get('cases')} cases x 4 x {'x'.join(map(str, sizes.get('shape', [])))}"),
        ("plan", f"patch {plan.get('patch_size')} x batch {plan.get('batch_size')}, features "
                 f"{plan.get('features')}, planned for {plan.get('gpu_memory_gb')} GB"),
        ("memory calibration", _calibration_cell(report.get("calibrate") or {})),
        ("torch.compile warm-up (not in the step times)", _warmup_cell(report.get("warmup") or {},
                                                                     training.get("compile_note"))),
        ("step, data on the device", _cell(report["step_ms_device"], ".1f", " ms") + spread["device_step_range_s"]),
        (f"step, end to end, {training.get('cpu_threads', '?')} CPU threads (amp {training.get('amp')}, "
         f"compile {training.get('compile')})",
         _cell(report["step_ms_end_to_end"], ".1f", " ms") + spread["end_to_end_range_s"]),
        (f"waiting for data ({report.get('data_wait_kind', '?')})",
         _cell(report["data_wait_fraction"] and report["data_wait_fraction"] * 100, ".1f", " %")),
        (f"peak memory ({training.get('memory_kind', '?')}) / plan estimate",
         f"{_cell(report['peak_memory_gb'], '.2f', ' GB')} / {_cell(report['estimated_memory_gb'], '.2f', ' GB')}"),
        ("predict 1 fold, no TTA (file to file)", _cell(report["infer_s_1fold"], ".2f", " s/case")),
        ("predict 5 folds, 8 mirrors (file to file)", _cell(report["infer_s_5fold_tta"], ".2f", " s/case")),
        (f"augment_batch, 2 x 4 x {augment.get('patch', '?')}^3", _cell(report["augment_samples_per_s"], ".1f",
                                                                        " samples/s")),
        ("wall time of the check", f"{report['total_s']:.0f} s"),
    ]
    if training.get("noisy"):
        rows.append(("timing", "NOISE: rounds spread > 20% or end to end < device step"))
    rows += [(f"error: {stage}", message.splitlines()[0][:200]) for stage, message in report["errors"].items()]
    return "\n".join(["| measure | result |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def _warmup_cell(warmup: dict[str, Any], note: str | None) -> str:
    if note:
        return note
    if "warmup_s" not in warmup:
        return str(warmup.get("skipped") or "n/a")
    return (f"{warmup['warmup_s']:.1f} s (build {warmup['build_s']:.1f} s, first step {warmup['first_step_s']:.1f} s, "
            f"last of {warmup['steps']} steps {warmup['last_step_s'] * 1000:.0f} ms)")


def _calibration_cell(fit: dict[str, Any]) -> str:
    if "scale" not in fit:
        return str(fit.get("skipped") or "n/a")
    after = fit.get("after") or {}
    return (f"measured ~= {fit['scale']:.3f} x model + {fit['fixed_gb']:.2f} GB; plan now patch "
            f"{after.get('patch_size')} x batch {after.get('batch_size')}")


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, write OUT/gpu_check.json (and OUT/gpu_check_<device>.json on CUDA), print the table."""
    args = parse_args(argv)
    check_install()
    device = resolve_device(args.device)
    start = time.perf_counter()
    report: dict[str, Any] = {"device": None, "device_type": device.type, "quick": args.quick,
                              "command": " ".join(["benchmarks/gpu_check.sh", *(argv or sys.argv[1:])]),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "errors": {}, "stage_seconds": {}}
    root = Path(tempfile.mkdtemp(prefix="voxseg_gpu_check_"))
    try:
        measure(args, device, root, report)
    finally:
        if args.keep:
            print(f"[gpu_check] kept the synthetic data and work directory in {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    from voxseg.bench.benchmark import device_name

    report["device"] = (report.get("environment") or {}).get("device") or device_name(device)
    headline(report)
    report["total_s"] = round(time.perf_counter() - start, 1)
    write_outputs(report, args.out, device.type == "cuda", markdown_table(report))
    return report


def write_outputs(report: dict[str, Any], out: Path, on_cuda: bool, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str) + "\n"
    (out / "gpu_check.json").write_text(text)
    if on_cuda:
        (out / f"gpu_check_{slug(report['device'])}.json").write_text(text)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    print(f"[gpu_check] {report['total_s']:.0f} s in all; wrote {out / 'gpu_check.json'}"
          + (f"; errors in: {', '.join(report['errors'])}" if report["errors"] else ""))


if __name__ == "__main__":
    main()
