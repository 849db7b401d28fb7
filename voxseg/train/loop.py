"""The training loop: `train(workdir, fold, config)` trains one fold and writes `training/fold_F/`.

It reads top to bottom: load the plan and the split, resolve the run's setup (device, precision, iterations),
build data, model, loss, optimiser and schedule, resume or start, then loop over epochs (sample -> augment ->
step, validate, checkpoint, log) and validate the final weights. Detail lives in the helpers below and in the
sibling modules: `setup` (what is resolved once), `feed` and `prefetch` (the data), `step` (one micro-batch),
`resume`, `rundir` and `start` (how a run starts), `evaluation` (full validation). `--test-only` is not a run:
it is `voxseg.train.testonly.evaluate_fold`.

A resumed run continues exactly where the checkpoint left off: model, optimiser, schedule, loss scaler,
epoch, best metric, EMA, patience counter and every random generator (global ones, the sampler's and the
augmentation's) are restored, so on a CPU with deterministic settings it reproduces an uninterrupted run.
Options given on resume take effect from the next epoch (`voxseg.train.resume`); checkpoint_latest.pt is
written after every epoch by default, so a killed run loses at most the epoch it was in.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxseg.atomicio import sweep_stale_temporaries
from voxseg.checkpoint import Checkpointer, RngStates
from voxseg.config import TrainConfig
from voxseg.data.splits import get_fold
from voxseg.devices import amp_name
from voxseg.distributed import World, all_reduce_mean, barrier, data_parallel, process_group
from voxseg.errors import VoxsegError
from voxseg.infer.cascade import stored_previous
from voxseg.jsonio import write_json_atomic
from voxseg.locks import folder_lock
from voxseg.losses import build_loss
from voxseg.models import build_network
from voxseg.models.factory import warn_noop_deep_supervision
from voxseg.optim import build_optimizer, build_scheduler
from voxseg.plans import Plan
from voxseg.pretrained import load_pretrained
from voxseg.train.eta import RunLength, count_tiles, format_duration
from voxseg.train.evaluation import full_val_metrics
from voxseg.train.feed import TrainData
from voxseg.train.logger import TrainLogger
from voxseg.train.resume import (
    apply_changes,
    config_changes,
    describe_changes,
    record_changes,
    refuse_fixed,
    resume_tag,
)
from voxseg.train.rundir import check_run_dir, replace_run_dir
from voxseg.train.runprogress import Progress
from voxseg.train.setup import (  # noqa: F401 - cache_budget_gb, effective_plan, resolve, seed_everything: API
    RunSetup,
    cache_budget_gb,
    check_step_fits,
    effective_plan,
    resolve,
    resolved_config,
    seed_everything,
)
from voxseg.train.start import RunStart
from voxseg.train.step import RunningMeans, TrainStep
from voxseg.train.validate import pseudo_dice
from voxseg.units import gib
from voxseg.workdir import FoldDir, WorkDir


class TrainingInterrupted(VoxsegError):
    """Ctrl-C during training; checkpoint_latest.pt holds the state to resume from."""

    exit_code = 130


@dataclass
class Training:
    """The run's pieces, built once; `checkpointer` saves and restores their state."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: TrainStep
    data: TrainData
    plan: Plan
    config: TrainConfig
    progress: Progress
    checkpointer: Checkpointer


def train(workdir: str | Path, fold: int | str, config: TrainConfig, start: RunStart = RunStart()) -> dict[str, Any]:
    """Train one fold; returns the final metrics.

    Args:
        workdir: work directory with plans.json, splits.json and preprocessed/.
        fold: fold index or "all".
        config: the run's settings.
        start: how the run starts: anew (refused when the fold holds a run, unless `force`), resumed from its
            own checkpoint, or from pretrained weights (`voxseg.train.start.RunStart`).

    Returns:
        {"epochs", "best_ema_dice", "stopped_early", "val_dice_mean", "val_dice": {class: dice}, "seconds"}
        (the val_ entries only with full validation).

    Under torchrun (`torchrun --nproc_per_node N -m voxseg train ...`) this is data-parallel training of the
    same run: the process group is initialised here from torchrun's environment (see `voxseg.distributed`),
    the plan's batch is the global batch and every rank returns the same result; only rank 0 writes.
    """
    with process_group(config.loop.device, config.loop.dist_timeout_min) as world:
        return _train(Path(workdir), fold, config, world, start)


