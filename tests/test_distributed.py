"""Data parallelism on the CPU (Gloo): a 2-process torchrun run is the 1-process run with the same global batch,
decisions are collective (early stopping ends every rank), checkpoints resume on another number of processes,
prediction shards its cases; plus the pieces (sharding, batch slices, the environment) in-process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import TRAIN, _case, _plan, make_workdir
from voxseg.checkpoint import load_checkpoint
from voxseg.config import TrainConfig, apply_overrides
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.distributed import World, env_world, local_batch_size, process_group, shard_balanced
from voxseg.errors import ConfigError
from voxseg.infer.predictor import Predictor, find_input_cases
from voxseg.train import loop
from voxseg.train.feed import TrainData
from voxseg.train.logger import read_log
from voxseg.train.start import RunStart

ROOT = Path(__file__).resolve().parents[1]
RUN = ["loop.epochs=2", "data.iterations_per_epoch=3", "loop.val_iterations=3", "loop.device=cpu",
       "logging.tensorboard=false", "logging.progress_png=false", "logging.progress_bar=false",
       "loop.full_val=true", "data.num_threads=1", "data.prefetch=0", "loop.save_freq=1", "loop.snapshot_freq=1",
       "loop.keep_snapshots=2",
       "loop.deterministic=true", "loop.dist_timeout_min=2"]
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _config(*extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), RUN + list(extra))


def _torchrun_command(*args: str, nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    """`torchrun --standalone --nproc_per_node NPROC -m voxseg ARGS` on this checkout (free port, 1 thread each)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "voxseg", *args]
    return command, env


def _torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    command, env = _torchrun_command(*args, nproc=nproc)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _train_args(workdir: Path, *extra: str) -> list[str]:
    args = ["train", str(workdir), "--fold", "0"]
    for item in RUN + list(extra):
        args += ["--set", item]
    return args


def _fold(workdir: Path) -> Path:
    return workdir / "training" / "fold_0"


def _losses(workdir: Path) -> list[dict[str, float]]:
    return [{**r["loss"], "val_loss": r["val_loss"], "pseudo_dice": r["pseudo_dice_mean"]} for r in read_log(
        _fold(workdir) / "log.jsonl")]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def _assert_losses_close(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for first, second in zip(a, b):
        assert first.keys() == second.keys()
        for key in first:
            assert first[key] == pytest.approx(second[key], abs=1e-5), key


# ----- in-process pieces -------------------------------------------------------------------------------------
def test_shard_balanced_partitions_by_size():
    items, weights = list("abcde"), [5, 4, 3, 3, 1]
    shares = [shard_balanced(items, weights, rank, 2) for rank in range(2)]
    assert shares == [["a", "d"], ["b", "c", "e"]]  # loads 8 and 8, input order kept
    assert sorted(sum(shares, [])) == items
    assert shard_balanced(items, weights, 0, 1) == items
    assert [len(shard_balanced(items, [1] * 5, r, 3)) for r in range(3)] == [2, 2, 1]


def test_batch_must_divide_over_the_processes():
    assert local_batch_size(4, 2) == 2
    with pytest.raises(ConfigError, match="batch size 3 does not divide over 2 processes"):
        local_batch_size(3, 2)
    plan = _plan()
    plan.batch_size = 3
    with pytest.raises(ConfigError, match="--nproc_per_node"):
        loop.resolve(_config(), plan, 4, World(rank=0, size=2))


def test_a_plain_process_is_a_world_of_one(monkeypatch):
    for name in TORCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert env_world() == (0, 1, 0)
    with process_group("cpu") as world:
        assert world == World(0, 1, 0, torch.device("cpu")) and world.is_main and not world.distributed
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent"):
        env_world()


def test_each_rank_gets_its_rows_of_the_same_global_batch(tmp_path):
    workdir = make_workdir(tmp_path)
    plan, config = _plan(), _config("loop.seed=3")
    plan.batch_size = 4

    def batches(rank: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = TrainData(workdir / "preprocessed", plan, config, TRAIN, [], World(rank=rank, size=size))
        return [data.next_batch() for _ in range(2)]

    single = batches(0, 1)
    ranks = [batches(rank, 2) for rank in range(2)]
    for index, (image, seg) in enumerate(single):
        assert ranks[0][index][0].shape[0] == 2
        assert torch.equal(torch.cat([r[index][0] for r in ranks]), image)
        assert torch.equal(torch.cat([r[index][1] for r in ranks]), seg)


def test_sharded_prediction_writes_the_files_of_a_single_process(tmp_path, monkeypatch):
    workdir = make_workdir(tmp_path / "work")
    loop.train(workdir, 0, _config("loop.epochs=1", "loop.full_val=false"))
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    for index in range(5):  # different sizes: the shares balance bytes, not counts
        image, _ = _case(index)
        for channel in range(2):
            write_image(tmp_path / "in" / f"c{index}_{channel:04d}.nii.gz", image[channel, : 14 + 2 * index], geometry)
    for name in TORCH_ENV:
        monkeypatch.delenv(name, raising=False)
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu", mirror_axes=None)
    cases = find_input_cases(tmp_path / "in", 2, ".nii.gz")
    assert predictor.predict_files(cases, tmp_path / "single")["written"] == 5
    written = []
    for rank in (0, 1):  # what each torchrun rank does: the environment says who it is
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        written.append(predictor.predict_files(cases, tmp_path / "sharded")["written"])
        again = predictor.predict_files(cases, tmp_path / "sharded", continue_run=True)
        assert again["written"] == 0 and again["skipped"] == written[-1]
    assert sum(written) == 5 and min(written) >= 2
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "sharded").iterdir()) and len(names) == 5
    for name in names:
        assert np.array_equal(read_image(tmp_path / "single" / name)[0], read_image(tmp_path / "sharded" / name)[0])


