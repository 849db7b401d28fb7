"""The training workflow a migrating user relies on: a resume with new settings takes them (and config.json says
so), a checkpoint path resumes its own run, a trained fold is never silently overwritten, a crash resumes from
the last completed epoch, and the expected duration is printed before the run gets far."""
from __future__ import annotations

import json
import math

import pytest

from test_train import _clear, _config, workdir  # noqa: F401 - the tiny work directory fixture
from voxseg.checkpoint import load_checkpoint
from voxseg.cli import main
from voxseg.config import load_config_json
from voxseg.errors import ConfigError
from voxseg.train import loop
from voxseg.train.eta import RunLength, count_tiles, format_duration
from voxseg.train.logger import read_log
from voxseg.train.loop import train
from voxseg.train.start import RunStart


def _fold(workdir):
    return workdir / "training" / "fold_0"


def _lrs(workdir) -> list[float]:
    return [r["lr"] for r in read_log(_fold(workdir) / "log.jsonl")]


def test_a_new_learning_rate_on_resume_takes_effect_and_is_recorded(workdir, capsys):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=1", "schedule.name=step"))
    capsys.readouterr()
    train(workdir, 0, _config("loop.epochs=3", "schedule.name=step", "optim.lr=5e-5"), RunStart(resume=True))
    assert _lrs(workdir) == pytest.approx([0.01, 5e-5, 5e-5])
    assert "from epoch 2 on: optim.lr 0.01 -> 5e-05, loop.epochs 1 -> 3" in capsys.readouterr().out
    saved = json.loads((_fold(workdir) / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.01 and saved["loop"]["epochs"] == 1  # the config the run started with
    assert saved["changes"] == [{"epoch": 1, "options": {"optim.lr": [0.01, 5e-05], "loop.epochs": [1, 3]}}]
    replayed = load_config_json(_fold(workdir) / "config.json")  # what a further resume starts from
    assert replayed.optim.lr == 5e-5 and replayed.loop.epochs == 3
    assert load_checkpoint(_fold(workdir) / "checkpoint_final.pt")["optimizer"]["param_groups"][0]["lr"] == 5e-5


def test_a_new_learning_rate_continues_the_cosine_schedule(workdir):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=2", "schedule.name=cosine"))
    train(workdir, 0, _config("loop.epochs=4", "schedule.name=cosine", "optim.lr=1e-3"), RunStart(resume=True))
    # epochs 3-4 of 4: the half cosine over the 4 epochs, from the new base rate
    expected = [0.01, 0.01 * 0.5 * (1 + math.cos(math.pi / 2)), 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)),
                1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4))]
    assert _lrs(workdir) == pytest.approx(expected)


def test_resume_through_the_cli_replays_earlier_changes(workdir):
    _clear(workdir)
    base = ["--device", "cpu", "--iterations", "2", "--set", "loop.val_iterations=1", "--set", "loop.full_val=false",
            "--set", "logging.tensorboard=false", "--set", "logging.progress_png=false",
            "--set", "logging.progress_bar=false"]
    assert main(["train", str(workdir), "--fold", "0", "--epochs", "1", "--schedule", "step", *base]) == 0
    assert main(["train", str(workdir), "--fold", "0", "--resume", "--epochs", "2", "--lr", "5e-5"]) == 0
    assert main(["train", str(workdir), "--fold", "0", "--resume", "--epochs", "3"]) == 0  # the lr stays changed
    assert _lrs(workdir) == pytest.approx([0.01, 5e-5, 5e-5])
    changes = json.loads((_fold(workdir) / "config.json").read_text())["changes"]
    assert [c["epoch"] for c in changes] == [1, 2] and changes[1]["options"] == {"loop.epochs": [2, 3]}


def test_options_that_cannot_change_on_resume_are_refused_with_the_reason(workdir):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=1"))
    before = (_fold(workdir) / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"loss.name dice_ce -> focal \(the logged losses"):
        train(workdir, 0, _config("loop.epochs=2", "loss.name=focal"), RunStart(resume=True))
    with pytest.raises(ConfigError, match=r"loop.seed 12345 -> 7 \(the random generators"):
        train(workdir, 0, _config("loop.epochs=2", "loop.seed=7"), RunStart(resume=True))
    assert (_fold(workdir) / "config.json").read_text() == before  # refused before anything was written


def test_resume_from_a_checkpoint_path(workdir, tmp_path, capsys):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=2"))
    best = _fold(workdir) / "checkpoint_best.pt"
    epoch = load_checkpoint(best)["progress"]["epoch"]
    # WORKDIR and --fold come from the checkpoint's run folder
    assert main(["train", "--resume", str(best), "--epochs", "3"]) == 0
    assert f"resumed from {best} after epoch {epoch} of 3" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(_fold(workdir) / "log.jsonl")] == list(range(3))
    foreign = tmp_path / "latest.pth"
    foreign.write_bytes(b"x")
    assert main(["train", str(workdir), "--fold", "0", "--resume", str(foreign)]) == 2
    assert "not a checkpoint of a voxseg run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="belongs to the run in"):
        train(workdir, "all", _config(), RunStart(resume=str(best)))


