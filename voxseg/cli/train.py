"""`voxseg train`: flags derived from the config tree, then `voxseg.train.api.train_fold`.

`TRAIN_FLAGS` is the one list of short flags: each names the dotted option it sets, and its type, choices,
default and help come from that option's dataclass field (`voxseg.cli.derive`). Every other option is set with
`--set section.field=value`.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from voxseg.cli.common import Spelling, Subparsers, add_command, add_configuration_flag, configuration_workdir, fold
from voxseg.errors import ConfigError

if TYPE_CHECKING:
    from voxseg.config import TrainConfig

# voxseg.cli.derive reads the config tree, which imports torch: it is imported when `voxseg train` is used

TRAIN_FLAGS: dict[str, str] = {
    "--epochs": "loop.epochs",
    "--iterations": "data.iterations_per_epoch",
    "--batch-size": "plan.batch_size",
    "--patch-size": "plan.patch_size",
    "--foreground-oversampling": "plan.foreground_oversampling",
    "--residual": "plan.network.residual",
    "--deep-supervision": "plan.network.deep_supervision",
    "--num-samples": "data.num_samples",
    "--optimizer": "optim.name",
    "--lr": "optim.lr",
    "--schedule": "schedule.name",
    "--loss": "loss.name",
    "--loss-weights": "loss.weights",
    "--class-weights": "loss.class_weights",
    "--focal-gamma": "loss.focal_gamma",
    "--focal-alpha": "loss.focal_alpha",
    "--tversky-alpha": "loss.tversky_alpha",
    "--tversky-beta": "loss.tversky_beta",
    "--val-freq": "loop.val_freq",
    "--patience": "loop.patience",
    "--save-freq": "loop.save_freq",
    "--grad-accum": "loop.grad_accum",
    "--grad-clip": "loop.grad_clip",
    "--amp": "loop.amp",
    "--compile": "loop.compile",
    "--cache": "data.cache",
    "--device": "loop.device",
    "--seed": "loop.seed",
}

# flags of the widely used 3D U-Net training scripts whose voxseg names differ (the underscore spelling of a
# voxseg flag, --batch_size or --class_weights, needs no entry): `voxseg train` answers them with a hint
SCRIPT_SPELLINGS: dict[str, Spelling] = {
    "--loss_weights": Spelling("loss.class_weights", "(per-class weights) or --loss-weights dice=1,ce=1 "
                                                     "(per-term weights)"),
    "--learning_rate": Spelling("--lr"),
    "--num_epochs": Spelling("--epochs"),
    "--n_epochs": Spelling("--epochs"),
    "--max_epochs": Spelling("--epochs"),
    "--weight_decay": Spelling("optim.weight_decay"),
    "--val_interval": Spelling("--val-freq"),
}


def train_request(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `build_train_config` / `train_fold` that the flags ask for: the flags, then
    the --set options, as overrides (an unset flag overrides nothing), and how the run starts."""
    from voxseg.cli.derive import flag_overrides
    from voxseg.train.start import RunStart

    overrides = flag_overrides(args, TRAIN_FLAGS) + list(args.set or [])
    start = RunStart(resume=args.resume or False, pretrained=args.pretrained, force=args.force)
    return dict(config_file=args.config, recipe=args.recipe, overrides=overrides, start=start)


@contextlib.contextmanager
def flags_named_in_errors(args: argparse.Namespace) -> Iterator[None]:
    """A bad value given through a flag is reported as that flag's error (`argument --device: ...`)."""
    from voxseg.cli.derive import blame_flag

    try:
        yield
    except ConfigError as exc:
        blamed = blame_flag(exc, TRAIN_FLAGS, args)
        if blamed is exc:
            raise
        raise blamed from None


def run_location(args: argparse.Namespace) -> tuple[str, int | str]:
    """(work directory, fold) of the command: as given, or for `voxseg train --resume CHECKPOINT` without WORKDIR,
    the run the checkpoint belongs to."""
    if args.workdir is not None:
        return configuration_workdir(args.workdir, args.configuration), args.fold
    if isinstance(args.resume, str):
        from voxseg.train.resume import run_of_checkpoint

        workdir, fold_name = run_of_checkpoint(args.resume)
        return str(workdir), fold(fold_name)
    raise ConfigError("train needs WORKDIR (the work directory), or --resume CHECKPOINT of a run")


def config_from_args(args: argparse.Namespace) -> "TrainConfig":
    """The config `voxseg train` runs with, without running it."""
    from voxseg.train.api import build_train_config

    with flags_named_in_errors(args):
        workdir, fold_name = run_location(args)
        return build_train_config(workdir, fold_name, **train_request(args))


