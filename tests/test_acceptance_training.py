"""Acceptance: training as users run it, through the command line, at the default lengths and logging.

On a synthetic dataset planned by `voxseg plan` (its planned network), every setting at its default (the progress
bar on, 50 validation batches, full validation, checkpoints every epoch) except what a check needs: 2 epochs of
60 iterations on the CPU, early stopping and the plateau schedule switched on, and deterministic single-thread
kernels so that runs can be compared number for number.

- torchrun with 2 processes trains the 1-process run (equal losses, pseudo-Dice and validation Dice), with deep
  supervision on and off, every rank entering the same collectives (tests/collective_guard.py);
- a run killed (kill -9) at a random iteration past the bar's first refresh, and one killed during its final
  validation, continue with `--resume` from the last completed epoch and end with the files and numbers of the
  run that was never killed.

Run with `python -m pytest -m acceptance` (the whole suite) or `-m acceptance tests/test_acceptance_training.py`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest

from acceptance import environment, record, require_success, run, torchrun, voxseg
from collective_guard import assert_same_collectives, run_guarded
from voxseg.train.logger import read_log

pytestmark = pytest.mark.acceptance

# what the comparisons need; everything else stays at its default
RUN = ["--device", "cpu", "--epochs", "2", "--iterations", "60", "--patience", "10", "--schedule", "plateau",
       "--set", "loop.deterministic=true", "--set", "data.num_threads=1", "--set", "data.prefetch=0"]
TIMEOUT = 1800


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A planned and preprocessed synthetic dataset: 10 cases of 32^3, 5 folds, the planned network."""
    root = tmp_path_factory.mktemp("acceptance_training")
    for command in (voxseg("synth", root / "raw", "--cases", "10", "--shape", "32,32,32"),
                    voxseg("plan", root / "raw", "-o", root / "work"),
                    voxseg("preprocess", root / "work")):
        require_success(run(command, root, 600), " ".join(command[2:4]))
    return root / "work"


def _copy(work: Path, to: Path) -> Path:
    """A fresh work directory with the planned and preprocessed data of `work` (no training)."""
    shutil.copytree(work, to, ignore=shutil.ignore_patterns("training"))
    return to


def _fold(work: Path) -> Path:
    return work / "training" / "fold_0"


def _numbers(work: Path) -> list[dict]:
    return [{**r["loss"], "val_loss": r["val_loss"], "pseudo_dice": r["pseudo_dice_mean"], "lr": r["lr"]}
            for r in read_log(_fold(work) / "log.jsonl")]


def _assert_same_numbers(a: Path, b: Path, loss: float, dice: float) -> None:
    """Per epoch the training losses within `loss` (relative), validation loss and pseudo-Dice and the final
    validation's Dice within `dice` (absolute)."""
    first, second = _numbers(a), _numbers(b)
    assert len(first) == len(second) == 2
    for epoch, (x, y) in enumerate(zip(first, second)):
        for key in x:
            tolerance = dict(rel=loss) if key in ("loss", "dice", "ce", "lr") else dict(abs=dice)
            assert x[key] == pytest.approx(y[key], **tolerance), (epoch, key, x[key], y[key])
    summaries = [json.loads((_fold(w) / "validation" / "summary.json").read_text()) for w in (a, b)]
    assert summaries[0]["mean_dice"] == pytest.approx(summaries[1]["mean_dice"], abs=dice)


def _single_process(dataset: Path, to: Path, name: str, *extra: str) -> Path:
    work = _copy(dataset, to)
    command = voxseg("train", work, "--fold", "0", *RUN, *extra)
    measured = require_success(run(command, work.parent, TIMEOUT, environment(threads=1)), name)
    record(name, measured, command)
    assert "expected duration: 2 epochs x (60 iterations x" in measured.stderr
    assert "| 25/60" in measured.stderr  # the bar was on, past its first loss refresh
    return work


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """The 1-process run every other run of this module is compared with."""
    return _single_process(dataset, tmp_path_factory.mktemp("reference") / "work", "train 1 process")