def test_a_trained_fold_is_not_overwritten_without_force(workdir, capsys):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=2", "loop.snapshot_freq=1", "loop.keep_snapshots=5"))
    assert (_fold(workdir) / "checkpoint_epoch_2.pt").is_file()
    with pytest.raises(ConfigError, match=r"already holds a run \(2 epochs logged, checkpoint_.*--force"):
        train(workdir, 0, _config("loop.epochs=1"))
    assert main(["train", str(workdir), "--fold", "0", "--device", "cpu"]) == 2
    assert "--resume, or train anew with --force" in capsys.readouterr().err
    train(workdir, 0, _config("loop.epochs=1"), RunStart(force=True))
    files = sorted(p.name for p in _fold(workdir).iterdir())
    assert "checkpoint_epoch_2.pt" not in files and "checkpoint_epoch_1.pt" not in files  # nothing of the old run
    assert [r["epoch"] for r in read_log(_fold(workdir) / "log.jsonl")] == [0]
    assert not list(_fold(workdir).parent.glob(".fold_0.replaced-*"))


def test_a_crash_mid_run_resumes_from_the_last_completed_epoch(workdir, monkeypatch):
    """With the default save frequency every completed epoch is in checkpoint_latest.pt."""
    _clear(workdir)
    real_run_epoch, calls = loop.run_epoch, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the machine went away")  # no Ctrl-C handling, like kill -9
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", crashing)
    config = _config("loop.epochs=4")
    config.loop.save_freq = type(config.loop)().save_freq  # the default
    with pytest.raises(RuntimeError):
        train(workdir, 0, config)
    assert load_checkpoint(_fold(workdir) / "checkpoint_latest.pt")["progress"]["epoch"] == 2
    monkeypatch.setattr(loop, "run_epoch", real_run_epoch)
    assert train(workdir, 0, config, RunStart(resume=True))["epochs"] == 4
    assert [r["epoch"] for r in read_log(_fold(workdir) / "log.jsonl")] == [0, 1, 2, 3]


# ----- the expected duration -------------------------------------------------------------------------------
def test_expected_duration_adds_epochs_validations_and_the_final_validation():
    length = RunLength(start_epoch=0, epochs=1000, iterations=250, val_freq=1, val_iterations=50, batch_size=2,
                       final_tiles=2000)
    # 250 x 0.4 = 100 s per epoch; validation 50 x 0.4 / 3 = 6.67 s; final 2000 tiles x 0.2 / 3 = 133.3 s
    assert length.expected(0.4) == ("expected duration: 1000 epochs x (250 iterations x 0.4 s + validation ~7 s every "
                                    "epoch) + final validation ~2:13 = 1 d 5:40:00")
    assert length.validations_left() == 1000
    every_five = RunLength(3, 20, 10, 5, 4, 2, 0)
    assert every_five.validations_left() == 4  # epochs 4, 9, 14, 19 (0-based) are left of 3..19
    assert every_five.expected(1.0) == ("expected duration: 17 epochs x (10 iterations x 1 s + validation ~1 s every "
                                        "5 epochs) = 2:55")
    assert every_five.remaining(10, 30.0, None, 1.0) == 10 * 30.0  # no final validation
    assert length.remaining(998, 110.0, 0.05, 0.4) == pytest.approx(2 * 110.0 + 2000 * 0.05)


def test_count_tiles_and_durations():
    assert count_tiles([(24, 24, 20)], [16, 16, 16]) == 2 * 2 * 2  # starts 0, 8 on each axis (step 0.5)
    assert count_tiles([(10, 24, 20)], [16, 16], slice_axis=0) == 10 * 2 * 2
    assert count_tiles([(12, 24, 20)], [16, 16, 16]) == 1 * 2 * 2  # the short axis is padded to one tile
    assert [format_duration(s) for s in (0.2, 42, 187, 18720, 192_720)] == ["<1 s", "42 s", "3:07", "5:12:00",
                                                                          "2 d 5:32:00"]


def test_training_prints_the_expected_duration_and_an_eta_with_validation(workdir, capsys):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=2", "data.iterations_per_epoch=4", "loop.full_val=true"))
    err = capsys.readouterr().err
    assert err.count("expected duration: 2 epochs x (4 iterations x ") == 1
    assert "+ final validation ~" in err
    records = read_log(_fold(workdir) / "log.jsonl")
    for record in records:  # the wall time holds training, validation and the checkpoints
        assert record["wall_time"] >= record["epoch_time"] + record["val_time"]
