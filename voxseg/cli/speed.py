"""Speed and demo commands: benchmark, estimate, demo."""
from __future__ import annotations

import argparse

from voxseg.cli.common import (
    Subparsers,
    add_command,
    add_configuration_flag,
    configuration_workdir,
    csv_ints,
    device,
    usable_device,
)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from voxseg.bench.benchmark import format_benchmark, run_benchmark

    result = run_benchmark(
        configuration_workdir(args.workdir, args.configuration), device=args.device, num_threads=args.threads,
        iterations=args.iterations, warmup=args.warmup, inference=not args.no_inference, output=args.output,
        repeats=args.repeats,
    )
    print(format_benchmark(result))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from voxseg.bench.estimate import EstimateRequest, run_estimate
    from voxseg.bench.estimate_table import format_estimate
    from voxseg.bench.rowtiming import Schedule

    request = EstimateRequest(
        batch_sizes=args.batch_sizes, num_samples=args.num_samples, patch_sizes=args.patch_sizes,
        baseline=args.baseline, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
        cases=args.cases, current_epoch_s=args.current_epoch_time, device=args.device, threads=args.threads,
        schedule=Schedule(warmup=args.warmup, iterations=args.iterations, rounds=args.rounds),
        overrides=list(args.set or []),
    )
    table = run_estimate(configuration_workdir(args.workdir, args.configuration), request, output=args.output)
    print(format_estimate(table))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from voxseg.demo import run_demo

    run_demo(args.workdir, epochs=args.epochs, device=usable_device(args.device), quick=args.quick)
    return 0


def add_speed_commands(sub: Subparsers) -> None:
    add_command(sub, "benchmark", cmd_benchmark,
                "measure step time, data wait, samples/s, memory, preprocessing and inference time",
                "voxseg benchmark work/synth --threads 4\nvoxseg benchmark work/brats --device cuda --threads 2",
                setup=_benchmark_arguments)
    add_command(sub, "estimate", cmd_estimate,
                "what-if table of training time: batch sizes, patches per case, patch sizes, epochs, against "
                "your current run",
                "voxseg estimate work/brats --cases 329 --current-epoch-time 302 --batch-sizes 2,4 "
                "--num-samples 1,2 --epochs 1000,500\n"
                "voxseg estimate work/synth --device cpu --iterations-per-epoch 0", setup=_estimate_arguments)
    p = add_command(sub, "demo", cmd_demo,
                    "the whole pipeline on the built-in synthetic dataset: synth, plan, preprocess, train, predict, "
                    "evaluate", "voxseg demo\nvoxseg demo work/demo --epochs 20 --device cuda")
    p.add_argument("workdir", nargs="?", default="voxseg_work/demo",
                   help="where the dataset, model and predictions go (default voxseg_work/demo)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 12 on a CPU, 50 on a GPU, 2 with --quick)")
    p.add_argument("--device", type=device, default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")


def _benchmark_arguments(p: argparse.ArgumentParser) -> None:
    from voxseg.bench.benchmark import BenchmarkOptions  # torch: only when the command is used

    defaults = BenchmarkOptions()  # the one home of the benchmark's defaults
    p.add_argument("workdir", help="a planned and preprocessed work directory (a trained fold is not needed)")
    add_configuration_flag(p)
    p.add_argument("--device", type=device, default=defaults.device,
                   help=f"auto (CUDA when available), cpu, cuda or cuda:N (default {defaults.device})")
    p.add_argument("--threads", type=int, default=defaults.num_threads,
                   help=f"CPU threads for the data path (default {defaults.num_threads})")
    p.add_argument("--iterations", type=int, default=defaults.iterations,
                   help=f"timed training steps per round (default {defaults.iterations})")
    p.add_argument("--warmup", type=int, default=defaults.warmup,
                   help=f"untimed training steps first (cuDNN autotuning, caches) (default {defaults.warmup})")
    p.add_argument("--repeats", type=int, default=defaults.repeats,
                   help="interleaved rounds of both step timings; medians and spread are reported "
                        f"(default {defaults.repeats})")
    p.add_argument("--no-inference", action="store_true",
                   help="skip the inference timings (1 fold without mirroring, 5 folds with)")
    p.add_argument("--output", help="benchmark.json path (default WORKDIR/benchmark.json)")


def _estimate_arguments(p: argparse.ArgumentParser) -> None:
    from voxseg.bench.estimate import EstimateRequest  # torch: only when the command is used

    defaults = EstimateRequest()  # the one home of the estimate's defaults (its timing schedule included)
    p.add_argument("workdir", help="a planned and preprocessed work directory")
    add_configuration_flag(p)
    p.add_argument("--batch-sizes", type=csv_ints, help="batch sizes to compare (default: the baseline's)")
    p.add_argument("--num-samples", type=csv_ints,
                   help="patches per case to compare (default: the baseline's)")
    p.add_argument("--patch-sizes", nargs="*", type=csv_ints,
                   help="patch sizes to compare, e.g. 128,128,128 96,96,96 (default: the baseline's)")
    p.add_argument("--baseline", type=csv_ints, metavar="BATCH,PATCHES_PER_CASE[,PATCH]",
                   help="the setting of the run you have, row #1 (default: the plan's batch and patch, "
                        "data.num_samples patches per case)")
    p.add_argument("--epochs", type=csv_ints, default=defaults.epochs,
                   help="epochs; the first is the baseline's, more values add rows "
                        f"(default {','.join(map(str, defaults.epochs))})")
    p.add_argument("--iterations-per-epoch", type=int, default=defaults.iterations_per_epoch,
                   help="training iterations per epoch; 0 = one pass over the training cases "
                        f"(default {defaults.iterations_per_epoch})")
    p.add_argument("--cases", type=int, default=None,
                   help="training cases of the run you ask about, e.g. 329 for fold 0 of 5 on 411 cases "
                        "(default: fold 0's training cases in WORKDIR)")
    p.add_argument("--current-epoch-time", type=float, default=None, metavar="SECONDS",
                   help="seconds per epoch of your run in the baseline setting: epochs and totals are scaled "
                        "to it by the ratios measured here (default: none, this machine's times)")
    schedule = defaults.schedule
    p.add_argument("--warmup", type=int, default=schedule.warmup,
                   help=f"warm-up steps per setting (default {schedule.warmup})")
    p.add_argument("--iterations", type=int, default=schedule.iterations,
                   help=f"timed steps per setting per round (default {schedule.iterations})")
    p.add_argument("--rounds", type=int, default=schedule.rounds,
                   help=f"timing rounds per setting; speed-ups are median (min-max) over them (default "
                        f"{schedule.rounds})")
    p.add_argument("--device", type=device, default=defaults.device,
                   help=f"auto, cpu, cuda or cuda:N (default {defaults.device})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch uses; 1 is steadiest on a shared machine (default: all it uses now)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="training config override every setting starts from, e.g. loop.compile=off "
                        "(repeatable; default none)")
    p.add_argument("--output", help="estimate.json path (default WORKDIR/estimate.json)")