@dataclass
class _Checked:
    """What `_train` checked before the fold is locked and anything is written."""

    out_dir: Path
    train_names: list[str]
    val_names: list[str]
    tag: str | None
    replacing: bool
    plan: Plan
    setup: RunSetup


def _train(workdir: Path, fold: int | str, config: TrainConfig, world: World, start: RunStart) -> dict[str, Any]:
    """`train` inside the run's process group (if any)."""
    started = time.perf_counter()
    out_dir = WorkDir(workdir).fold(fold).path
    sweep_stale_temporaries(out_dir, recursive=True)  # temporary files of a killed run
    train_names, val_names = get_fold(workdir, fold)
    tag = resume_tag(start.resume, out_dir) if start.resume else None
    replacing = False if start.resume else check_run_dir(out_dir, start.force)  # refused before anything is written
    plan = effective_plan(workdir, config)
    previous = stored_previous(workdir, plan)  # a cascade stage: the first stage's cross-validation predictions
    if previous is not None:
        previous.check(train_names + val_names)  # refused before anything is written
    setup = resolve(config, plan, len(train_names), world)
    check_step_fits(plan, setup)  # a hand-edited plan too large for this machine: refused by name
    checked = _Checked(out_dir, train_names, val_names, tag, replacing, plan, setup)
    # rank 0 writes the fold: it holds the fold's lock, so a second run of the same fold is refused
    with folder_lock(out_dir, "training this fold") if world.is_main else contextlib.nullcontext():
        return _train_checked(workdir, fold, config, start, checked, started)


def _train_checked(workdir: Path, fold: int | str, config: TrainConfig, start: RunStart, checked: _Checked,
                   started: float) -> dict[str, Any]:
    """`_train` once everything is checked and the fold is locked."""
    out_dir, train_names, val_names, plan, setup = (checked.out_dir, checked.train_names, checked.val_names,
                                                    checked.plan, checked.setup)
    tag, replacing, world = checked.tag, checked.replacing, setup.world

    seed_everything(config.loop.seed, config.loop.deterministic, config.data.num_threads)
    training = build_training(workdir, plan, config, setup, train_names, val_names, out_dir)
    changes = restore_or_initialise(training, setup, tag, start.pretrained)
    if world.is_main:
        write_run_files(training, setup, replacing, tag, changes)
    barrier()  # the other ranks start once rank 0 has replaced an old run

    logger = start_logger(training, setup, fold, train_names, val_names)
    fit_to_the_end(training, setup, logger, validate=bool(val_names))
    result: dict[str, Any] = {"epochs": training.progress.epoch, "best_ema_dice": training.progress.best_metric,
                              "stopped_early": training.progress.epoch < config.loop.epochs}
    if config.loop.full_val and val_names:
        # the final weights, as nnU-Net validates them; `--test-only` validates checkpoint_best instead. A run
        # killed here resumes (--resume) with nothing left to train and validates again
        logger.message(f"full validation of {len(val_names)} cases (sliding window)")
        result.update(full_val_metrics(training.model, plan, workdir, FoldDir(out_dir).validation, val_names,
                                       setup.device, setup.amp_dtype, config.loop.save_val_probabilities))
    result["seconds"] = time.perf_counter() - started
    return result


