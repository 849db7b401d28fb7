"""Inference settings are one config tree: `InferConfig` is the one home of their defaults (a guard fails on a tile
step or tile batch default written anywhere else), `voxseg predict`'s flags are derived from its fields and list
each with its default, the flags and the Python API build the same config, every bad value is refused naming
the option, and mixed precision is resolved in one function for training and inference."""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import re
from pathlib import Path

import pytest
import torch

from tests.test_predictor import make_workdir, tiny_plan
from voxseg.cli import build_parser, main
from voxseg.cli.derive import as_text
from voxseg.cli.infer import PREDICT_EXTRA_FLAGS, PREDICT_FLAGS, predict_config
from voxseg.devices import resolve_amp
from voxseg.errors import ConfigError
from voxseg.infer.config import InferConfig, Tiling, infer_config
from voxseg.infer.predictor import Predictor
from voxseg.infer.sliding_window import sliding_window_inference
from voxseg.infer.validation import full_validation
from voxseg.train import setup

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "voxseg" / "infer" / "config.py"
FIELDS = [f for f in dataclasses.fields(InferConfig)]


def _predict_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return commands["predict"].complete()


def _predict_args(*flags: str) -> argparse.Namespace:
    return _predict_parser().parse_args(["-m", "work", "-i", "in", "-o", "out", *flags])


# ----- the flags are the fields ---------------------------------------------------------------------------------
def test_predict_help_lists_every_field_with_its_default() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(out.getvalue().split())  # argparse wraps the help lines
    for item in FIELDS:
        default = item.default if item.default_factory is dataclasses.MISSING else item.default_factory()
        assert f"[{item.name}; default: {as_text(default)}]" in text, item.name
    # every field has a flag, and every flag names a field
    flagged = set(PREDICT_FLAGS.values()) | set(PREDICT_EXTRA_FLAGS.values())
    assert flagged == {item.name for item in FIELDS}


def test_no_flags_give_the_default_config_and_flags_give_their_fields() -> None:
    assert predict_config(_predict_args()) == InferConfig()
    config = predict_config(_predict_args(
        "--folds", "0,2", "--checkpoint", "best", "--step", "0.25", "--tile-batch", "2", "--mirror-axes", "1,2",
        "--amp", "off", "--device", "cpu", "--compile", "--save-probabilities", "--no-postprocess",
        "--file-ending", ".nrrd"))
    assert config == InferConfig(folds=[0, 2], checkpoint="best", step=0.25, tile_batch=2, mirror_axes=(1, 2),
                                 amp="off", device="cpu", compile=True, save_probabilities=True, postprocess=False,
                                 file_ending=".nrrd")
    # the spellings of earlier versions still work
    assert predict_config(_predict_args("--no-mirror")).mirror_axes == "none"
    assert predict_config(_predict_args("--postprocess")).postprocess is True
    assert predict_config(_predict_args("--folds", "all")).folds == "all"
    onnx = predict_config(_predict_args("--onnx-model", "a.onnx", "b.onnx"))
    assert onnx.onnx_files == ["a.onnx", "b.onnx"] and onnx.resolved_backend() == "onnxruntime"
    assert predict_config(_predict_args("--backend", "onnxruntime")).resolved_backend() == "onnxruntime"


