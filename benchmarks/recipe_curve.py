"""Validation Dice versus training wall-clock time for training recipes (voxseg.train.recipes): nnunet vs fast.

Both recipes train the same network from the same initial weights on the same patches (same seed), in one
process, interleaved epoch by epoch: the recipe whose training clock is behind runs next, so a background load
slows both alike while both run. A recipe's clock counts its training epochs and its per-epoch pseudo-Dice
validation (what a real run spends); the full sliding-window validation that draws the curve is not counted.

A recipe's length is scaled by --epoch-scale (the fast recipe's 250 epochs and nnunet's 1000 keep their ratio;
warm-up epochs scale alike) and --iterations sets the iterations per epoch (default: the recipe's 250), so a
CPU run is a miniature of the real schedules. Each recipe runs its whole (scaled) schedule unless --budget
seconds stops it first.

Writes OUT/recipe_curve.json (curves, settings, machine), OUT/recipe_curve.png and OUT/runs/RECIPE/log.jsonl,
and prints a markdown table (Dice at times, time to reach Dice thresholds).

Run:
    python benchmarks/recipe_curve.py OUT                      # CPU miniature: 24 cases of 48^3, small network
    python benchmarks/recipe_curve.py OUT --device cuda --brats  # 155x240x240 cases, the planned network
    python benchmarks/recipe_curve.py OUT --recipes "nnunet,fast,fast3=fast;optim.lr=3e-3"  # a variant
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxseg.config import TrainConfig, apply_overrides
from voxseg.data.splits import get_fold
from voxseg.devices import cpu_name, resolve_device
from voxseg.errors import VoxsegError
from voxseg.infer.validation import full_validation
from voxseg.jsonio import write_json_atomic
from voxseg.plans import Plan
from voxseg.train import loop
from voxseg.train.evaluation import validation_config
from voxseg.train.logger import TrainLogger
from voxseg.train.recipes import recipe_overrides
from voxseg.workdir import WorkDir


# ----- data ---------------------------------------------------------------------------------------------------
def prepare_data(out: Path, args: argparse.Namespace) -> Path:
    """Synthetic dataset -> plan (shrunk for a CPU unless --brats) -> preprocessed work directory (reused)."""
    from voxseg.data.plan import describe_plan, plan_dataset
    from voxseg.data.preprocess import preprocess_dataset
    from voxseg.data.synth import make_synthetic_dataset
    from voxseg.demo import shrink_plan_for_cpu

    dataset, workdir = out / "data" / "Dataset001_Synth", out / "work"
    if not (dataset / "dataset.json").is_file():
        start = time.perf_counter()
        make_synthetic_dataset(dataset, num_cases=args.cases, shape=tuple(args.shape), seed=0)
        print(f"synthesised {args.cases} cases of {args.shape} in {time.perf_counter() - start:.0f} s", flush=True)
    if not WorkDir(workdir).plans.is_file():
        plan = plan_dataset(dataset, workdir, gpu_memory_gb=args.gpu_memory, val_fraction=0.25)
        if not args.brats:
            plan = shrink_plan_for_cpu(plan, max_features=args.max_features, patch=args.patch)
            plan.save(WorkDir(workdir).plans)
    print(describe_plan(Plan.load(WorkDir(workdir).plans)), flush=True)
    preprocess_dataset(workdir, num_workers=args.workers, progress=False)
    return workdir


# ----- recipes ------------------------------------------------------------------------------------------------
def parse_recipes(text: str) -> dict[str, list[str]]:
    """'nnunet,fast,fast3=fast;optim.lr=3e-3' -> {name: overrides}; a variant is BASE then extra overrides."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, spec = item.partition("=")
        base, *extra = (spec or name).split(";")
        out[name] = recipe_overrides(base) + [e for e in extra if e]
    return out


def recipe_config(overrides: list[str], args: argparse.Namespace) -> TrainConfig:
    """The recipe's config, scaled to the benchmark: epochs and warm-up x epoch_scale, the benchmark's data."""
    config = apply_overrides(TrainConfig(), overrides)
    scale = args.epoch_scale
    warmup = config.schedule.warmup_epochs
    iterations = args.iterations or config.data.iterations_per_epoch
    val_iterations = args.val_iterations or max(1, round(config.loop.val_iterations * iterations / 250))
    return apply_overrides(config, [
        f"loop.epochs={max(1, round(config.loop.epochs * scale))}",
        f"schedule.warmup_epochs={max(1, round(warmup * scale)) if warmup else 0}",
        f"data.iterations_per_epoch={iterations}", f"loop.val_iterations={val_iterations}",
        f"loop.device={args.device}", f"loop.seed={args.seed}", "loop.full_val=false", "loop.patience=0",
        "logging.tensorboard=false", "logging.progress_png=false", "logging.progress_bar=false",
    ])