# ----- before the first epoch -------------------------------------------------------------------------------
def restore_or_initialise(training: Training, setup: RunSetup, tag: str | None,
                          pretrained: str | Path | None) -> dict[str, Any]:
    """A resumed run (`tag`): its checkpoint restored, and the options changed since (returned); a new run with
    `pretrained`: those weights loaded into the model."""
    if tag is not None:
        # every rank reads the same file: a checkpoint holds no trace of the number of processes that wrote it
        state = training.checkpointer.restore(tag, setup.device)  # refuses a changed plan or optimiser
        return resumed_with_changes(state, training, setup, training.checkpointer.files.checkpoint(tag))
    if pretrained:
        _print(setup.world, load_pretrained(training.model, pretrained).summary())
    return {}


def write_run_files(training: Training, setup: RunSetup, replacing: bool, tag: str | None,
                    changes: dict[str, Any]) -> None:
    """Rank 0, before the first epoch: the old run deleted (`replacing`), then the effective plan and config.json
    (a resumed run's keeps the config it started with and records this resume's changes)."""
    files = training.checkpointer.files
    if replacing:
        replace_run_dir(files.path)
    files.path.mkdir(parents=True, exist_ok=True)
    training.plan.save(files.plans)
    started = resolved_config(training.config, setup).to_dict()
    if tag:
        record_changes(files.config, started, training.progress.epoch, changes)
    else:
        write_json_atomic(files.config, started)


def start_logger(training: Training, setup: RunSetup, fold: int | str, train_names: list[str],
                 val_names: list[str]) -> TrainLogger:
    """The run's logger, after it has announced the run and its expected duration."""
    config, plan, world = training.config, training.plan, setup.world
    logger = TrainLogger(training.checkpointer.directory, config.logging, config.loop.epochs, rank=world.rank,
                         start_epoch=training.progress.epoch, length=run_length(training, setup, val_names))
    processes = f" x {world.size} processes (batch {plan.batch_size // world.size} each)" if world.distributed else ""
    logger.message(f"training fold {fold} on {setup.device}{processes}: {len(train_names)} training / "
                   f"{len(val_names)} validation cases, patch {plan.patch_size}, batch {plan.batch_size}, "
                   f"{setup.iterations} iterations x {config.loop.epochs} epochs, amp {amp_name(setup.amp_dtype)}, "
                   f"compile {'on' if setup.compile else 'off'}\n"
                   f"{training.data.describe()}")
    warn_noop_deep_supervision(plan, logger.message)
    eta = logger.eta_seconds()
    if eta is not None and training.progress.epoch < config.loop.epochs:
        logger.message(f"expected duration of the epochs left: {format_duration(eta)} (from the epochs logged)")
    return logger


def resumed_with_changes(state: dict[str, Any], training: Training, setup: RunSetup, path: Path) -> dict[str, Any]:
    """After a restore: the options changed since the checkpoint (refused where they may not change), applied to
    the restored optimiser and schedule and announced; returns them."""
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    changes = config_changes(saved, resolved_config(training.config, setup).to_dict()) if saved else {}
    # a checkpoint of an older version holds "auto" where the machine's choice now stands
    changes = {k: v for k, v in changes.items() if not (k in _MACHINE_OPTIONS and v[0] == "auto")}
    refuse_fixed(changes, path)
    apply_changes(changes, training.optimizer, training.scheduler, training.config)
    epoch = training.progress.epoch
    text = f"resumed from {path} after epoch {epoch} of {training.config.loop.epochs}"
    if changes:
        text += f"; from epoch {epoch + 1} on: {describe_changes(changes)}"
    _print(setup.world, text)
    return changes


_MACHINE_OPTIONS = ("loop.device", "loop.amp", "loop.compile")


def run_length(training: Training, setup: RunSetup, val_names: list[str]) -> RunLength:
    """What the run has left, for the expected duration: epochs, validations and the final validation's tiles."""
    config, plan = training.config, training.plan
    cache = training.data.val_cache
    tiles = 0
    if config.loop.full_val and cache is not None:
        tiles = count_tiles([cache.shape(i) for i in range(len(cache))], plan.patch_size, slice_axis=plan.slice_axis)
    return RunLength(training.progress.epoch, config.loop.epochs, setup.iterations,
                     config.loop.val_freq if val_names else 0, config.loop.val_iterations, plan.batch_size, tiles)


