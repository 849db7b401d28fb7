"""Design rules of voxseg/train/ made tests (issue 25): one module per piece, names that say what things are,
small functions, one place that decides where an optimiser step falls, a loop that only trains, and one
spelling of how a run starts (resume, pretrained, force: arguments, never config options)."""
from __future__ import annotations

import ast
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from voxseg.cli import main
from voxseg.config import TrainConfig, apply_overrides, load_config_json, option_names
from voxseg.errors import ConfigError
from voxseg.train import api, loop, testonly
from voxseg.train.api import build_train_config, train_fold
from voxseg.train.resume import config_changes
from voxseg.train.start import RunStart
from voxseg.train.step import TrainStep

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DIR = ROOT / "voxseg" / "train"
MAX_PARAMETERS, MAX_LINES = 8, 60
# functions another part of issue 25 reshapes (full validation takes the InferConfig there): drop on merge
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ----- modules and names ------------------------------------------------------------------------------------
def test_each_piece_of_training_has_its_own_module():
    homes = {"step.py": {"TrainStep", "RunningMeans"}, "feed.py": {"TrainData"},
             "prefetch.py": {"BatchStream", "prefetch_depth"}, "testonly.py": {"evaluate_fold"},
             "start.py": {"RunStart"}}
    defined = {name: {node.name for node in _tree(TRAIN_DIR / name).body
                      if isinstance(node, (ast.ClassDef, ast.FunctionDef))} for name in homes}
    for module, names in homes.items():
        assert names <= defined[module], module
        others = set().union(*(homes[m] for m in homes if m != module))
        assert not defined[module] & others, f"{module} defines {defined[module] & others}, homed elsewhere"


