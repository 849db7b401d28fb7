"""The `voxseg train` flags are derived from the config tree, and the CLI is a thin layer over the API: the same
options give the same config through flags and through `build_train_config`, every option is documented with
its default and choices, unset flags override nothing, a resumed run starts from its config.json either way,
`evaluate_crossval` decides the postprocessing like `voxseg evaluate --crossval`, and the docs' tables are
the parser's."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import voxseg
from voxseg.cli import build_parser, main
from voxseg.cli.derive import PLAN_DEFAULT, train_options
from voxseg.cli.docs import BLOCKS, render, train_parser
from voxseg.cli.train import TRAIN_FLAGS, config_from_args
from voxseg.config import LossConfig, OptimConfig, TrainConfig, apply_overrides
from voxseg.configtree import field_choices
from voxseg.data.io import read_image, write_image
from voxseg.errors import ConfigError
from voxseg.infer.archive import CHECKPOINT_CHOICES
from voxseg.train.api import build_train_config, train_fold
from voxseg.train.start import RunStart

ROOT = Path(__file__).resolve().parents[1]


def _help(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0
    return out.getvalue()


def _parse(*args: object) -> argparse.Namespace:
    return build_parser().parse_args([str(a) for a in args])


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


# ----- one config, whichever way it is asked for --------------------------------------------------------------
def test_flags_and_api_give_the_same_config(tmp_path: Path) -> None:
    args = _parse("train", tmp_path, "--epochs", 3, "--lr", 0.1, "--batch-size", 4, "--no-deep-supervision",
                  "--residual", "--set", "augment.rot90_p=0.5", "--recipe", "fast")
    from_flags = config_from_args(args)
    from_api = build_train_config(tmp_path, 0, recipe="fast", overrides=[
        "loop.epochs=3", "optim.lr=0.1", "plan.batch_size=4", "plan.network.deep_supervision=false",
        "plan.network.residual=true", "augment.rot90_p=0.5"])
    assert from_flags.to_dict() == from_api.to_dict()
    assert from_flags.loop.epochs == 3 and from_flags.optim.lr == 0.1 and from_flags.augment.rot90_p == 0.5
    assert from_flags.optim.name == "adamw" and from_flags.schedule.name == "cosine"  # the recipe's
    assert from_flags.plan == {"batch_size": 4, "network.deep_supervision": False, "network.residual": True}


def test_no_flags_give_the_defaults_and_flags_beat_the_recipe(tmp_path: Path) -> None:
    assert config_from_args(_parse("train", tmp_path)).to_dict() == TrainConfig().to_dict()
    config = config_from_args(_parse("train", tmp_path, "--recipe", "fast", "--epochs", 9, "--patch-size", "32,32,32",
                                     "--foreground-oversampling", 0.5, "--loss-weights", "dice=1,ce=0.5"))
    assert config.loop.epochs == 9 and config.optim.lr == 3e-3  # the flag wins, the recipe keeps the rest
    assert config.plan == {"patch_size": [32, 32, 32], "foreground_oversampling": 0.5}
    assert config.loss.weights == {"dice": 1.0, "ce": 0.5}


def test_an_unset_flag_leaves_a_config_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "my.json"
    apply_overrides(TrainConfig(), ["loop.epochs=7", "optim.lr=0.5", "optim.name=adam", "plan.batch_size=3",
                                    "plan.network.residual=true", "data.cache=mmap"]).save(path)
    config = config_from_args(_parse("train", tmp_path, "--config", path, "--lr", 0.1))
    assert config.optim.lr == 0.1  # given
    assert config.loop.epochs == 7 and config.optim.name == "adam" and config.data.cache == "mmap"  # not given
    assert config.plan == {"batch_size": 3, "network.residual": True}  # an unset --residual/--no-residual too
    config = config_from_args(_parse("train", tmp_path, "--config", path, "--no-residual"))
    assert config.plan == {"batch_size": 3, "network.residual": False}


def test_resume_starts_from_the_fold_config_json_in_api_and_cli(tmp_path: Path, monkeypatch) -> None:
    saved = apply_overrides(TrainConfig(), ["loop.epochs=2", "data.iterations_per_epoch=2", "loop.device=cpu",
                                            "plan.batch_size=2"])
    (tmp_path / "training" / "fold_1").mkdir(parents=True)
    saved.save(tmp_path / "training" / "fold_1" / "config.json")

    resumed = build_train_config(tmp_path, 1, overrides=["loop.epochs=5"], start=RunStart(resume=True))
    assert resumed.loop.epochs == 5  # the override
    assert resumed.data.iterations_per_epoch == 2 and resumed.loop.device == "cpu"  # the run's own settings
    assert resumed.plan == {"batch_size": 2}
    cli = config_from_args(_parse("train", tmp_path, "--fold", 1, "--resume", "--epochs", 5))
    assert cli.to_dict() == resumed.to_dict()
    # not resuming, or another fold: the defaults
    assert build_train_config(tmp_path, 1).data.iterations_per_epoch == 250
    assert build_train_config(tmp_path, 0, start=RunStart(resume=True)).data.iterations_per_epoch == 250

    seen = {}
    monkeypatch.setattr("voxseg.train.loop.train", lambda workdir, fold, config, start: seen.update(
        config=config, start=start) or {"epochs": config.loop.epochs})
    assert train_fold(tmp_path, 1, overrides=["loop.epochs=5"], start=RunStart(resume=True)) == {"epochs": 5}
    assert seen["config"].to_dict() == resumed.to_dict() and seen["start"] == RunStart(resume=True)
    assert voxseg.train_fold is train_fold and voxseg.build_train_config is build_train_config
    assert voxseg.RunStart is RunStart


def test_config_sources_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    TrainConfig().save(path)
    with pytest.raises(ConfigError, match="not both"):
        build_train_config(tmp_path, 0, config=TrainConfig(), config_file=path)
    start = apply_overrides(TrainConfig(), ["optim.lr=0.2"])
    built = build_train_config(tmp_path, 0, config=start, overrides=["loop.epochs=4"])
    assert built.optim.lr == 0.2 and built.loop.epochs == 4 and start.loop.epochs == 1000  # start not modified


def test_a_bad_flag_value_names_the_flag(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["train", str(tmp_path), "--loss-weights", "focal=1"]) != 0
    err = capsys.readouterr().err
    assert "argument --loss-weights" in err and "no term 'focal'" in err
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--epochs", "many"])
    assert "argument --epochs" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--set", "loop.residual=true"]) != 0
    assert "unknown option 'loop.residual'" in capsys.readouterr().err  # a plan setting, not a loop option


# ----- every option documented, defaults and choices from the field -------------------------------------------
def test_every_option_has_help_and_its_default_shows_in_help() -> None:
    options = train_options()
    assert {"optim.lr", "augment.rot90_p", "plan.batch_size", "plan.network.residual"} <= set(options)
    assert not {"resume", "pretrained"} & set(options)  # flags of the run (--resume, --pretrained), not options
    assert "plan" not in options and set(TRAIN_FLAGS.values()) <= set(options)
    text = _help("train", "--help")
    listing = _help("train", "--list-options")
    for option in options.values():
        assert option.help, f"{option.name} has no documentation"
        leaf = option.name.split(".", 1)[1] if "." in option.name else option.name
        if option.default is PLAN_DEFAULT:
            assert f" {leaf}" in text
        else:
            assert f" {leaf}={option.shown_default}" in text, option.name
        assert f"{option.name} (" in listing and option.help.split()[0] in listing
    assert "optim.lr (float, default 0.01): initial learning rate" in listing
    assert " lr=0.01 " in text and " rot90_p=0.0 " in text and " scale_range=[0.7,1.4] " in text


def test_each_flag_help_is_its_field_doc_and_default() -> None:
    actions, options = _actions(train_parser()), train_options()
    for flag, name in TRAIN_FLAGS.items():
        action, option = actions[flag], options[name]
        assert action.dest == name and action.default is argparse.SUPPRESS
        assert action.help.replace("%%", "%") == f"{option.help} [{name}; default: {option.shown_default}]"
    assert "initial learning rate" in actions["--lr"].help and "default: 0.01" in actions["--lr"].help
    assert "default: the plan's" in actions["--batch-size"].help
    assert isinstance(actions["--no-residual"], argparse.BooleanOptionalAction)
    assert isinstance(actions["--no-deep-supervision"], argparse.BooleanOptionalAction)


def test_choices_in_help_equal_the_field_choices() -> None:
    actions, text = _actions(train_parser()), _help("train", "--help")
    with_choices = 0
    for flag, name in TRAIN_FLAGS.items():
        section, leaf = name.rsplit(".", 1)
        cls = type(getattr(TrainConfig(), section)) if not name.startswith("plan.") else None
        expected = field_choices(cls, leaf) if cls else None
        assert actions[flag].choices == expected, flag
        if expected:
            with_choices += 1
            assert f"{flag} {{{','.join(expected)}}}" in text
    assert with_choices == 6  # optimizer, schedule, loss, amp, compile, cache
    assert field_choices(OptimConfig, "name") == ["sgd", "adam", "adamw"]
    assert field_choices(LossConfig, "name") == ["dice_ce", "dice", "ce", "focal", "tversky", "dice_focal"]
    assert field_choices(LossConfig, "weights") is None
    with pytest.raises(SystemExit):
        _parse("train", "w", "--optimizer", "sgdd")


def test_field_choices_reads_registries_and_tuples() -> None:
    class Names:
        def names(self) -> list[str]:
            return ["a", "b"]

    @dataclass
    class Settings:
        by_registry: str = field(default="a", metadata={"choices": Names()})
        by_tuple: str = field(default="x", metadata={"choices": ("x", "y")})
        free: str = "z"

    assert field_choices(Settings, "by_registry") == ["a", "b"]
    assert field_choices(Settings, "by_tuple") == ["x", "y"] and field_choices(Settings, "free") is None
    with pytest.raises(KeyError):
        field_choices(Settings, "missing")


def test_checkpoint_choices_are_one_list() -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("predict", "export"):
        action = _actions(commands[name].complete())["--checkpoint"]
        assert tuple(action.choices) == CHECKPOINT_CHOICES and action.default == "final"


def test_the_training_docs_tables_are_the_parsers() -> None:
    text = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    assert render(text) == text, "docs/TRAINING.md is out of date: run python -m voxseg.cli.docs docs/TRAINING.md"
    for make in BLOCKS.values():
        assert make() in text
    for flag, name in TRAIN_FLAGS.items():
        assert f"| `{flag}" in text and f"| `{name}` |" in text


# ----- cross-validation through the API -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def crossval_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A planned work directory whose two folds 'predicted' their validation cases: the largest tumour of the
    reference plus a spurious far-away blob of edema, which largest-foreground-component postprocessing removes."""
    from voxseg.data.plan import plan_dataset
    from voxseg.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("crossval")
    dataset = make_synthetic_dataset(root / "Dataset001_Tiny", num_cases=4, shape=(24, 24, 24), seed=1)
    work = root / "work"
    plan_dataset(dataset, work, num_folds=2, overrides={"patch_size": "16,16,16", "batch_size": "2",
                                                          "network.features": "4,8,8"})
    for fold, split in enumerate(json.loads((work / "splits.json").read_text())):
        out = work / "training" / f"fold_{fold}" / "validation"
        out.mkdir(parents=True)
        for name in split["val"]:
            labels, geometry = read_image(dataset / "labelsTr" / f"{name}.nii.gz")
            components, _ = ndimage.label(labels > 0)
            largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
            labels = np.where(components == largest, labels, 0)  # one tumour ...
            assert not labels[:4, :4, :4].any()
            labels[:2, :2, :2] = 1  # ... and a far-away false positive
            write_image(out / f"{name}.nii.gz", labels.astype(np.uint8), geometry)
    return work