def build_training(workdir: Path, plan: Plan, config: TrainConfig, setup: RunSetup, train_names: list[str],
                   val_names: list[str], out_dir: Path | None = None) -> Training:
    """Model, loss, optimiser, schedule, step, data and their checkpointer (into `out_dir`), on the device."""
    world = setup.world
    model = build_network(plan).to(setup.device)  # deep supervision as the plan says
    loss_fn = build_loss(config.loss.name, plan, config.loss.weights, plan.network.deep_supervision,
                         sync_batch_dice=world.distributed, **config.loss.term_options()).to(setup.device)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, config.loop.epochs)
    # the step trains the DDP wrapper (gradients averaged over ranks before clipping); everything else,
    # checkpoints included, sees the model itself
    step = TrainStep(data_parallel(model, world), loss_fn, optimizer, setup.device, setup.amp_dtype,
                     config.loop.grad_accum, config.loop.grad_clip, compile=setup.compile)
    # the cache comes after the model so that its GPU budget sees the memory the model already holds
    data = TrainData(WorkDir(workdir).preprocessed, plan, config, train_names, val_names, world,
                     cache_budget_gb=cache_budget_gb(config, plan, setup.device),
                     previous=stored_previous(workdir, plan))
    progress = Progress()
    checkpointer = Checkpointer(
        out_dir or workdir / "unsaved",
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": step, "data": data,
         "progress": progress, "rng": RngStates()},  # RNGs last: nothing after them draws
        metadata={"plan": plan.to_dict(), "config": resolved_config(config, setup).to_dict()},
        keep_snapshots=config.loop.keep_snapshots, enabled=out_dir is not None and world.is_main)
    return Training(model, loss_fn, optimizer, scheduler, step, data, plan, config, progress, checkpointer)


# ----- the epochs -------------------------------------------------------------------------------------------
def fit_to_the_end(training: Training, setup: RunSetup, logger: TrainLogger, validate: bool) -> None:
    """`fit`, then the final checkpoints; Ctrl-C saves checkpoint_latest.pt and raises TrainingInterrupted."""
    try:
        fit(training, setup, logger, validate)
    except KeyboardInterrupt:
        # the interrupted epoch does not count: resuming runs it again, from the weights it had reached. Under
        # torchrun every rank gets the signal; a rank interrupted alone leaves, and the others' next collective
        # fails (Gloo: at once, the peer is gone; NCCL: after loop.dist_timeout_min) instead of waiting forever
        path = training.checkpointer.save("latest") or training.checkpointer.files.checkpoint("latest")
        raise TrainingInterrupted(f"interrupted; resume with --resume ({path})") from None  # rank 0 wrote it
    finally:
        logger.close()
    training.checkpointer.save("latest")
    training.checkpointer.save("final")


def fit(training: Training, setup: RunSetup, logger: TrainLogger, validate: bool = True) -> None:
    """The epoch loop: train, validate every val_freq epochs, step the schedule, checkpoint, log, stop early."""
    loop_config, progress, checkpointer = training.config.loop, training.progress, training.checkpointer
    while progress.epoch < loop_config.epochs:
        epoch, started = progress.epoch, time.perf_counter()
        record = run_epoch(training.step, training.data, logger, epoch, setup, training.plan.batch_size)
        validated = validate and (epoch + 1) % loop_config.val_freq == 0
        if validated:
            record.update(validate_epoch(training.model, training.loss_fn, training.data, training.plan,
                                         training.config, setup, progress))
        training.scheduler.step(progress.ema if validated else None)
        progress.epoch += 1
        # checkpoints before the log line: log.jsonl never holds an epoch that no checkpoint holds
        if record.get("new_best"):
            checkpointer.save("best")
        if progress.epoch % loop_config.save_freq == 0:
            checkpointer.save("latest")
        if progress.epoch % loop_config.snapshot_freq == 0:
            checkpointer.snapshot(progress.epoch)
        record["wall_time"] = time.perf_counter() - started  # training, validation and checkpoints: the ETA's unit
        logger.log_epoch(record)
        if loop_config.patience and progress.epochs_without_improvement() >= loop_config.patience:
            logger.message(f"early stopping: no EMA pseudo-Dice improvement for {loop_config.patience} epochs")
            return


