"""The `voxseg` command: thin subcommands that parse flags, call the API and print.

Errors a user can cause (VoxsegError) are printed without a traceback and exit with a non-zero code.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

from voxseg.errors import ConfigError, VoxsegError

Handler = Callable[[argparse.Namespace], int]


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def _csv_ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,64,64, got '{value}'") from None


def _csv_floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,1,1, got '{value}'") from None


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{value}'")
    return value


def _usable_device(name: str) -> str:
    """Resolve "auto"; refuse a GPU this machine does not have before any work starts (torch would fail later,
    with a traceback)."""
    from voxseg.devices import resolve_device

    return str(resolve_device(name))


def _key_values(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set '{pair}': expected KEY=VALUE, e.g. --set batch_size=4")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# ----- data ---------------------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from voxseg.data.synth import make_synthetic_dataset

    path = make_synthetic_dataset(
        args.out, num_cases=args.cases, num_test=args.test_cases, shape=tuple(args.shape),
        spacing=tuple(args.spacing), seed=args.seed, regions=args.regions, layout=args.layout,
    )
    print(f"wrote {args.cases} training and {args.test_cases} test cases to {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from voxseg.data import convert

    fn = convert.convert_brats if args.format == "brats" else convert.convert_msd
    path = fn(args.src, args.dst)
    print(f"converted {args.src} -> {path} (nnU-Net v2 layout)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from voxseg.data.check import check_dataset

    report = check_dataset(args.dataset, num_workers=args.workers)
    # a failed check is an error: its report goes to stderr like every other error message
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from voxseg.data.plan import describe_plan, plan_dataset

    plan = plan_dataset(
        args.dataset, args.output, gpu_memory_gb=args.gpu_memory, overrides=_key_values(args.set),
        num_folds=args.folds, val_fraction=args.val_fraction, seed=args.seed, num_workers=args.workers,
        dims=2 if args.two_d else 3,
    )
    print(describe_plan(plan))
    print(f"wrote {args.output}/plans.json, fingerprint.json, splits.json")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from voxseg.data.preprocess import preprocess_dataset

    stats = preprocess_dataset(args.workdir, num_workers=args.workers, progress=not args.quiet,
                               device=_usable_device(args.device))
    print(
        f"preprocessed {stats['done']} cases, skipped {stats['skipped']} already done, "
        f"{stats['seconds']:.1f} s ({stats.get('cases_per_s', 0):.2f} cases/s)"
    )
    return 0


# ----- training -----------------------------------------------------------------------------------------------
def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Translate the common flags into dotted config overrides (the long tail goes through --set)."""
    flags = {
        "loop.epochs": args.epochs, "data.iterations_per_epoch": args.iterations, "plan.batch_size": args.batch_size,
        "data.num_samples": args.num_samples, "optim.name": args.optimizer, "optim.lr": args.lr,
        "schedule.name": args.schedule, "loss.name": args.loss, "loop.val_freq": args.val_freq,
        "loop.patience": args.patience, "loop.save_freq": args.save_freq, "loop.device": args.device,
        "loop.amp": args.amp, "loop.compile": args.compile, "loop.grad_accum": args.grad_accum,
        "loop.grad_clip": args.grad_clip, "loop.seed": args.seed, "data.cache": args.cache,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.loss_weights:
        overrides.append(f"loss.weights={args.loss_weights}")
    if args.residual:
        overrides.append("plan.network.residual=true")
    if args.no_deep_supervision:
        overrides.append("plan.network.deep_supervision=false")
    return overrides + list(args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from voxseg.config import TrainConfig, apply_overrides, load_config_json
    from voxseg.train.loop import train
    from voxseg.train.recipes import apply_recipe

    fold = args.fold
    saved = Path(args.workdir) / "training" / f"fold_{fold}" / "config.json"
    if args.config:
        config = load_config_json(args.config)
    elif args.resume and saved.is_file():
        config = load_config_json(saved)  # a resumed run continues with its own settings (flags still apply)
    else:
        config = TrainConfig()
    if args.recipe:
        config = apply_recipe(config, args.recipe)  # first, so that every other flag overrides it
    config = apply_overrides(config, _train_overrides(args))
    result = train(args.workdir, fold, config, resume=args.resume, test_only=args.test_only, pretrained=args.pretrained)
    summary = {k: v for k, v in result.items() if not isinstance(v, dict)}
    print("training done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def _fold(value: str) -> int | str:
    if value == "all":
        return "all"
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"--fold expects a fold number like 0 or 'all', got '{value}'")
    return int(value)


# ----- inference and evaluation -------------------------------------------------------------------------------
def _folds(value: str) -> list[int] | str:
    if value == "all":
        return "all"
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--folds expects e.g. 0 or 0,1,2 or all, got '{value}'") from None


def cmd_predict(args: argparse.Namespace) -> int:
    from voxseg.infer.predictor import Predictor, find_input_cases

    mirror = None if args.no_mirror else (tuple(args.mirror_axes) if args.mirror_axes else "all")
    if args.backend == "torch":
        _usable_device(args.device)
    predictor = Predictor.from_workdir(
        args.model, folds=args.folds, checkpoint=args.checkpoint, device=args.device, step=args.step,
        mirror_axes=mirror, tile_batch=args.tile_batch, backend=args.backend,
    )
    cases = find_input_cases(args.input, predictor.plan.num_channels, predictor.plan.file_ending)
    postprocess = False if args.no_postprocess else ("force" if args.postprocess else None)
    predictor.predict_files(
        cases, args.output, save_probabilities=args.save_probabilities, continue_run=args.continue_run,
        postprocess=postprocess,
    )
    print(f"wrote {len(cases)} predictions to {args.output}")
    return 0


def _crossval_folds(workdir: str) -> list[int]:
    folds = sorted(int(p.name[5:]) for p in (Path(workdir) / "training").glob("fold_[0-9]*") if p.name[5:].isdigit())
    if not folds:
        raise ConfigError(f"{workdir}/training has no fold_N folders; train folds first ('voxseg train {workdir} --fold N')")
    return folds


def _decide_postprocessing(workdir: Path) -> None:
    """After cross-validation: keep largest-component postprocessing only where it raised the folds' Dice."""
    from voxseg.plans import Plan
    from voxseg.infer.postprocess import POSTPROCESSING_FILE, decide_postprocessing

    plan = Plan.load(workdir / "plans.json")
    spec = decide_postprocessing(workdir / "training" / "crossval", Path(plan.raw_dataset) / "labelsTr", plan.regions,
                                 file_ending=plan.file_ending, out_file=workdir / POSTPROCESSING_FILE)
    print(f"postprocessing decided from cross-validation: {spec} (saved to {workdir / POSTPROCESSING_FILE}; "
          "'voxseg predict' applies it)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from voxseg.evaluate.folder import aggregate_folds, evaluate_folder, format_table

    if args.crossval:
        summary = aggregate_folds(args.crossval, folds=_crossval_folds(args.crossval), num_workers=args.workers,
                                  tolerance_mm=args.tolerance)
        _decide_postprocessing(Path(args.crossval))
    else:
        if not args.pred or not args.ref:
            raise ConfigError("evaluate needs PRED and REF folders, or --crossval WORKDIR")
        summary = evaluate_folder(
            args.pred, args.ref, dataset_json=args.dataset_json, tolerance_mm=args.tolerance, num_workers=args.workers,
        )
    print(format_table(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from voxseg.infer.archive import export_archive
    from voxseg.infer.export import export_onnx

    if not args.onnx and not args.archive:
        raise ConfigError("export needs --onnx FILE and/or --archive ZIP")
    folds = _folds(args.folds)
    if args.onnx:
        if folds != "all" and len(folds) > 1:
            raise ConfigError(f"--onnx exports one fold's network; got --folds {args.folds}. Export each fold to its "
                              "own file (--folds 0 --onnx fold0.onnx, ...) or use --archive for an ensemble")
        fold = folds if folds == "all" else folds[0]
        diff = export_onnx(args.workdir, fold, args.onnx, checkpoint=args.checkpoint)
        print(f"wrote {args.onnx} (onnxruntime vs PyTorch max abs difference {diff:.2e})")
    if args.archive:
        export_archive(args.workdir, args.archive, folds=folds, checkpoint=args.checkpoint)
        print(f"wrote {args.archive}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from voxseg.infer.archive import install_archive

    path = install_archive(args.archive, args.target)
    print(f"installed model into {path}; predict with: voxseg predict -m {path} -i INPUT -o OUTPUT")
    return 0


# ----- speed --------------------------------------------------------------------------------------------------
def cmd_benchmark(args: argparse.Namespace) -> int:
    from voxseg.bench.benchmark import format_benchmark, run_benchmark

    result = run_benchmark(
        args.workdir, device=args.device, num_threads=args.threads, iterations=args.iterations,
        warmup=args.warmup, inference=not args.no_inference, output=args.output,
    )
    print(format_benchmark(result))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from voxseg.bench.estimate import format_estimate, run_estimate

    table = run_estimate(
        args.workdir, batch_sizes=args.batch_sizes, num_samples=args.num_samples, patch_sizes=args.patch_sizes,
        epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch, device=args.device,
        iterations=args.iterations, output=args.output,
    )
    print(format_estimate(table))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from voxseg.demo import run_demo

    run_demo(args.workdir, epochs=args.epochs, device=_usable_device(args.device), quick=args.quick)
    return 0


# ----- parser -------------------------------------------------------------------------------------------------
def _add(sub: argparse._SubParsersAction, name: str, handler: Handler, help_text: str, examples: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=_examples(examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _data_commands(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "synth", cmd_synth, "write a synthetic brain-tumour-like dataset (nnU-Net or BraTS layout)",
             "voxseg synth data/Dataset001_Synth --cases 20 --test-cases 5\nvoxseg synth data/brats --layout brats --shape 155,240,240")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--cases", type=int, default=20, help="training cases (default 20)")
    p.add_argument("--test-cases", type=int, default=0, help="test cases in imagesTs/labelsTs (default 0)")
    p.add_argument("--shape", type=_csv_ints, default=[64, 64, 64], help="D,H,W voxels (default 64,64,64)")
    p.add_argument("--spacing", type=_csv_floats, default=[1.0, 1.0, 1.0], help="mm per voxel (default 1,1,1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regions", action="store_true", help="BraTS regions (whole tumour, core, enhancing) as labels")
    p.add_argument("--layout", choices=["nnunet", "brats"], default="nnunet")

    p = _add(sub, "convert", cmd_convert, "convert a BraTS 2021 folder or a Decathlon task to the nnU-Net v2 layout",
             "voxseg convert brats /data/BraTS2021_TrainingData data/Dataset137_BraTS\nvoxseg convert msd /data/Task01_BrainTumour data/Dataset001_BrainTumour")
    p.add_argument("format", choices=["brats", "msd"])
    p.add_argument("src")
    p.add_argument("dst")

    p = _add(sub, "check", cmd_check, "check a dataset's integrity (files, channels, shapes, geometry, labels, NaN)",
             "voxseg check data/Dataset001_Synth -j 2")
    p.add_argument("dataset")
    p.add_argument("-j", "--workers", type=int, default=1)

    p = _add(sub, "plan", cmd_plan, "check, fingerprint and plan a dataset: writes plans.json, fingerprint.json, splits.json",
             "voxseg plan data/Dataset001_Synth -o work/synth --gpu-memory 8\n"
             "voxseg plan data/brats -o work/brats --set batch_size=4 --set network.residual=true --val-fraction 0.2")
    p.add_argument("dataset")
    p.add_argument("-o", "--output", required=True, help="work directory")
    p.add_argument("--gpu-memory", type=float, default=8.0, help="GPU memory budget in GB (default 8)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a plan field (repeatable)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--val-fraction", type=float, default=None, help="single train/val split instead of folds, e.g. 0.2")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--2d", dest="two_d", action="store_true", help="plan a 2D configuration")
    p.add_argument("-j", "--workers", type=int, default=1)

    p = _add(sub, "preprocess", cmd_preprocess, "crop, resample and normalise every case into the fast case store",
             "voxseg preprocess work/synth -j 2")
    p.add_argument("workdir")
    p.add_argument("-j", "--workers", type=int, default=1)
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (resampling on the GPU)")
    p.add_argument("--quiet", action="store_true")


def _train_command(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "train", cmd_train, "train a 3D U-Net from the plan on one fold",
             "voxseg train work/synth --fold 0\nvoxseg train work/synth --fold all --epochs 200 --optimizer adamw --lr 3e-4 --schedule cosine\n"
             "voxseg train work/synth --fold 0 --recipe fast\n"
             "voxseg train work/synth --fold 0 --resume\nvoxseg train work/synth --fold 0 --set augment.rot90_p=0.5")
    p.add_argument("workdir")
    p.add_argument("--fold", type=_fold, default="0", help="0-4 or all")
    p.add_argument("--config", help="JSON config file (a saved config.json works)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. optim.lr=3e-4")
    p.add_argument("--recipe", metavar="NAME",
                   help="preset applied before the other flags (voxseg.train.recipes): nnunet = the defaults (SGD "
                        "0.99 Nesterov, lr 1e-2, poly, 1000x250) or fast (AdamW, warm-up + cosine, 250x250)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iterations", type=int, help="iterations per epoch (0: one pass over the training cases)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-samples", type=int, help="patches per case per draw")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=["poly", "cosine", "step", "exponential", "plateau"])
    p.add_argument("--loss", help="dice_ce, dice, ce, focal, tversky, dice_focal")
    p.add_argument("--loss-weights", help="e.g. dice=1,ce=0.5")
    p.add_argument("--val-freq", type=int)
    p.add_argument("--patience", type=int, help="early stopping after N epochs without improvement")
    p.add_argument("--save-freq", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--residual", action="store_true", help="residual encoder")
    p.add_argument("--no-deep-supervision", action="store_true")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--compile", choices=["auto", "on", "off"])
    p.add_argument("--cache", choices=["auto", "gpu", "pinned", "mmap"])
    p.add_argument("--device", type=_device, help="auto, cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt")
    p.add_argument("--pretrained", help="load matching weights from a checkpoint")
    p.add_argument("--test-only", action="store_true", help="evaluate a trained checkpoint without training")


def _infer_commands(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "predict", cmd_predict, "segment images with a trained model (sliding window, mirroring, fold ensemble)",
             "voxseg predict -m work/synth -i data/Dataset001_Synth/imagesTs -o preds --folds 0\n"
             "voxseg predict -m work/synth -i case_0000.nii.gz case_0001.nii.gz -o preds --folds all --no-mirror")
    p.add_argument("-m", "--model", required=True, help="work directory with plans.json and training/fold_F")
    p.add_argument("-i", "--input", required=True, nargs="+", help="folder (nnU-Net or BraTS layout) or channel files")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--folds", type=_folds, default=[0], help="0 | 0,1,2 | all (default 0)")
    p.add_argument("--checkpoint", choices=["final", "best"], default="final")
    p.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch (default 0.5)")
    p.add_argument("--no-mirror", action="store_true", help="no mirror test-time augmentation")
    p.add_argument("--mirror-axes", type=_csv_ints, help="axes to mirror, e.g. 0,1,2")
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--save-probabilities", action="store_true")
    p.add_argument("--postprocess", action="store_true", help="force largest-component postprocessing")
    p.add_argument("--no-postprocess", action="store_true")
    p.add_argument("--continue", dest="continue_run", action="store_true", help="skip cases already predicted")

    p = _add(sub, "evaluate", cmd_evaluate, "score predictions: Dice, IoU, HD95, surface Dice, volumes per label and region",
             "voxseg evaluate preds data/Dataset001_Synth/labelsTs --dataset-json data/Dataset001_Synth/dataset.json\n"
             "voxseg evaluate --crossval work/synth")
    p.add_argument("pred", nargs="?")
    p.add_argument("ref", nargs="?")
    p.add_argument("--dataset-json")
    p.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance in mm (default 1)")
    p.add_argument("--crossval", metavar="WORKDIR", help="aggregate the folds' validation predictions")
    p.add_argument("-j", "--workers", type=int, default=1)

    p = _add(sub, "export", cmd_export, "export a trained model to ONNX and/or a shareable archive",
             "voxseg export work/synth --onnx model.onnx --folds 0\nvoxseg export work/synth --archive model.zip --folds all")
    p.add_argument("workdir")
    p.add_argument("--onnx")
    p.add_argument("--archive")
    p.add_argument("--folds", default="0")
    p.add_argument("--checkpoint", choices=["final", "best"], default="final")

    p = _add(sub, "install", cmd_install, "install a model archive (never writes outside TARGET)",
             "voxseg install model.zip models/synth")
    p.add_argument("archive")
    p.add_argument("target")


def _speed_commands(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "benchmark", cmd_benchmark, "measure step time, data wait, samples/s, memory, preprocessing and inference time",
             "voxseg benchmark work/synth --threads 4\nvoxseg benchmark work/brats --device cuda --threads 2")
    p.add_argument("workdir")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--threads", type=int, default=4, help="CPU threads for the data path")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--output", help="benchmark.json path (default WORKDIR/benchmark.json)")

    p = _add(sub, "estimate", cmd_estimate, "what-if table of training time for batch sizes, patches per case, patch sizes, epochs",
             "voxseg estimate work/brats --batch-sizes 2,4,8 --num-samples 1,2 --epochs 200")
    p.add_argument("workdir")
    p.add_argument("--batch-sizes", type=_csv_ints)
    p.add_argument("--num-samples", type=_csv_ints)
    p.add_argument("--patch-sizes", nargs="*", type=_csv_ints)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--iterations-per-epoch", type=int, default=250)
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per configuration")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--output", help="estimate.json path (default WORKDIR/estimate.json)")

    p = _add(sub, "demo", cmd_demo, "the whole pipeline on the built-in synthetic dataset: synth, plan, preprocess, train, predict, evaluate",
             "voxseg demo\nvoxseg demo work/demo --epochs 20 --device cuda")
    p.add_argument("workdir", nargs="?", default="voxseg_work/demo")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxseg", description="Fast 3D medical image segmentation on nnU-Net-format datasets.",
        epilog=_examples("voxseg demo\nvoxseg plan DATASET -o WORKDIR && voxseg preprocess WORKDIR && voxseg train WORKDIR --fold 0"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from voxseg import __version__

    parser.add_argument("--version", action="version", version=f"voxseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _data_commands(sub)
    _train_command(sub)
    _infer_commands(sub)
    _speed_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except VoxsegError as exc:
        print(f"voxseg {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"voxseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