@dataclass
class Runner:
    """One recipe's training state, clock and curve."""

    name: str
    overrides: list[str]
    config: TrainConfig
    setup: loop.RunSetup
    training: loop.Training
    logger: TrainLogger
    eval_epochs: set[int]
    clock: float = 0.0  # seconds of training epochs + pseudo-Dice validation
    iterations: int = 0
    points: list[dict[str, Any]] = field(default_factory=list)  # full validation
    epochs: list[dict[str, Any]] = field(default_factory=list)  # per-epoch log records (subset)
    stopped: bool = False

    @property
    def done(self) -> bool:
        return self.stopped or self.training.progress.epoch >= self.config.loop.epochs


def build_runner(name: str, config: TrainConfig, overrides: list[str], eval_every: int, workdir: Path, out: Path,
                 names: tuple[list[str], list[str]]) -> Runner:
    plan = loop.effective_plan(workdir, config)
    setup = loop.resolve(config, plan, len(names[0]))
    loop.seed_everything(config.loop.seed, config.loop.deterministic, config.data.num_threads)  # same init
    training = loop.build_training(workdir, plan, config, setup, names[0], names[1])
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    logger = TrainLogger(run_dir, config.logging, config.loop.epochs)
    eval_epochs = set(range(eval_every, config.loop.epochs + 1, eval_every)) | {config.loop.epochs}
    return Runner(name, overrides, config, setup, training, logger, eval_epochs)


def warm_up(r: Runner) -> None:
    """Forward + backward on a validation batch, gradients dropped: torch.compile, cuDNN autotuning and oneDNN
    set-up happen outside the clock, without changing the weights or drawing from the training generators."""
    image, seg = next(iter(r.training.data.val_batches(1)))
    r.training.model.train()
    total, _ = r.training.step._forward_loss(image, seg)
    total.backward()
    r.training.optimizer.zero_grad(set_to_none=True)
    _sync(r.setup.device)


def train_epoch(r: Runner) -> None:
    """One epoch as `loop.fit` runs it (train, pseudo-Dice + EMA, schedule step, log.jsonl), on the clock."""
    training, config = r.training, r.config
    record = loop.run_epoch(training.step, training.data, r.logger, training.progress.epoch, r.setup,
                            training.plan.batch_size)
    record.update(loop.validate_epoch(training.model, training.loss_fn, training.data, training.plan, config, r.setup,
                                      training.progress))
    training.scheduler.step(training.progress.ema)
    training.progress.epoch += 1
    r.clock += record["epoch_time"] + record["val_time"]
    r.iterations += record["iterations"]
    record["clock_s"] = r.clock
    r.logger.log_epoch(record)
    r.epochs.append({k: record.get(k) for k in ("epoch", "clock_s", "lr", "epoch_time", "batch_time",
                                                 "pseudo_dice_mean", "ema_dice")} | {"loss": record["loss"]["loss"]})


def evaluate(r: Runner, workdir: Path, val_names: list[str]) -> None:
    """Full sliding-window validation Dice of the current weights (off the clock)."""
    _sync(r.setup.device)
    plan = r.training.plan
    summary = full_validation(r.training.model, plan, WorkDir(workdir).preprocessed, val_names, None, r.setup.device,
                              validation_config(plan, r.setup.amp_dtype))  # as training validates, nothing written
    last = r.epochs[-1] if r.epochs else {}
    r.points.append({"epoch": r.training.progress.epoch, "clock_s": r.clock, "iterations": r.iterations,
                     "dice": summary["mean_dice"], "dice_per_class": summary["mean"],
                     "pseudo_dice": last.get("pseudo_dice_mean"), "ema_dice": last.get("ema_dice")})
    print(f"  {r.name:>8}  epoch {r.training.progress.epoch:4d}/{r.config.loop.epochs}  {r.clock:7.1f} s  "
          f"{r.iterations:6d} it  Dice {summary['mean_dice']:.4f}", flush=True)