def test_evaluate_crossval_decides_postprocessing_like_the_cli(crossval_workdir: Path, tmp_path: Path) -> None:
    cli_work = tmp_path / "cli"
    shutil.copytree(crossval_workdir, cli_work)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", "--crossval", str(cli_work)]) == 0
    assert "postprocessing: keep the largest foreground component" in out.getvalue()

    result = voxseg.evaluate_crossval(crossval_workdir)
    summary, decision, path, _ = result
    assert path == crossval_workdir / "postprocessing.json" and json.loads(path.read_text()) == decision
    assert decision == json.loads((cli_work / "postprocessing.json").read_text())
    assert decision["num_cases"] == 4 and [1, 2, 3] in decision["largest_component"]  # the blob goes: Dice rises
    assert decision["mean_dice_foreground_candidate"] > decision["mean_dice_before"]
    assert summary["folds"] == [0, 1] and summary["counts"]["cases"] == 4
    api_file, cli_file = (json.loads((w / "training" / "crossval" / "summary.json").read_text())
                          for w in (crossval_workdir, cli_work))
    assert json.dumps(api_file["mean"]) == json.dumps(cli_file["mean"]) == json.dumps(summary["mean"])
    assert [c["metrics"] for c in api_file["per_case"]] == [c["metrics"] for c in cli_file["per_case"]]
    with pytest.warns(UserWarning, match="no prediction in .* for 2 reference case"):  # fold 1's cases are left out
        assert voxseg.evaluate_crossval(crossval_workdir, folds=[0]).summary["counts"]["cases"] == 2


