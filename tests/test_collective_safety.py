"""Every rank enters the same collectives in the same order: training with the progress bar on, validation,
early stopping, the plateau schedule, checkpointing, resume and full validation, on 2 Gloo processes, with
torch.distributed's collectives recorded per rank (tests/collective_guard.py)."""
from __future__ import annotations

import pytest

from collective_guard import assert_same_collectives, first_difference, run_guarded
from test_train import make_workdir
from voxseg.train.logger import read_log

# the progress bar on (as users run it) and refreshed every 2 iterations, so a short run crosses several refreshes
GUARDED = ["loop.device=cpu", "data.iterations_per_epoch=5", "loop.val_iterations=3", "logging.progress_bar=true",
           "logging.log_every_iter=2", "logging.tensorboard=false", "logging.progress_png=false",
           "data.num_threads=1", "loop.dist_timeout_min=0.5"]


def _args(workdir, *extra: str) -> list[str]:
    args = ["train", str(workdir), "--fold", "0"]
    for item in GUARDED + list(extra):
        args += ["--set", item]
    return args


def test_first_difference_names_the_diverging_call():
    same = [{"op": "all_reduce", "site": "voxseg/train/loop.py:run_epoch:10", "shape": [2]}]
    assert first_difference([same, list(same)]) is None
    alone = same + [{"op": "all_reduce", "site": "voxseg/train/loop.py:run_epoch:12", "shape": [3]}]
    message = first_difference([alone, same])
    assert message == ("collective #2 differs between the ranks: rank 0: all_reduce [3] at "
                       "voxseg/train/loop.py:run_epoch:12; rank 1: nothing (its sequence ended)")


def test_training_with_the_progress_bar_enters_the_same_collectives_on_every_rank(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    # early stopping after epoch 2 of 4 (the lr is ~0: no improvement after the first validation), plateau decays
    run = run_guarded(_args(workdir, "loop.epochs=4", "loop.patience=1", "optim.lr=1e-30", "loop.ema_alpha=0",
                            "schedule.name=plateau", "schedule.patience=0", "loop.full_val=true"), tmp_path / "calls")
    assert_same_collectives(run, minimum=10)
    means = [call for call in run.sequences[0] if call["site"].startswith("voxseg/train/step.py:means")]
    assert len(means) == 2 * (5 // 2 + 1)  # per epoch: the bar's 2 refreshes and the epoch's means
    assert [r["epoch"] for r in read_log(workdir / "training" / "fold_0" / "log.jsonl")] == [0, 1]
    assert (workdir / "training" / "fold_0" / "validation" / "summary.json").is_file()


@pytest.mark.slow
def test_resume_and_deep_supervision_off_enter_the_same_collectives(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    first = run_guarded(_args(workdir, "loop.epochs=2", "loop.full_val=false", "plan.network.deep_supervision=false"),
                        tmp_path / "first")
    assert_same_collectives(first, minimum=10)
    resumed = run_guarded(_args(workdir, "loop.epochs=3", "loop.full_val=true", "plan.network.deep_supervision=false")
                          + ["--resume"], tmp_path / "resumed")
    assert_same_collectives(resumed, minimum=5)
    assert [r["epoch"] for r in read_log(workdir / "training" / "fold_0" / "log.jsonl")] == [0, 1, 2]