@pytest.mark.parametrize("deep_supervision", ["on", "off"])
def test_torchrun_two_processes_train_the_one_process_run(dataset, reference, tmp_path, deep_supervision):
    flag = [] if deep_supervision == "on" else ["--no-deep-supervision"]
    single = reference if deep_supervision == "on" else _single_process(
        dataset, tmp_path / "single", "train 1 process, deep supervision off", *flag)
    work = _copy(dataset, tmp_path / "double")
    args = ["train", str(work), "--fold", "0", *RUN, *flag]
    guarded = run_guarded(args, tmp_path / "calls", nproc=2, timeout=TIMEOUT)
    assert_same_collectives(guarded, minimum=20)
    assert guarded.stdout.count("training done: epochs=2") == 1
    # timed again, unguarded, as a user starts it
    command = torchrun(2, *args, "--force")
    measured = require_success(run(command, work.parent, TIMEOUT, environment(threads=1)), "torchrun")
    record(f"train torchrun 2 processes, deep supervision {deep_supervision}", measured, command)
    # the same run up to rounding: the mean of the ranks' gradients is not bit for bit the gradient of the
    # whole batch, and 120 steps of SGD with momentum 0.99 carry such differences forward (measured: losses
    # within 7e-4 relative, validation within 3e-3 after 2 x 60 iterations)
    _assert_same_numbers(work, single, loss=2e-3, dice=1e-2)


def _kill_when(pattern: str):
    """A watcher for `run`: kill -9 the process group as soon as stderr matches `pattern`."""
    def watch(stderr: str, process) -> None:
        if process.poll() is None and re.search(pattern, stderr):
            os.killpg(process.pid, signal.SIGKILL)
    return watch


def test_a_run_killed_mid_epoch_resumes_from_the_last_completed_epoch(dataset, reference, tmp_path):
    work = _copy(dataset, tmp_path / "killed")
    iteration = random.Random().randint(26, 59)
    command = voxseg("train", work, "--fold", "0", *RUN)
    killed = run(command, work.parent, TIMEOUT, environment(threads=1),
                 watch=_kill_when(rf"epoch 2/2[^\r\n]*\|\s*{iteration}/60"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["epoch"] for r in read_log(_fold(work) / "log.jsonl")] == [0]  # epoch 2 was cut at `iteration`
    resume = voxseg("train", work, "--fold", "0", "--resume")
    resumed = require_success(run(resume, work.parent, TIMEOUT, environment(threads=1)), "resume")
    record("train resumed after kill -9 in epoch 2", resumed, resume, killed_at_iteration=iteration)
    assert "after epoch 1 of 2" in resumed.stdout
    _assert_same_files(work, reference)
    _assert_same_numbers(work, reference, loss=1e-6, dice=1e-6)  # one process, deterministic: the same numbers


def test_a_run_killed_in_its_final_validation_validates_again_on_resume(dataset, reference, tmp_path):
    work = _copy(dataset, tmp_path / "killed")
    command = voxseg("train", work, "--fold", "0", *RUN)
    # the message is printed as the final validation starts: the checkpoints are written, the validation not
    killed = run(command, work.parent, TIMEOUT, environment(threads=1), watch=_kill_when("full validation of"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (_fold(work) / "validation" / "summary.json").exists()
    resume = voxseg("train", work, "--fold", "0", "--resume")
    resumed = require_success(run(resume, work.parent, TIMEOUT, environment(threads=1)), "resume")
    record("train resumed after kill -9 in the final validation", resumed, resume)
    assert "after epoch 2 of 2" in resumed.stdout
    _assert_same_files(work, reference)
    _assert_same_numbers(work, reference, loss=1e-6, dice=1e-6)  # one process, deterministic: the same numbers


def _assert_same_files(work: Path, reference: Path) -> None:
    """The files of the reference run (TensorBoard event files aside: a resumed run adds one, purging the
    events past its checkpoint), nothing half-written left behind."""
    def names(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "tensorboard" not in p.parts)
    assert names(_fold(work)) == names(_fold(reference))