def run_epoch(step: TrainStep, data: TrainData, logger: TrainLogger, epoch: int, setup: RunSetup,
              batch_size: int) -> dict[str, Any]:
    """Train one epoch of `setup.iterations` optimiser steps; the host reads the losses only every
    `log_every_iter` iterations and at the end."""
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    running, memory = RunningMeans(reduce=all_reduce_mean), []  # logged losses: the mean over the ranks
    lr = float(step.optimizer.param_groups[0]["lr"])
    micro_batches = setup.iterations * step.grad_accum
    stream = data.train_stream(micro_batches)
    probe, marks = logger.step_probe(setup.iterations), []  # the first epoch of a process times its first steps
    iteration, start = 0, time.perf_counter()
    with logger.progress_bar(epoch, setup.iterations) as bar:
        for image, seg in stream:
            running.add(step(image, seg))
            if not step.optimizer_stepped:  # the step decides where an iteration ends (gradient accumulation)
                continue
            iteration += 1
            bar.update(1)
            if probe and iteration in (1, probe):
                if cuda:  # twice per process (this rank only): the expected duration needs the device's time
                    torch.cuda.synchronize(setup.device)
                marks.append(time.perf_counter())
                if len(marks) == 2:
                    logger.expect((marks[1] - marks[0]) / (probe - 1))
            if cuda:
                memory.append(torch.cuda.memory_allocated(setup.device))  # host-side counter, no sync
            # host-device sync at the log interval. The running means all-reduce over the ranks, so whether
            # to read them is decided from the config, the same on every rank, never from this rank's bar
            # (only rank 0 has one: a rank entering a collective alone crashes or hangs the run)
            if logger.refreshes_loss(iteration):
                bar.set_postfix(loss=f"{running.means()['loss']:.4f}")
    losses = running.means()  # host-device sync: end of epoch
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch, "loss": losses, "lr": lr, "iterations": setup.iterations,
        "epoch_time": seconds, "batch_time": seconds / setup.iterations,
        "data_time": stream.wait_seconds / setup.iterations, "samples_per_s": micro_batches * batch_size / seconds,
        "gpu_mem_mean_gb": gib(sum(memory) / len(memory)) if memory else 0.0,
        "gpu_mem_max_gb": gib(torch.cuda.max_memory_allocated(setup.device)) if cuda else 0.0,
    }


def validate_epoch(model: torch.nn.Module, loss_fn: torch.nn.Module, data: TrainData, plan: Plan,
                   config: TrainConfig, setup: RunSetup, progress: Progress) -> dict[str, Any]:
    """Pseudo-Dice on validation patches, folded into the EMA that picks the best checkpoint."""
    start = time.perf_counter()
    val = pseudo_dice(model, data.val_batches(config.loop.val_iterations), plan, loss_fn, setup.amp_dtype)
    new_best = progress.update(val["dice_mean"], config.loop.ema_alpha)
    return {"val_loss": val["val_loss"], "pseudo_dice": dict(zip(plan.class_names, val["dice"])),
            "pseudo_dice_mean": val["dice_mean"], "ema_dice": progress.ema, "new_best": new_best,
            "val_time": time.perf_counter() - start, "val_iterations": config.loop.val_iterations}


def _print(world: World, text: str) -> None:
    if world.is_main:
        print(text, flush=True)