def test_training_code_binds_no_name_that_hides_what_it_is():
    vague = {"t", "run", "Resolved"}
    found = []
    for path in sorted(TRAIN_DIR.glob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                names.append(node.name)
            elif isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names = [node.id]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {name}" for name in names if name in vague]
    assert not found, f"name what it is (training, setup, ...): {found}"


def test_every_module_and_function_stays_small():
    """No module over 400 lines; no function over 60 lines or with more than 8 parameters (self aside, *args and
    **options counted): group parameters into a settings object, split long functions."""
    over = []
    for path in sorted((ROOT / "voxseg").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if len(path.read_text(encoding="utf-8").splitlines()) > 400:
            over.append(f"{relative} is over 400 lines")
        for node in ast.walk(_tree(path)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            count = len([a for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")])
            count += bool(args.vararg) + bool(args.kwarg)
            lines = node.end_lineno - node.lineno + 1
            if count > MAX_PARAMETERS or lines > MAX_LINES:
                over.append(f"{relative}:{node.name} ({count} parameters, {lines} lines)")
    assert not over, f"group parameters into a settings object, split long functions: {over}"


# ----- the optimiser-step boundary: decided by the step alone -----------------------------------------------
def _modulo_operations(function) -> list[str]:
    tree = ast.parse(inspect.getsource(function).lstrip())
    return [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)]


def test_the_loop_counts_iterations_from_the_step():
    assert not _modulo_operations(loop.run_epoch), "the loop must not recompute the accumulation boundary"
    assert "optimizer_stepped" in inspect.getsource(loop.run_epoch)


class _MSE(nn.Module):
    def forward(self, output, target):
        loss = ((output - target) ** 2).mean()
        return loss, {}


def _step(grad_accum: int) -> TrainStep:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return TrainStep(model, _MSE(), torch.optim.SGD(model.parameters(), lr=0.1), "cpu", grad_accum=grad_accum,
                     grad_clip=0.0)


def test_the_step_reports_which_micro_batches_complete_an_optimiser_step():
    step = _step(3)
    x, y = torch.randn(2, 3), torch.randn(2, 1)
    stepped = []
    for _ in range(7):
        before = step.model.weight.detach().clone()
        step(x, y)
        stepped.append(step.optimizer_stepped)
        assert step.optimizer_stepped == (not torch.equal(before, step.model.weight))  # the flag is the truth
    assert stepped == [False, False, True, False, False, True, False]


def test_a_restore_starts_the_accumulation_afresh():
    """A checkpoint holds no half-accumulated gradients, so after a restore (also one with another grad_accum)
    the optimiser steps after the first `grad_accum` micro-batches, never after a leftover count."""
    x, y = torch.randn(2, 3), torch.randn(2, 1)
    single = _step(1)
    for _ in range(3):
        single(x, y)
    resumed = _step(2)
    resumed.load_state_dict(single.state_dict())
    resumed(x, y)
    assert not resumed.optimizer_stepped
    resumed(x, y)
    assert resumed.optimizer_stepped
    # a checkpoint of an earlier version counted micro-batches in "micro_steps": read and ignored
    older = _step(2)
    older.load_state_dict({**single.state_dict(), "micro_steps": 3})
    older(x, y)
    assert not older.optimizer_stepped


# ----- the loop only trains; test-only is its own entry -----------------------------------------------------
def test_train_only_trains_and_the_api_dispatches_test_only(tmp_path, monkeypatch):
    assert "test_only" not in inspect.signature(loop.train).parameters
    calls = []
    monkeypatch.setattr(loop, "train", lambda *args, **kwargs: calls.append("train") or {})
    monkeypatch.setattr(testonly, "evaluate_fold",
                        lambda workdir, fold, config, checkpoint: calls.append(("test-only", checkpoint)) or {})
    train_fold(tmp_path, 0, test_only="final")
    train_fold(tmp_path, 0, test_only=True)
    train_fold(tmp_path, 0)
    assert calls == [("test-only", "final"), ("test-only", True), "train"]
    assert api.train_fold is train_fold


# ----- how a run starts: one spelling, arguments only -------------------------------------------------------
def test_resume_and_pretrained_are_no_config_options():
    fields = {field for field in TrainConfig.__dataclass_fields__}
    assert not {"resume", "pretrained"} & fields
    assert not {"resume", "pretrained"} & set(option_names())
    assert set(inspect.signature(RunStart).parameters) == {"resume", "pretrained", "force"}
    with pytest.raises(ConfigError, match="resume"):
        apply_overrides(TrainConfig(), ["resume=true"])


def test_run_start_refuses_contradictions():
    with pytest.raises(ConfigError, match="give one of --resume and --pretrained"):
        RunStart(resume=True, pretrained="other.pt")
    with pytest.raises(ConfigError, match="--force starts the fold's run anew"):
        RunStart(resume="run/checkpoint_best.pt", force=True)
    assert RunStart(pretrained="other.pt", force=True).force  # a new run from weights, replacing the old one


def test_the_command_refuses_contradictory_starts(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--resume", "--force"]) != 0
    assert "--force starts the fold's run anew" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--resume", "--pretrained", "other.pt"]) != 0
    assert "give one of --resume and --pretrained" in capsys.readouterr().err


def _earlier_config_json(path: Path, **start: object) -> dict:
    """A config.json as versions up to 0.1.0 wrote it: the whole config plus "resume" and "pretrained"."""
    data = {**apply_overrides(TrainConfig(), ["loop.epochs=7", "optim.lr=0.02"]).to_dict(),
            "resume": False, "pretrained": None, **start}
    path.write_text(json.dumps(data))
    return data


def test_a_config_json_of_an_earlier_version_still_loads(tmp_path):
    path = tmp_path / "config.json"
    _earlier_config_json(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old defaults are dropped silently
        config = load_config_json(path)
    assert config.loop.epochs == 7 and config.optim.lr == 0.02
    assert config.to_dict() == apply_overrides(TrainConfig(), ["loop.epochs=7", "optim.lr=0.02"]).to_dict()


def test_an_earlier_config_with_pretrained_set_loads_and_says_how_to_give_it(tmp_path):
    path = tmp_path / "config.json"
    _earlier_config_json(path, pretrained="weights.pt")
    with pytest.warns(UserWarning, match=r"'pretrained' is no longer a config option.*--pretrained weights.pt"):
        config = load_config_json(path)
    assert config.loop.epochs == 7


def test_resuming_a_run_of_an_earlier_version(tmp_path):
    """The run's config.json and its checkpoint's config hold the two old keys: the resumed config is the run's,
    and comparing the two finds no change."""
    fold = tmp_path / "training" / "fold_0"
    fold.mkdir(parents=True)
    saved = _earlier_config_json(fold / "config.json")
    config = build_train_config(tmp_path, 0, start=RunStart(resume=True))
    assert config.loop.epochs == 7 and config.optim.lr == 0.02
    assert config_changes(saved, config.to_dict()) == {}