def test_building_the_parser_imports_no_torch() -> None:
    """`voxseg --help` and the light commands stay fast: derived flags are added when their command is used."""
    import subprocess
    import sys

    code = ("import sys, voxseg.cli; parser = voxseg.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "parser.parse_args(['check', 'x']); assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_crossval_prints_its_decision_as_a_sentence_and_the_table_after_it(crossval_workdir: Path,
                                                                            tmp_path: Path) -> None:
    from voxseg.evaluate.folder import format_table

    work = tmp_path / "work"
    shutil.copytree(crossval_workdir, work)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", "--crossval", str(work)]) == 0
    printed = out.getvalue()
    before = json.loads((work / "training" / "crossval" / "summary.json").read_text())
    after = json.loads((work / "training" / "crossval" / "postprocessed" / "summary.json").read_text())
    assert after["counts"]["cases"] == 4 and after["foreground_mean"]["dice"] > before["foreground_mean"]["dice"]
    assert printed.startswith(format_table(after)) and format_table(before) not in printed  # the table after it
    dice = f"(cross-validation Dice {before['foreground_mean']['dice']:.3f} -> {after['foreground_mean']['dice']:.3f})"
    assert f"postprocessing: keep the largest foreground component (all classes together) {dice}" in printed
    assert "{" not in printed.split("postprocessing:")[1]  # a sentence, not a dict
    assert "the table is after postprocessing" in printed


@pytest.mark.parametrize("kept, dice, sentence", [
    ([[1], [3]], (0.812, 0.823), "keep the largest component of classes edema, enhancing (cross-validation Dice "
                                 "0.812 -> 0.823); none for necrosis"),
    ([[1, 2, 3], [2]], None, "keep the largest foreground component (all classes together), then keep the largest "
                             "component of class necrosis; none for edema, enhancing"),
    ([[1, 2, 3]], (0.5, 0.6), "keep the largest foreground component (all classes together) (cross-validation Dice "
                              "0.500 -> 0.600); no class on its own"),
    ([], (0.7, 0.7), "none: keeping the largest component raised the Dice of no class (cross-validation Dice 0.700)"),
    ([[1], [2], [3]], None, "keep the largest component of classes edema, necrosis, enhancing"),
])
def test_postprocessing_sentence(kept, dice, sentence) -> None:
    from voxseg.infer.postprocess import describe_postprocessing

    names = ["edema", "necrosis", "enhancing"]
    assert describe_postprocessing({"largest_component": kept}, [[1], [2], [3]], names, dice) == sentence