# ----- torchrun ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run on 1 process (in-process) and on 2 (torchrun), then the 2-process epoch-1 checkpoint resumed
    on 1 process; the 2-process results are read before the resume overwrites them."""
    single = make_workdir(tmp_path_factory.mktemp("single"))
    loop.train(single, 0, _config())
    double = make_workdir(tmp_path_factory.mktemp("double"))
    launched = _torchrun(*_train_args(double))
    fold = _fold(double)
    result = {"single": single, "stdout": launched.stdout, "losses": _losses(double),
              "weights": _weights(fold / "checkpoint_final.pt"),
              "summary": json.loads((fold / "validation" / "summary.json").read_text())}
    shutil.copy(fold / "checkpoint_epoch_1.pt", fold / "checkpoint_latest.pt")
    loop.train(double, 0, _config(), RunStart(resume=True))
    result.update(resumed_losses=_losses(double), resumed_weights=_weights(fold / "checkpoint_final.pt"))
    return result


@pytest.mark.slow
def test_two_processes_train_the_one_process_run(runs):
    single = runs["single"]
    _assert_losses_close(runs["losses"], _losses(single))  # train losses, val loss, pseudo-Dice, per epoch
    _assert_weights_close(runs["weights"], _weights(_fold(single) / "checkpoint_final.pt"))
    summary = json.loads((_fold(single) / "validation" / "summary.json").read_text())
    assert runs["summary"]["per_case"].keys() == summary["per_case"].keys() == {"case_4", "case_5"}
    assert runs["summary"]["mean_dice"] == pytest.approx(summary["mean_dice"], abs=1e-6)
    assert runs["stdout"].count("training done: epochs=2") == 1  # rank 0 reports, once


@pytest.mark.slow
def test_two_nodes_on_localhost_train_the_one_process_run(runs, tmp_path):
    """Two torchrun launches (`--nnodes 2`, one process each) form one run: the 1-process run's losses."""
    import socket

    workdir = make_workdir(tmp_path / "nodes")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launches = []
    for node in (0, 1):
        command, env = _torchrun_command(*_train_args(workdir), nproc=1)
        command = [c for c in command if c != "--standalone"]
        at = command.index("-m", 2)
        command[at:at] = ["--nnodes=2", f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        launches.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    outputs = [launch.communicate(timeout=240) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert outputs[0][0].count("training done: epochs=2") == 1 and "training done" not in outputs[1][0]
    _assert_losses_close(_losses(workdir), _losses(runs["single"]))


def test_early_stopping_ends_every_rank(tmp_path):
    workdir = make_workdir(tmp_path)
    # lr ~ 0 and no smoothing: the pseudo-Dice never improves after the first validation, patience 1 stops
    # after epoch 2 of 6, on both ranks, or the launch times out
    launched = _torchrun(*_train_args(workdir, "loop.epochs=6", "loop.patience=1", "optim.lr=1e-30",
                                      "loop.ema_alpha=0", "loop.full_val=false", "loop.keep_snapshots=0",
                                      "schedule.name=plateau", "schedule.patience=0"),  # plateau decays too
                         timeout=180)
    records = read_log(_fold(workdir) / "log.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["new_best"] and not records[1]["new_best"]
    assert load_checkpoint(_fold(workdir) / "checkpoint_final.pt")["progress"]["epoch"] == 2
    assert launched.stdout.count("stopped_early=True") == 1  # rank 0 reports; rank 1 ended too (exit 0)
    assert records[1]["lr"] == pytest.approx(records[0]["lr"] * 0.5)  # one plateau decay, decided collectively


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes(runs, tmp_path):
    """2 -> 1: the 2-process epoch-1 checkpoint resumed on one process; 1 -> 2: the reverse, on torchrun."""
    single = runs["single"]
    expected_losses, expected_weights = _losses(single), _weights(_fold(single) / "checkpoint_final.pt")
    _assert_losses_close(runs["resumed_losses"], expected_losses)
    _assert_weights_close(runs["resumed_weights"], expected_weights)
    reverse = tmp_path / "reverse"
    shutil.copytree(single, reverse)
    shutil.copy(_fold(reverse) / "checkpoint_epoch_1.pt", _fold(reverse) / "checkpoint_latest.pt")
    launched = _torchrun(*_train_args(reverse), "--resume")
    assert launched.stdout.count("resumed from") == 1  # rank 0 prints
    _assert_losses_close(_losses(reverse), expected_losses)
    _assert_weights_close(_weights(_fold(reverse) / "checkpoint_final.pt"), expected_weights)


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank (Linux /proc), None while it is not started."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    for pid in children.read_text().split() if children.exists() else []:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_ctrl_c_on_one_rank_does_not_block_the_others(tmp_path):
    workdir = make_workdir(tmp_path)
    command, env = _torchrun_command(*_train_args(workdir, "loop.epochs=1000", "loop.full_val=false",
                                                  "loop.keep_snapshots=0", "loop.dist_timeout_min=10"))
    launched = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_log(_fold(workdir) / "log.jsonl") and time.monotonic() < deadline:
            time.sleep(0.2)  # until training is under way on both ranks
        victim = _worker_pid(launched.pid, 1)
        assert victim is not None, "no rank 1 worker found"
        os.kill(victim, signal.SIGINT)  # Ctrl-C seen by rank 1 alone
        signalled = time.monotonic()
        # rank 0 must neither wait forever nor for the 10-minute timeout: Gloo fails once the peer is gone
        _, stderr = launched.communicate(timeout=90)
        print(f"ended {time.monotonic() - signalled:.1f} s after the signal")
    finally:
        launched.kill()
    assert launched.returncode != 0
    assert "interrupted; resume with --resume" in stderr
    assert len(read_log(_fold(workdir) / "log.jsonl")) < 1000


@pytest.mark.slow
def test_gpus_flag_launches_the_same_data_parallel_run(runs, tmp_path):
    workdir = make_workdir(tmp_path / "flag")
    _, env = _torchrun_command()  # this checkout on the path, no torchrun variables, one thread each
    command = [sys.executable, "-m", "voxseg", *_train_args(workdir), "--gpus", "2"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "launching: torch.distributed.run --standalone --nproc_per_node=2 -m voxseg train" in done.stdout
    assert done.stdout.count("training done: epochs=2") == 1
    _assert_losses_close(_losses(workdir), _losses(runs["single"]))


def test_gpus_flag_is_refused_where_it_makes_no_sense(tmp_path, monkeypatch, capsys):
    from voxseg.cli import main

    assert main(["train", str(tmp_path), "--gpus", "0"]) != 0
    assert "--gpus 0: give the number of processes" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(tmp_path), "--gpus", "2"]) != 0
    assert "under torchrun leave it out" in capsys.readouterr().err
