"""Registries are the one list of valid names: config validation, `field_choices` (the CLI's choices) and "did
you mean" read them, and a component registered from outside (loss term + loss, optimiser, schedule, norm,
normalisation scheme) works end to end without editing any module."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from voxseg.checkpoint import load_checkpoint
from voxseg.config import DataConfig, LoopConfig, LossConfig, OptimConfig, ScheduleConfig, TrainConfig, apply_overrides
from voxseg.configtree import field_choices
from voxseg.data.plan import plan_dataset
from voxseg.data.preprocess import preprocess_dataset
from voxseg.data.store import list_cases, load_case
from voxseg.data.synth import make_synthetic_dataset
from voxseg.errors import ConfigError
from voxseg.losses import LOSS_TERMS, LOSSES, LossSpec, TermInputs, build_loss
from voxseg.models import build_network
from voxseg.models.blocks import NONLINS, NORMS
from voxseg.normalization import SCHEMES
from voxseg.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.registry import Registry
from voxseg.train.loop import train


# ----- the registry itself ----------------------------------------------------------------------------------
def test_registry_order_descriptions_metadata_and_removal():
    things = Registry("thing")

    @things.register("b", "the b thing", speed=2)
    def b() -> int:
        return 2

    @things.register("a")
    def a() -> int:
        """Docstring's first line.

        More text."""
        return 1

    assert things.names() == ["b", "a"] and list(things) == ["b", "a"] and len(things) == 2  # registration order
    assert things.build("a") == 1 and things.metadata("b") == {"speed": 2} and things.metadata("a") == {}
    assert things.describe() == "b: the b thing\na: Docstring's first line."
    with pytest.raises(ValueError, match="registered twice"):
        things.add("a", b)
    with pytest.raises(ConfigError, match=r"unknown thing 'bb'; did you mean 'b'\?"):
        things.get("bb")
    with things.registered("c", lambda: 3, "temporary"):
        assert "c" in things and things.build("c") == 3
    assert "c" not in things
    assert things.unregister("b") is b and things.names() == ["a"]


def test_field_choices_read_registries_and_tuples():
    assert field_choices(OptimConfig, "name") == OPTIMIZERS.names() == ["sgd", "adam", "adamw"]
    assert field_choices(ScheduleConfig, "name") == SCHEDULES.names() == ["poly", "cosine", "step", "exponential",
                                                                           "plateau"]
    assert field_choices(LossConfig, "name") == LOSSES.names()
    assert field_choices(DataConfig, "cache") == ["auto", "gpu", "pinned", "mmap"]
    assert field_choices(LoopConfig, "amp") == ["auto", "bf16", "fp16", "off"]
    assert field_choices(LoopConfig, "compile") == ["auto", "on", "off"]
    assert field_choices(OptimConfig, "lr") is None
    with pytest.raises(KeyError):
        field_choices(OptimConfig, "nope")


@pytest.mark.parametrize(("override", "suggestion"), [
    ("optim.name=sgdd", "sgd"), ("schedule.name=cosin", "cosine"), ("loss.name=dice_focall", "dice_focal"),
    ("data.cache=pined", "pinned"), ("loop.amp=bf61", "bf16"),
])
def test_misspelt_names_suggest_the_registered_one(override, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean '{suggestion}'\?"):
        apply_overrides(TrainConfig(), [override])


def test_loss_weights_are_validated_against_the_registered_terms():
    assert LossConfig("dice_focal", {"focal": 0.5}).weights == {"focal": 0.5}
    with pytest.raises(ConfigError, match=r"loss 'dice_focal' has no term 'ce'; its terms are dice, focal"):
        LossConfig("dice_focal", {"ce": 1.0})
    assert set(LOSS_TERMS.names()) == {"dice", "tversky", "ce", "focal"}
    assert all(set(LOSSES.get(name).weights) <= set(LOSS_TERMS) for name in LOSSES)
    with pytest.raises(ConfigError, match="unknown loss term 'hausdorff'"):
        LossSpec({"dice": 1.0, "hausdorff": 1.0})


def test_plan_validates_schemes_against_the_registry():
    with pytest.raises(ConfigError, match=r"unknown normalization scheme 'zscor'; did you mean 'zscore'\?"):
        ChannelNormalization("zscor")
    with pytest.raises(ConfigError, match="'ct' normalization needs clip_low, clip_high, mean, std; missing: std"):
        ChannelNormalization("ct", clip_low=-1.0, clip_high=1.0, mean=0.0)


# ----- components registered from outside -------------------------------------------------------------------
def _plain_sgd(params: list, config: OptimConfig) -> torch.optim.Optimizer:
    """Plain SGD: no momentum, no weight decay."""
    return torch.optim.SGD(params, lr=config.lr, momentum=0.0)


def test_a_registered_optimizer_is_a_valid_config_value_and_steps():
    with pytest.raises(ConfigError, match=r"optim\.name='plain_sgd' is not allowed"):
        OptimConfig(name="plain_sgd")
    with OPTIMIZERS.registered("plain_sgd", _plain_sgd):
        config = apply_overrides(TrainConfig(), ["optim.name=plain_sgd", "optim.lr=0.5"]).optim
        assert "plain_sgd" in field_choices(OptimConfig, "name")
        weight = nn.Parameter(torch.tensor([1.0, -2.0]))
        optimizer = build_optimizer([weight], config)
        (weight**2).sum().backward()  # gradient 2w
        optimizer.step()
        torch.testing.assert_close(weight.detach(), torch.tensor([0.0, 0.0]))  # w - 0.5 * 2w
    with pytest.raises(ConfigError):
        OptimConfig(name="plain_sgd")


def _halving(scheduler, epoch: int) -> float:
    return 0.5**epoch


def test_registered_schedules_floor_or_anneal_to_min_lr():
    for anneal, expected in ((False, [0.01, 0.005, 0.004, 0.004]), (True, [0.01, 0.007, 0.0055, 0.00475])):
        with SCHEDULES.registered("halving", _halving, "halve every epoch", anneal=anneal):
            optimizer = build_optimizer(nn.Linear(2, 2).parameters(), OptimConfig(lr=0.01))
            scheduler = build_scheduler(optimizer, ScheduleConfig(name="halving", min_lr=0.004), total_epochs=4)
            lrs = []
            for _ in range(4):
                lrs.append(scheduler.get_last_lr()[0])
                scheduler.step()
            assert lrs == pytest.approx(expected)


def _tiny_plan() -> Plan:
    return Plan(dataset_name="t", raw_dataset="/x", channel_names={"0": "a"}, labels={"background": 0, "a": 1},
                file_ending=".nii.gz", target_spacing=[1.0] * 3, patch_size=[8, 8, 8], batch_size=1,
                network=NetworkPlan(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]]),
                normalization=[ChannelNormalization()])


def test_a_registered_norm_and_nonlin_build_the_network():
    plan = _tiny_plan()
    with NORMS.registered("layer", lambda ndim, channels, eps=1e-5: nn.GroupNorm(1, channels, eps=eps)), \
            NONLINS.registered("tanh", lambda: nn.Tanh()):
        net = build_network(plan, norm="layer", nonlin="tanh")
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 for m in norms)
    assert any(isinstance(m, nn.Tanh) for m in net.modules())
    assert not any(isinstance(m, (nn.InstanceNorm3d, nn.LeakyReLU)) for m in net.modules())


def _false_positive(x: TermInputs) -> Tensor:
    """Mean probability given to the wrong classes."""
    return (x.probs * (1 - x.onehot)).sum(1).mean()


def _minmax(x: Tensor, mask: Tensor, settings) -> tuple[float, float]:
    """Clip to [clip_low, clip_high] and rescale to [0, 1]."""
    low, high = float(settings.clip_low), float(settings.clip_high)
    x.clamp_(low, high).sub_(low).div_(high - low)
    return low, high - low


@pytest.fixture(scope="module")
def registered():
    """A loss term + loss, an optimiser, a schedule and a normalisation scheme, registered for this module."""
    with LOSS_TERMS.registered("false_positive", _false_positive), \
            LOSSES.registered("dice_fp", LossSpec({"dice": 1.0, "false_positive": 0.5}), "Dice + false positives"), \
            OPTIMIZERS.registered("plain_sgd", _plain_sgd), \
            SCHEDULES.registered("halving", _halving, "halve every epoch"), \
            SCHEMES.registered("minmax", _minmax, requires=("clip_low", "clip_high")):
        yield
    assert "dice_fp" not in LOSSES and "false_positive" not in LOSS_TERMS and "minmax" not in SCHEMES


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, registered):
    """synth -> plan -> (every channel switched to the registered minmax scheme) -> preprocess."""
    root = tmp_path_factory.mktemp("registry")
    dataset = make_synthetic_dataset(root / "Dataset001_Tiny", num_cases=4, shape=(24, 24, 28), seed=2)
    overrides = {"patch_size": [16, 16, 16], "batch_size": 2, "network.features": [4, 8, 8]}
    plan = plan_dataset(dataset, root / "work", overrides=overrides, num_folds=2)
    with pytest.raises(ConfigError, match="'minmax' normalization needs clip_low, clip_high"):
        ChannelNormalization("minmax", clip_low=0.0)
    plan.normalization = [ChannelNormalization("minmax", clip_low=0.0, clip_high=200.0)] * plan.num_channels
    plan.save(root / "work" / "plans.json")
    preprocess_dataset(root / "work", progress=False)
    return root / "work"


def test_registered_loss_optimizer_schedule_and_scheme_train_end_to_end(workdir):
    cases = list_cases(workdir / "preprocessed")
    image = np.asarray(load_case(workdir / "preprocessed", cases[0])[0], np.float32)
    assert image.min() == 0.0 and image.max() == 1.0  # minmax with the plan's clip range, not z-score
    with pytest.raises(ConfigError, match="loss 'dice_fp' has no term 'ce'"):
        apply_overrides(TrainConfig(), ["loss.name=dice_fp", "loss.weights=ce=1"])
    config = apply_overrides(TrainConfig(), [
        "loss.name=dice_fp", "loss.weights=false_positive=0.25", "optim.name=plain_sgd", "schedule.name=halving",
        "loop.epochs=2", "data.iterations_per_epoch=2", "loop.val_iterations=1", "loop.device=cpu",
        "logging.tensorboard=false", "logging.progress_png=false", "logging.progress_bar=false",
        "loop.full_val=false", "data.num_threads=2",
    ])
    train(workdir, 0, config)
    out = workdir / "training" / "fold_0"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        loss = record["loss"]
        assert set(loss) == {"loss", "dice", "false_positive"} and all(np.isfinite(v) for v in loss.values())
        assert 0 < loss["false_positive"] < 2
        # the total is the registered combination with the configured weight
        assert loss["loss"] == pytest.approx(loss["dice"] + 0.25 * loss["false_positive"], rel=1e-4)
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.005])  # the halving schedule
    group = load_checkpoint(out / "checkpoint_final.pt")["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.0 and group["weight_decay"] == 0.0  # plain_sgd, not Nesterov SGD


def test_a_registered_loss_builds_like_the_others(registered):
    plan = _tiny_plan()
    target = (torch.arange(8).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8) < 4).to(torch.int8)
    logits = torch.zeros(1, 2, 8, 8, 8)  # p = 0.5 everywhere: half of the probability is on the wrong class
    total, parts = build_loss("dice_fp", plan, deep_supervision=False)(logits, target)
    assert parts["false_positive"].item() == pytest.approx(0.5)
    assert total.item() == pytest.approx(parts["dice"].item() + 0.25)
