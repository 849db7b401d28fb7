"""Training recipes: each preset builds a valid config, the fast recipe warms up then decays, unknown names
suggest the nearest, `voxseg train --recipe` is applied before the other flags, and Adam/AdamW are fused only
on CUDA."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from voxseg.cli import main
from voxseg.config import OptimConfig, TrainConfig, apply_overrides
from voxseg.errors import ConfigError
from voxseg.optim import build_optimizer, build_scheduler
from voxseg.train.recipes import RECIPES, apply_recipe, recipe_overrides


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_gives_a_valid_config(name: str) -> None:
    config = apply_recipe(TrainConfig(), name)
    assert isinstance(config, TrainConfig)
    # the JSON round trip validates every field again
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()
    # every override the recipe lists is in effect (compared with that override alone on the defaults)
    for item in recipe_overrides(name):
        section, option = item.split("=", 1)[0].split(".")
        alone = apply_overrides(TrainConfig(), [item])
        assert getattr(getattr(config, section), option) == getattr(getattr(alone, section), option), item


def test_nnunet_recipe_is_the_defaults_and_resets_a_changed_config() -> None:
    assert apply_recipe(TrainConfig(), "nnunet").to_dict() == TrainConfig().to_dict()
    changed = apply_overrides(TrainConfig(), ["optim.name=adam", "optim.lr=1e-4", "schedule.name=cosine",
                                              "schedule.warmup_epochs=3", "loop.epochs=7"])
    assert apply_recipe(changed, "nnunet").to_dict() == TrainConfig().to_dict()


def test_fast_recipe_is_shorter_and_uses_adamw_with_cosine() -> None:
    fast, nnunet = apply_recipe(TrainConfig(), "fast"), apply_recipe(TrainConfig(), "nnunet")
    assert fast.optim.name == "adamw" and 1e-3 <= fast.optim.lr <= 3e-3
    assert fast.schedule.name == "cosine" and fast.schedule.warmup_epochs > 0
    iterations = fast.loop.epochs * fast.data.iterations_per_epoch
    assert iterations < nnunet.loop.epochs * nnunet.data.iterations_per_epoch / 2


def test_fast_recipe_lr_warms_up_then_decays_to_its_floor() -> None:
    config = apply_recipe(TrainConfig(), "fast")
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, config.loop.epochs)
    lrs = []
    for _ in range(config.loop.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    warmup, peak = config.schedule.warmup_epochs, config.optim.lr
    ramp = lrs[:warmup + 1]
    assert ramp[0] < 0.2 * peak  # starts small ...
    assert all(b > a for a, b in itertools.pairwise(ramp))  # ... rises every epoch ...
    assert lrs[warmup] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)  # ... to the peak
    decay = lrs[warmup:]
    assert all(b <= a for a, b in itertools.pairwise(decay))  # then only decreases
    assert decay[-1] < 0.01 * peak and decay[-1] >= config.schedule.min_lr
    # half-way through the decay the cosine is at half of the peak (above the floor)
    middle = warmup + (config.loop.epochs - warmup) // 2
    assert lrs[middle] == pytest.approx(config.schedule.min_lr + 0.5 * (peak - config.schedule.min_lr), rel=0.02)


def test_unknown_recipe_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        recipe_overrides("fsat")
    message = str(info.value)
    assert "did you mean 'fast'" in message and "nnunet" in message and "--recipe" in message
    with pytest.raises(ConfigError):
        apply_recipe(TrainConfig(), "sgd")


def test_recipe_overrides_are_a_copy() -> None:
    overrides = recipe_overrides("fast")
    overrides.append("optim.lr=1")
    assert "optim.lr=1" not in RECIPES["fast"]


def test_train_help_lists_every_recipe(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--recipe" in text and all(name in text for name in RECIPES)


# ----- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from voxseg.data.plan import plan_dataset
    from voxseg.data.preprocess import preprocess_dataset
    from voxseg.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("recipes")
    dataset = make_synthetic_dataset(root / "Dataset001_Synth", num_cases=4, shape=(16, 16, 16), seed=0)
    work = root / "work"
    plan_dataset(dataset, work, val_fraction=0.25,
                 overrides={"patch_size": "16,16,16", "batch_size": "2", "network.features": "4,8,8"})
    preprocess_dataset(work, num_workers=1, progress=False)
    return work


TINY = ["--iterations", "1", "--device", "cpu", "--set", "logging.tensorboard=false",
        "--set", "logging.progress_png=false", "--set", "logging.progress_bar=false",
        "--set", "loop.val_iterations=1", "--set", "loop.full_val=false", "--set", "data.num_threads=2"]


def _main(*args: object) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def test_cli_recipe_then_flags_in_config_json(workdir: Path) -> None:
    code, err = _main("train", workdir, "--fold", "0", "--recipe", "fast", "--lr", "5e-4", "--epochs", "1", *TINY)
    assert code == 0, err
    saved = json.loads((workdir / "training" / "fold_0" / "config.json").read_text())
    assert saved["optim"]["name"] == "adamw" and saved["schedule"]["name"] == "cosine"  # from the recipe
    assert saved["schedule"]["warmup_epochs"] == 10 and saved["optim"]["weight_decay"] == 1e-4
    assert saved["optim"]["lr"] == 5e-4 and saved["loop"]["epochs"] == 1  # the flags win
    assert saved["data"]["iterations_per_epoch"] == 1  # --iterations beats the recipe's 250 too


def test_cli_recipe_applies_on_top_of_a_config_file_and_set_still_wins(workdir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_train(workdir, fold, config, **kwargs):  # the config cmd_train hands to training
        seen["config"] = config
        return {"epochs": 0}

    monkeypatch.setattr("voxseg.train.loop.train", fake_train)
    path = tmp_path / "config.json"
    apply_overrides(TrainConfig(), ["optim.name=adam", "loop.epochs=3", "augment.rot90_p=0.5"]).save(path)
    assert _main("train", workdir, "--config", path, "--device", "cpu")[0] == 0
    assert seen["config"].optim.name == "adam"  # no --recipe: the file's settings stay
    assert _main("train", workdir, "--config", path, "--recipe", "fast", "--set", "schedule.warmup_epochs=2")[0] == 0
    config = seen["config"]
    assert config.optim.name == "adamw" and config.loop.epochs == 250 and config.schedule.warmup_epochs == 2
    assert config.augment.rot90_p == 0.5  # what the recipe does not set comes from the file


def test_cli_unknown_recipe_is_a_user_error(workdir: Path) -> None:
    code, err = _main("train", workdir, "--recipe", "fastt", *TINY)
    assert code != 0 and "did you mean 'fast'" in err and "Traceback" not in err


# ----- fused optimisers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_is_not_fused_on_cpu(name: str) -> None:
    model = torch.nn.Conv3d(2, 2, 3)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name=name, lr=1e-3))
    assert not optimizer.defaults["fused"]
    assert len(optimizer.param_groups[0]["params"]) == 2  # the generator was not consumed by the check


def test_param_groups_keep_their_params() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[1].weight, "lr": 1e-4}]
    optimizer = build_optimizer(groups, OptimConfig(name="adamw", lr=1e-3))
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1]
    assert optimizer.param_groups[1]["lr"] == 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_is_fused_on_cuda(name: str) -> None:
    model = torch.nn.Conv3d(2, 2, 3).cuda()
    optimizer = build_optimizer(model.parameters(), OptimConfig(name=name, lr=1e-3))
    assert optimizer.defaults["fused"] is True
    before = model.weight.detach().clone()
    model(torch.randn(1, 2, 5, 5, 5, device="cuda")).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    sgd = build_optimizer(model.parameters(), OptimConfig(name="sgd"))
    assert not sgd.defaults.get("fused")
