"""The effective plan: plans.json plus the run's plan overrides, written once into training/fold_F/plans.json and
read by the sampler, network, loss, validation, test-only and the predictor; a changed plan on resume is refused."""
from __future__ import annotations

import json

import pytest

from test_train import _clear, _config, workdir  # noqa: F401 - the tiny work directory fixture
from voxseg.checkpoint import load_checkpoint
from voxseg.config import TrainConfig, apply_overrides, load_config_json
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.predictor import Predictor
from voxseg.losses import DeepSupervisionLoss
from voxseg.plans import Plan
from voxseg.train import loop
from voxseg.train.loop import train
from voxseg.train.start import RunStart
from voxseg.train.testonly import evaluate_fold

OVERRIDES = ("plan.patch_size=16,16,12", "plan.batch_size=3", "plan.foreground_oversampling=1.0",
             "plan.network.deep_supervision=false")


def _spy_on_training(monkeypatch) -> list:
    built = []
    real = loop.build_training

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_training", spy)
    return built


def test_run_overrides_are_written_once_and_read_by_every_stage(workdir, monkeypatch):
    _clear(workdir)
    planned = (workdir / "plans.json").read_text()
    built = _spy_on_training(monkeypatch)
    train(workdir, 0, _config("loop.epochs=1", *OVERRIDES))
    out = workdir / "training" / "fold_0"
    effective = json.loads((out / "plans.json").read_text())
    assert (effective["patch_size"], effective["batch_size"], effective["foreground_oversampling"]) == \
        ([16, 16, 12], 3, 1.0)
    assert effective["network"]["deep_supervision"] is False
    assert (workdir / "plans.json").read_text() == planned  # the work directory's plan is left as planned
    assert load_checkpoint(out / "checkpoint_final.pt")["plan"] == effective
    assert json.loads((out / "config.json").read_text())["plan"]["batch_size"] == 3

    # training: sampler, augmentation output, network and loss all follow the effective plan
    t = built[0]
    sampler = t.data.sampler
    assert (list(sampler.patch_size), sampler.batch_size, sampler.foreground_fraction) == ([16, 16, 12], 3, 1.0)
    image, seg = t.data.next_batch()
    assert tuple(image.shape) == (3, 2, 16, 16, 12) and tuple(seg.shape) == (3, 1, 16, 16, 12)
    assert t.model.deep_supervision is False and not isinstance(t.loss_fn, DeepSupervisionLoss)
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["samples_per_s"] == pytest.approx(3 * 3 / record["epoch_time"])  # 3 iterations x batch 3

    # test-only validates with the checkpoint's effective plan, whatever the config says: the windows are its patch,
    # batched by its batch size
    windows = []
    from voxseg.infer import validation

    real_window = validation.sliding_window_inference

    def spy_window(model, image, patch_size, num_outputs, tiling, *args):
        windows.append((list(patch_size), tiling.tile_batch))
        return real_window(model, image, patch_size, num_outputs, tiling, *args)

    monkeypatch.setattr(validation, "sliding_window_inference", spy_window)
    evaluate_fold(workdir, 0, _config(), checkpoint=True)
    assert windows and set(map(tuple, (w[0] for w in windows))) == {(16, 16, 12)} and {w[1] for w in windows} == {3}

    # prediction reads the same plan from the checkpoint
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu")
    assert predictor.plan.to_dict() == effective


def test_resume_refuses_a_changed_plan(workdir):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=1"))
    with pytest.raises(CheckpointError, match=r"another plan.*batch_size: 2 -> 3"):
        train(workdir, 0, _config("loop.epochs=2", "plan.batch_size=3"), RunStart(resume=True))
    # a hand edit of the work directory's plans.json between the runs is refused too
    original = (workdir / "plans.json").read_text()
    edited = Plan.load(workdir / "plans.json")
    edited.foreground_oversampling = 0.5
    try:
        edited.save(workdir / "plans.json")
        with pytest.raises(CheckpointError, match=r"foreground_oversampling: 0.33 -> 0.5"):
            train(workdir, 0, _config("loop.epochs=2"), RunStart(resume=True))
    finally:
        (workdir / "plans.json").write_text(original)
    assert train(workdir, 0, _config("loop.epochs=2"), RunStart(resume=True))["epochs"] == 2  # unchanged: resumes


def test_plan_overrides_are_one_config_field(tmp_path):
    config = apply_overrides(TrainConfig(), ["plan.batch_size=4", "plan.network.residual=yes"])
    assert config.plan == {"batch_size": 4, "network.residual": True}
    with pytest.raises(ConfigError, match=r"unknown option 'data.patch_size'"):  # the training config has no copy
        apply_overrides(TrainConfig(), ["data.patch_size=16,16,16"])
    with pytest.raises(ConfigError, match=r"plan.target_spacing' describes the preprocessed data.*voxseg plan"):
        apply_overrides(TrainConfig(), ["plan.target_spacing=1,1,1"])
    with pytest.raises(ConfigError, match=r"did you mean 'plan.batch_size'"):
        apply_overrides(TrainConfig(), ["plan.bach_size=4"])
    with pytest.raises(ConfigError, match=r"plan.batch_size.*expects an integer"):
        apply_overrides(TrainConfig(), ["plan.batch_size=four"])
    (tmp_path / "config.json").write_text(json.dumps({"plan": {"patch_size": [32, 32, 32], "network.residual": True}}))
    assert load_config_json(tmp_path / "config.json").plan == {"patch_size": [32, 32, 32], "network.residual": True}


def test_test_only_validates_the_chosen_checkpoint(workdir):
    _clear(workdir)
    train(workdir, 0, _config("loop.epochs=1"))
    assert evaluate_fold(workdir, 0, _config(), checkpoint=True)["checkpoint"].endswith("checkpoint_best.pt")
    assert evaluate_fold(workdir, 0, _config(), checkpoint="final")["checkpoint"].endswith("checkpoint_final.pt")
    (workdir / "training" / "fold_0" / "checkpoint_latest.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint_latest.pt exists; train first"):
        evaluate_fold(workdir, 0, _config(), checkpoint="latest")
    with pytest.raises(ConfigError, match="'newest' is unknown"):
        evaluate_fold(workdir, 0, _config(), checkpoint="newest")