def race(runners: list[Runner], workdir: Path, val_names: list[str], budget: float | None) -> None:
    """Interleave epochs: always advance the recipe whose clock is furthest behind."""
    for r in runners:
        warm_up(r)
        evaluate(r, workdir, val_names)  # epoch 0: the shared initial weights
    while not all(r.done for r in runners):
        r = min((r for r in runners if not r.done), key=lambda r: r.clock)
        train_epoch(r)
        r.stopped = budget is not None and r.clock >= budget
        if r.training.progress.epoch in r.eval_epochs or r.done:
            evaluate(r, workdir, val_names)
    for r in runners:
        r.logger.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- results ------------------------------------------------------------------------------------------------
def first_reaching(points: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    return next((p for p in points if p["dice"] is not None and p["dice"] >= threshold), None)


def summarise(runners: list[Runner], fractions: list[float], thresholds: list[float] | None) -> dict[str, Any]:
    """Per recipe: final Dice, clock, step time; thresholds: absolute, or fractions of the first recipe's final."""
    reference = runners[0].points[-1]["dice"]
    levels = thresholds or [round(f * reference, 3) for f in fractions]
    out: dict[str, Any] = {"thresholds": levels, "reference": runners[0].name, "recipes": {}}
    for r in runners:
        times = [e["batch_time"] for e in r.epochs]
        median = statistics.median(times)
        reach = {}
        for level in levels:
            p = first_reaching(r.points, level)
            reach[str(level)] = None if p is None else {"clock_s": p["clock_s"], "iterations": p["iterations"],
                                                        "epoch": p["epoch"]}
        out["recipes"][r.name] = {
            "final_dice": r.points[-1]["dice"], "best_dice": max(p["dice"] for p in r.points),
            "clock_s": r.clock, "epochs": r.training.progress.epoch, "iterations": r.iterations,
            "median_s_per_iteration": median,
            # > 1.5: some epochs ran much slower than the median (another process competed for the cores)
            "slowest_epoch_vs_median": max(times) / median if median else math.nan,
            "reach": reach,
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    summary, curves = result["summary"], result["curves"]
    names = list(curves)
    longest = max(s["clock_s"] for s in summary["recipes"].values())
    marks = sorted({longest * f for f in (0.125, 0.25, 0.5, 0.75)}
                   | {s["clock_s"] for s in summary["recipes"].values()})
    lines = ["| training time (s) | " + " | ".join(f"{n} Dice" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for mark in marks:
        cells = []
        for n in names:
            seen = [p for p in curves[n]["points"] if p["clock_s"] <= mark + 1e-6]
            done = summary["recipes"][n]["clock_s"] < mark - 1e-6  # its schedule ended before this time
            cells.append(f"{seen[-1]['dice']:.3f}" + (" (finished)" if done else ""))
        lines.append(f"| {mark:.{0 if longest >= 100 else 1}f} | " + " | ".join(cells) + " |")
    lines += ["", "| recipe | final Dice | epochs x iterations | training time (s) | s/iteration (median) | "
              "slowest epoch / median | " + " | ".join(f"time to Dice {t}" for t in summary["thresholds"]) + " |",
              "|---|---:|---:|---:|---:|---:|" + "---:|" * len(summary["thresholds"])]
    for n in names:
        s = summary["recipes"][n]
        reach = []
        for t in summary["thresholds"]:
            p = s["reach"][str(t)]
            reach.append("not reached" if p is None else f"{p['clock_s']:.0f} s ({p['iterations']} it)")
        lines.append(f"| {n} | {s['final_dice']:.3f} | {s['epochs']} x {curves[n]['iterations_per_epoch']} | "
                     f"{s['clock_s']:.0f} | {s['median_s_per_iteration']:.3f} | {s['slowest_epoch_vs_median']:.1f} | "
                     + " | ".join(reach) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # object API: Agg rendering, no pyplot state

    fig = Figure(figsize=(12, 4.5))
    ax_time, ax_iter = fig.subplots(1, 2, sharey=True)
    for name, curve in result["curves"].items():
        points, epochs = curve["points"], curve["epochs"]
        line, = ax_time.plot([p["clock_s"] for p in points], [p["dice"] for p in points], "o-",
                             label=f"{name} (full val)")
        ax_time.plot([e["clock_s"] for e in epochs], [e["pseudo_dice_mean"] for e in epochs], ":", alpha=0.5,
                     color=line.get_color(), label=f"{name} pseudo-Dice")
        ax_iter.plot([p["iterations"] for p in points], [p["dice"] for p in points], "o-", color=line.get_color(),
                     label=name)
    for level in result["summary"]["thresholds"]:
        for axis in (ax_time, ax_iter):
            axis.axhline(level, color="grey", lw=0.6, ls="--")
    ax_time.set_xlabel("training wall-clock (s)")
    ax_iter.set_xlabel("training iterations")
    ax_time.set_ylabel("validation Dice (mean over classes)")
    ax_time.set_title(result["title"], fontsize=9)
    for axis in (ax_time, ax_iter):
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (data, runs, recipe_curve.json/.png)")
    p.add_argument("--recipes", default="nnunet,fast", help="recipe names or variants NAME=BASE;key=value;...")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--brats", action="store_true", help="155x240x240 cases and the planned network (for a GPU)")
    p.add_argument("--cases", type=int, help="synthetic cases (default 24; 40 with --brats)")
    p.add_argument("--shape", type=int, nargs=3, help="case shape (default 48 48 48; 155 240 240 with --brats)")
    p.add_argument("--epoch-scale", type=float, default=0.1, help="fraction of each recipe's epochs (default 0.1)")
    p.add_argument("--iterations", type=int, help="iterations per epoch (default 8 on CPU, else the recipe's)")
    p.add_argument("--val-iterations", type=int, help="pseudo-Dice batches per epoch (default: the recipe's "
                                                      "50 per 250 iterations, scaled)")
    p.add_argument("--points", type=int, default=10,
                   help="full validations of the shortest recipe; the others at the same epoch spacing (default 10)")
    p.add_argument("--budget", type=float, help="stop a recipe after this many training seconds")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.95, 0.98],
                   help="Dice thresholds as fractions of the first recipe's final Dice")
    p.add_argument("--thresholds", type=float, nargs="+", help="absolute Dice thresholds instead")
    p.add_argument("--gpu-memory", type=float, default=8.0, help="planner's GPU memory budget (GB)")
    p.add_argument("--max-features", type=int, default=64, help="CPU network: feature cap")
    p.add_argument("--patch", type=int, default=32, help="CPU network: patch edge")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    args.cases = args.cases or (40 if args.brats else 24)
    args.shape = args.shape or ([155, 240, 240] if args.brats else [48, 48, 48])
    if args.iterations is None and not args.device.startswith("cuda"):
        args.iterations = 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    recipes = parse_recipes(args.recipes)
    resolve_device(args.device, option="--device")  # a missing GPU fails now, not after the data is made
    workdir = prepare_data(out, args)
    names = get_fold(workdir, 0)
    configs = {name: recipe_config(overrides, args) for name, overrides in recipes.items()}
    # the same evaluation spacing for every recipe (the shortest gets --points), so no curve is coarser
    eval_every = max(1, math.ceil(min(c.loop.epochs for c in configs.values()) / args.points))
    runners = [build_runner(n, configs[n], recipes[n], eval_every, workdir, out, names) for n in recipes]
    print(f"{len(names[0])} training / {len(names[1])} validation cases; "
          + "; ".join(f"{r.name}: {r.config.loop.epochs} epochs x {r.setup.iterations} it" for r in runners),
          flush=True)
    start = time.perf_counter()
    race(runners, workdir, names[1], args.budget)
    device = runners[0].setup.device
    info = machine(device)
    scale = "BraTS-sized" if args.brats else "CPU miniature"
    result: dict[str, Any] = {
        "title": f"{scale}: {args.cases} cases {'x'.join(map(str, args.shape))}, {info.get('gpu', info['processor'])}, "
                 f"{info['torch_threads']} threads",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - start,
        "curves": {r.name: {"overrides": r.overrides, "epochs_total": r.config.loop.epochs,
                            "iterations_per_epoch": r.setup.iterations, "batch_size": r.training.plan.batch_size,
                            "patch_size": r.training.plan.patch_size, "optim": vars(r.config.optim),
                            "schedule": vars(r.config.schedule), "points": r.points, "epochs": r.epochs}
                   for r in runners},
    }
    result["summary"] = summarise(runners, args.fractions, args.thresholds)
    write_json_atomic(out / "recipe_curve.json", result)
    plot(result, out / "recipe_curve.png")
    print(f"\n{result['title']}; benchmark wall time {result['wall_s']:.0f} s\n")
    print(markdown(result))
    print(f"\nwrote {out / 'recipe_curve.json'} and {out / 'recipe_curve.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VoxsegError as exc:  # a missing GPU, a bad recipe name: the message says what to do
        print(f"recipe_curve: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
