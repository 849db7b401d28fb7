"""Speed and demo commands: benchmark, estimate, demo."""
from __future__ import annotations

import argparse

from voxseg.cli.common import (
    Subparsers, add_command, add_configuration_flag, configuration_workdir, csv_ints, device, usable_device,
)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from voxseg.bench.benchmark import format_benchmark, run_benchmark

    result = run_benchmark(
        configuration_workdir(args.workdir, args.configuration), device=args.device, num_threads=args.threads, iterations=args.iterations,
        warmup=args.warmup, inference=not args.no_inference, output=args.output, repeats=args.repeats,
    )
    print(format_benchmark(result))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from voxseg.bench.estimate import format_estimate, run_estimate

    table = run_estimate(
        configuration_workdir(args.workdir, args.configuration), batch_sizes=args.batch_sizes, num_samples=args.num_samples, patch_sizes=args.patch_sizes,
        epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch, device=args.device,
        iterations=args.iterations, output=args.output,
    )
    print(format_estimate(table))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from voxseg.demo import run_demo

    run_demo(args.workdir, epochs=args.epochs, device=usable_device(args.device), quick=args.quick)
    return 0


def add_speed_commands(sub: Subparsers) -> None:
    p = add_command(sub, "benchmark", cmd_benchmark,
                    "measure step time, data wait, samples/s, memory, preprocessing and inference time",
                    "voxseg benchmark work/synth --threads 4\nvoxseg benchmark work/brats --device cuda --threads 2")
    p.add_argument("workdir", help="a planned and preprocessed work directory (a trained fold is not needed)")
    add_configuration_flag(p)
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=4, help="CPU threads for the data path (default 4)")
    p.add_argument("--iterations", type=int, default=20, help="timed training steps per round (default 20)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed training steps first (cuDNN autotuning, caches) (default 5)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds of both step timings; medians and spread are reported (default 3)")
    p.add_argument("--no-inference", action="store_true",
                   help="skip the inference timings (1 fold without mirroring, 5 folds with)")
    p.add_argument("--output", help="benchmark.json path (default WORKDIR/benchmark.json)")

    p = add_command(sub, "estimate", cmd_estimate,
                    "what-if table of training time for batch sizes, patches per case, patch sizes, epochs",
                    "voxseg estimate work/brats --batch-sizes 2,4,8 --num-samples 1,2 --epochs 200")
    p.add_argument("workdir", help="a planned and preprocessed work directory")
    add_configuration_flag(p)
    p.add_argument("--batch-sizes", type=csv_ints, metavar="B,B,...",
                   help="batch sizes to time, e.g. 2,4,8 (default: the plan's)")
    p.add_argument("--num-samples", type=csv_ints, metavar="N,N,...",
                   help="patches drawn per loaded case, e.g. 1,2 (default 1)")
    p.add_argument("--patch-sizes", nargs="*", type=csv_ints, metavar="DxHxW",
                   help="patch sizes to time, e.g. 128x128x128 96x160x160 (default: the plan's)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs the total time is extrapolated to (default 1000)")
    p.add_argument("--iterations-per-epoch", type=int, default=250,
                   help="training steps per epoch; 0: one pass over fold 0's training cases (cases x patches "
                        "per case / batch) (default 250)")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per configuration (default 10)")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--output", help="estimate.json path (default WORKDIR/estimate.json)")

    p = add_command(sub, "demo", cmd_demo,
                    "the whole pipeline on the built-in synthetic dataset: synth, plan, preprocess, train, predict, "
                    "evaluate", "voxseg demo\nvoxseg demo work/demo --epochs 20 --device cuda")
    p.add_argument("workdir", nargs="?", default="voxseg_work/demo",
                   help="where the dataset, model and predictions go (default voxseg_work/demo)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 12 on a CPU, 50 on a GPU, 2 with --quick)")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")