@pytest.mark.parametrize("flags, words", [
    (["--step", "0"], "argument --step: step=0.0"), (["--tile-batch", "0"], "argument --tile-batch: tile_batch=0"),
    (["--device", "gpu"], "argument --device: device='gpu'"), (["--folds", "-1"], "argument --folds: folds: '-1'"),
    (["--mirror-axes", "some"], "argument --mirror-axes: mirror_axes='some'"),
    (["--file-ending", ".png"], "argument --file-ending: file_ending='.png'"),
    (["--backend", "torch", "--onnx-model", "a.onnx"], "--onnx-model runs ONNX files with onnxruntime"),
])
def test_a_bad_flag_is_named(flags: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        predict_config(_predict_args(*flags))
    assert words in str(caught.value)


# ----- the config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, words", [
    ({"step": 1.5}, "step=1.5"), ({"tile_batch": 2.0}, "tile_batch=2.0"), ({"amp": "half"}, "amp='half'"),
    ({"checkpoint": "last"}, "checkpoint='last'"), ({"backend": "tensorrt"}, "backend='tensorrt'"),
    ({"mirror_axes": ("x",)}, "mirror_axes: 'x'"), ({"folds": []}, "folds is empty"),
    ({"postprocess": "force"}, "postprocess='force'"), ({"compile": "yes"}, "compile='yes'"),
])
def test_bad_values_name_the_option(changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        InferConfig(**changes)
    with pytest.raises(ConfigError, match="did you mean 'tile_batch'"):
        InferConfig().replace(tile_batches=2)


def test_keyword_spellings_of_the_python_api() -> None:
    assert InferConfig(mirror_axes=None).mirror_axes == "none" and InferConfig(mirror_axes=[0, 2]).mirror_axes == (0, 2)
    assert InferConfig(amp=False).amp == "off" and InferConfig(amp=None).amp == InferConfig(amp=True).amp == "auto"
    assert InferConfig(folds=0).folds == [0] and InferConfig(folds=(1, "all")).folds == [1, "all"]
    assert InferConfig(device=torch.device("cpu")).device == "cpu"
    assert infer_config(["step=0.25", "mirror_axes=0,1", "folds=none"]) == InferConfig(step=0.25, mirror_axes=(0, 1))
    assert infer_config([], InferConfig(tile_batch=2)).to_dict() == InferConfig(tile_batch=2).to_dict()


def test_mirror_axes_and_precision_resolve_for_the_plan_and_device() -> None:
    plan = tiny_plan()
    assert InferConfig().resolved_mirror_axes(plan) == (0, 1, 2)
    plan.inference_mirror_axes = [0, 2]  # the axes the model was trained to be mirror-invariant along
    assert InferConfig().resolved_mirror_axes(plan) == (0, 2) and InferConfig(mirror_axes=(1,)).resolved_mirror_axes(
        plan) == (1,)
    assert InferConfig(mirror_axes="none").resolved_mirror_axes(plan) == ()
    with pytest.raises(ConfigError, match=r"mirror axes \[5\] do not exist"):
        InferConfig(mirror_axes=(5,)).resolved_mirror_axes(plan)
    tiling = InferConfig(step=0.25, tile_batch=3, amp="bf16").tiling(plan, "cpu")
    assert tiling == Tiling(0.25, 3, (0, 2), torch.bfloat16)
    assert InferConfig().tiling(plan, "cpu").amp_dtype is None  # auto: float32 on a CPU
    with pytest.raises(ConfigError, match="amp=fp16 needs a CUDA device"):
        InferConfig(amp="fp16").tiling(plan, "cpu")


def test_the_predictor_takes_the_config(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path / "work", tiny_plan())
    config = InferConfig(folds=[0], device="cpu", step=0.75, tile_batch=2, mirror_axes=(1,))
    predictor = Predictor.from_workdir(workdir, config)
    assert predictor.config == config and predictor.tiling == Tiling(0.75, 2, (1,), None)
    # the documented keyword form is the same config
    assert Predictor.from_workdir(workdir, folds=[0], device="cpu", step=0.75, tile_batch=2,
                                  mirror_axes=(1,)).config == config
    with pytest.raises(TypeError, match="InferConfig"):
        Predictor.from_workdir(workdir, [0])


# ----- the patch is the plan's, and the functions take few parameters -------------------------------------------
def test_full_validation_reads_the_patch_from_the_plan_only() -> None:
    assert "patch_size" not in inspect.signature(full_validation).parameters


@pytest.mark.parametrize("function", [sliding_window_inference, full_validation, Predictor.from_workdir,
                                      Predictor.__init__, Predictor.predict_files])
def test_inference_functions_take_at_most_eight_parameters(function) -> None:
    names = [n for n in inspect.signature(function).parameters if n not in ("self", "cls")]
    assert len(names) <= 8, names


# ----- mixed precision: one resolution ------------------------------------------------------------------------
def test_mixed_precision_is_resolved_in_one_function() -> None:
    assert setup.resolve_amp is resolve_amp  # training's is the same function as inference's
    assert resolve_amp("auto", torch.device("cpu")) is None and resolve_amp("bf16", torch.device("cpu")) == \
        torch.bfloat16
    with pytest.raises(ConfigError, match="loop.amp=fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))
    deciding = [path.relative_to(ROOT).as_posix() for path in (ROOT / "voxseg").rglob("*.py")
                if "is_bf16_supported" in path.read_text(encoding="utf-8")]
    assert deciding == ["voxseg/devices.py"]


# ----- the one home of the tiling defaults --------------------------------------------------------------------
# names a tile step or tile batch goes by, alone or with a default_ prefix; not step_size, not LOWRES_SPACING_STEP
_SETTING = re.compile(r"^_*(default_)?(tile_step|step|tile_batch|tiles_per_(batch|forward|pass))$", re.I)


def _number(node: ast.AST) -> bool:
    """A number written in the source: 0.5, -1, 1 / 2, (4)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _number(node.operand)
    if isinstance(node, ast.BinOp):
        return _number(node.left) and _number(node.right)
    return False


def _default_of_field(value: ast.AST) -> bool:
    """`field(default=0.5)` / `dataclasses.field(default=4, ...)`."""
    return isinstance(value, ast.Call) and any(kw.arg == "default" and _number(kw.value) for kw in value.keywords)


def _parameter_defaults(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
    args = node.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults) if default is not None]
    for arg, default in pairs:
        if _SETTING.match(arg.arg) and _number(default):
            yield f"parameter {arg.arg}={ast.unparse(default)}"


def _call_defaults(node: ast.Call):
    for keyword in node.keywords:
        if keyword.arg and _SETTING.match(keyword.arg) and _number(keyword.value):
            yield f"{keyword.arg}={ast.unparse(keyword.value)} passed as a number"
    flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if any(_SETTING.match(flag.lstrip("-").replace("-", "_")) for flag in flags):  # argparse: --step, --tile-batch
        for keyword in node.keywords:
            if keyword.arg == "default" and _number(keyword.value):
                yield f"{flags[0]} default={ast.unparse(keyword.value)}"


def tiling_defaults(source: str) -> list[str]:
    """Every place `source` writes a number as a tile step's or tile batch's default or value: parameters,
    dataclass fields, module constants, keyword arguments, argparse defaults, dict entries."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += list(_parameter_defaults(node))
        elif isinstance(node, ast.Call):
            found += list(_call_defaults(node))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            if _SETTING.match(node.target.id) and (_number(node.value) or _default_of_field(node.value)):
                found.append(f"{node.target.id} = {ast.unparse(node.value)}")
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            found += [f"{name} = {ast.unparse(node.value)}" for name in names
                      if _SETTING.match(name) and _number(node.value)]
        elif isinstance(node, ast.Dict):
            found += [f"'{key.value}': {ast.unparse(value)}" for key, value in zip(node.keys, node.values)
                      if isinstance(key, ast.Constant) and isinstance(key.value, str) and _SETTING.match(key.value)
                      and _number(value)]
    return found


def test_the_guard_finds_the_ways_a_default_is_written() -> None:
    written = '''
STEP = 0.5
DEFAULT_TILE_BATCH: int = 4
def predict(image, step: float = 1 / 2, *, tile_batch=4): ...
@dataclass
class Settings:
    step: float = field(default=0.5)
run(image, step=0.5)
parser.add_argument("--tile-batch", type=int, default=4)
options = {"step": 0.5}
'''
    assert len(tiling_defaults(written)) == 8
    unrelated = '''
LOWRES_SPACING_STEP = 1.03
def schedule(step_size: int = 100, step: float | None = None, tile_batch=config.tile_batch): ...
range(0, 10, 2)
'''
    assert tiling_defaults(unrelated) == []


def test_tile_step_and_tile_batch_defaults_live_only_in_infer_config() -> None:
    elsewhere = {path.relative_to(ROOT).as_posix(): found for path in sorted((ROOT / "voxseg").rglob("*.py"))
                 if path != HOME and (found := tiling_defaults(path.read_text(encoding="utf-8")))}
    assert elsewhere == {}, "take the default from voxseg.infer.config.InferConfig instead"
    # and there, each once: the fields
    assert sorted(tiling_defaults(HOME.read_text(encoding="utf-8"))) == ["step = 0.5", "tile_batch = 4"]


def test_the_inference_docs_list_every_field_with_its_default() -> None:
    text = (ROOT / "docs" / "INFERENCE.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    for item in FIELDS:
        default = item.default if item.default_factory is dataclasses.MISSING else item.default_factory()
        row = next((r for r in rows if f"| `{item.name}` |" in r), None)
        assert row is not None and f"`{as_text(default)}`" in row, item.name