def _launch_local_processes(args: argparse.Namespace) -> int:
    """`voxseg train ... --gpus N`: the same command under torchrun's launcher with N processes on this machine
    (one per GPU, or N gloo processes with --device cpu); returns the launcher's exit code."""
    import subprocess
    import sys

    argv, rest = list(args.argv), []
    while argv:  # drop --gpus N / --gpus=N, keep everything else as given
        item = argv.pop(0)
        if item == "--gpus":
            argv.pop(0)
        elif not item.startswith("--gpus="):
            rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               "-m", "voxseg", *rest]
    print("launching: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


def cmd_train(args: argparse.Namespace) -> int:
    from voxseg.distributed import env_world
    from voxseg.train.api import train_fold

    if args.gpus is not None:
        if args.gpus < 1:
            raise ConfigError(f"--gpus {args.gpus}: give the number of processes, 1 or more")
        if env_world()[1] > 1:
            raise ConfigError("--gpus starts torchrun itself; under torchrun leave it out")
        if args.gpus > 1:
            return _launch_local_processes(args)

    with flags_named_in_errors(args):
        if args.checkpoint and not args.test_only:
            raise ConfigError("--checkpoint chooses the checkpoint --test-only validates; add --test-only")
        test_only = (args.checkpoint or True) if args.test_only else False
        request = train_request(args)  # refuses --force with --resume, and --pretrained with --resume
        workdir, fold_name = run_location(args)
        result = train_fold(workdir, fold_name, test_only=test_only, **request)
    if env_world()[0] != 0:  # under torchrun every rank returns the same result: rank 0 reports it
        return 0
    summary = {k: v for k, v in result.items() if not isinstance(v, dict)}
    print("training done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in summary.items()))
    return 0


def add_train_command(sub: Subparsers) -> None:
    add_command(sub, "train", cmd_train, "train a 3D U-Net from the plan on one fold",
                "voxseg train work/synth --fold 0\n"
                "voxseg train work/synth --fold all --epochs 200 --optimizer adamw --lr 3e-4 --schedule cosine\n"
                "voxseg train work/synth --fold 0 --recipe fast --batch-size 4 --residual\n"
                "voxseg train work/synth --fold 0 --resume\n"
                "voxseg train work/synth --fold 0 --resume --epochs 300 --lr 1e-3"
                "     # new settings from the next epoch\n"
                "voxseg train --resume work/synth/training/fold_0/checkpoint_best.pt\n"
                "voxseg train work/synth --fold 0 --force                             # retrain: deletes the old run\n"
                "voxseg train work/synth --configuration 2d --fold 0\n"
                "voxseg train work/synth --fold 0 --set augment.rot90_p=0.5 --set plan.network.conv_per_stage=3\n"
                "voxseg train work/synth --fold 0 --loss dice_focal --class-weights 1,2,2 --focal-gamma 3",
                setup=_train_arguments, spellings=SCRIPT_SPELLINGS)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from voxseg.cli.derive import ListOptions, add_flags, options_epilog
    from voxseg.train.recipes import recipe_names

    p.epilog = f"{p.epilog}\n\n{options_epilog()}"
    p.add_argument("workdir", nargs="?",
                   help="the work directory written by 'voxseg plan' and 'voxseg preprocess'; may be left out with "
                        "--resume CHECKPOINT")
    add_configuration_flag(p)
    p.add_argument("--fold", type=fold, default="0", help="fold index of splits.json (default 0), or all: every case")
    p.add_argument("--config", metavar="FILE",
                   help="JSON config to start from (a saved config.json works; missing fields take their defaults)")
    p.add_argument("--recipe", metavar="NAME",
                   help="preset applied before the other flags (voxseg.train.recipes): " + " or ".join(recipe_names()))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any config option, e.g. optim.lr=3e-4 or plan.batch_size=4 (repeatable; applied after "
                        "the other flags)")
    p.add_argument("--list-options", action=ListOptions,
                   help="describe every config option (type, default, choices) and exit")
    add_flags(p, TRAIN_FLAGS)
    p.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue the fold's run from checkpoint_latest.pt, or from CHECKPOINT (a checkpoint_*.pt of "
                        "the run, or its folder), with the run's own settings; options given with it (--lr, "
                        "--epochs, ...) take effect from the next epoch and are recorded in config.json")
    p.add_argument("--force", action="store_true",
                   help="train anew when the fold already holds a run, deleting that run first (default: refuse)")
    p.add_argument("--pretrained", metavar="FILE",
                   help="initialise from the matching weights of a weights file (model_TAG.safetensors) or a "
                        "checkpoint")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="data-parallel training on N local processes: starts torchrun's launcher "
                        "(--standalone --nproc_per_node N) with the same command; one per GPU, or N CPU "
                        "processes with --device cpu")
    p.add_argument("--test-only", action="store_true",
                   help="evaluate checkpoint_best.pt (else checkpoint_final.pt) without training, into "
                        "training/fold_F/validation_best/ (never the run's validation/ folder)")
    from voxseg.checkpoint import CHECKPOINT_CHOICES

    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES,
                   help="with --test-only: validate this checkpoint instead")
