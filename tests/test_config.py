"""The training config tree: defaults, validation, JSON round trip, dotted overrides with suggestions."""
from __future__ import annotations

import json

import pytest

from voxseg.config import (
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    load_config_json,
    option_names,
)
from voxseg.errors import ConfigError


def test_defaults_match_the_documented_recipe():
    config = TrainConfig()
    optim = config.optim
    assert (optim.name, optim.lr, optim.momentum, optim.nesterov) == ("sgd", 1e-2, 0.99, True)
    assert config.optim.weight_decay == 3e-5
    assert (config.schedule.name, config.schedule.exponent) == ("poly", 0.9)
    assert config.loss.name == "dice_ce" and config.plan == {}
    assert (config.data.num_samples, config.data.iterations_per_epoch, config.data.cache) == (1, 250, "auto")
    loop = config.loop
    assert (loop.epochs, loop.grad_clip, loop.ema_alpha, loop.seed) == (1000, 12.0, 0.9, 12345)


def test_round_trip_through_json(tmp_path):
    config = apply_overrides(TrainConfig(), ["optim.name=adamw", "optim.betas=[0.8,0.95]", "loss.weights={\"dice\": 2}",
                                             "plan.patch_size=32,32,16", "plan.network.residual=true"])
    path = tmp_path / "config.json"
    config.save(path)
    again = load_config_json(path)
    assert again == config
    assert json.loads(json.dumps(again.to_dict())) == json.loads(path.read_text())
    assert again.plan == {"patch_size": [32, 32, 16], "network.residual": True} and again.loss.weights == {"dice": 2}


def test_partial_json_takes_defaults(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lr": 0.5}}))
    config = load_config_json(path)
    assert config.optim.lr == 0.5 and config.optim.name == "sgd" and config.loop.epochs == 1000


def test_unknown_json_key_names_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr'; did you mean 'optim\.lr'"):
        TrainConfig.from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="did you mean 'schedule'"):
        TrainConfig.from_dict({"schedul": {}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_json(tmp_path / "bad.json")


def test_overrides_parse_by_field_type():
    config = apply_overrides(TrainConfig(), [
        "optim.lr=3e-4", "loop.epochs=10", "data.num_samples=2", "loop.deterministic=yes", "optim.nesterov=off",
        "plan.batch_size=3", "data.cache_budget_gb=1.5", "schedule.gamma=null", "plan.network.residual=false",
        "loss.weights=dice=1,ce=0.5", "augment.scale_range=0.8,1.2",
    ])
    assert config.loss.weights == {"dice": 1.0, "ce": 0.5} and config.augment.scale_range == (0.8, 1.2)
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.loop.epochs == 10 and isinstance(config.loop.epochs, int)
    assert config.data.num_samples == 2
    assert config.loop.deterministic is True and config.optim.nesterov is False
    assert config.plan["batch_size"] == 3 and config.data.cache_budget_gb == 1.5
    assert config.plan["network.residual"] is False
    # the input config is not modified
    assert TrainConfig().optim.lr == 1e-2


def test_override_errors_suggest_the_nearest_option():
    with pytest.raises(ConfigError, match=r"unknown option 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        apply_overrides(TrainConfig(), ["optim.lrr=3e-4"])
    with pytest.raises(ConfigError, match=r"did you mean 'loop\.epochs'"):
        apply_overrides(TrainConfig(), ["loop.epoch=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        apply_overrides(TrainConfig(), ["optm.lr=3"])
    with pytest.raises(ConfigError, match="expects an integer"):
        apply_overrides(TrainConfig(), ["loop.epochs=ten"])
    with pytest.raises(ConfigError, match="expects true or false"):
        apply_overrides(TrainConfig(), ["loop.deterministic=maybe"])
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(TrainConfig(), ["loop.epochs"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(TrainConfig(), ["optim=1"])


def test_validation_names_the_field_and_allowed_values():
    with pytest.raises(ConfigError, match=r"optim\.name='rmsprop'.*sgd, adam, adamw"):
        OptimConfig(name="rmsprop")
    with pytest.raises(ConfigError, match=r"schedule\.name.*poly, cosine, step, exponential, plateau"):
        ScheduleConfig(name="linear")
    with pytest.raises(ConfigError, match=r"loop\.amp.*auto, bf16, fp16, off"):
        LoopConfig(amp="fp8")
    with pytest.raises(ConfigError, match=r"loop\.device"):
        LoopConfig(device="tpu")
    with pytest.raises(ConfigError, match=r"did you mean 'dice_ce'"):
        apply_overrides(TrainConfig(), ["loss.name=dice_c"])
    with pytest.raises(ConfigError, match=r"loop\.epochs"):
        apply_overrides(TrainConfig(), ["loop.epochs=0"])
    with pytest.raises(ConfigError, match=r"data\.cache"):
        apply_overrides(TrainConfig(), ["data.cache=ssd"])


def test_augment_section_is_nested_and_overridable():
    names = option_names()
    augment_names = [n for n in names if n.startswith("augment.")]
    assert augment_names, "the augmentation config is part of the tree"
    assert {"optim.lr", "loop.epochs", "data.num_samples", "logging.tensorboard"} <= set(names)
    assert not {"resume", "pretrained"} & set(names)  # how a run starts is given with the run, not a setting
    # pick a numeric or boolean augmentation option and override it through the same path
    config = TrainConfig()
    for name in augment_names:
        value = getattr(config.augment, name.split(".", 1)[1])
        if isinstance(value, bool):
            changed = apply_overrides(config, [f"{name}={'false' if value else 'true'}"])
            assert getattr(changed.augment, name.split(".", 1)[1]) is (not value)
            break
