"""The bad-input matrix as a whole: a catalogue of bad inputs run through the CLI (check, plan, preprocess, train,
predict, evaluate, export, install). Each kind must exit non-zero (zero where it is only a warning) with a
message naming the file or option, without a Python traceback, and leave no half-written output.

The single refusals are tested where they are implemented (test_refusal_messages, test_check, test_install,
test_evaluate_refusals, test_channel_geometry, test_cli, ...); this module runs them all together, through the
command line, so a refusal that is lost between a library function and the CLI shows up here.
Run: python -m pytest -q -m slow tests/test_bad_input_matrix.py
"""
from __future__ import annotations

import argparse
import contextlib
import io
import hashlib
import json
import os
import shutil
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from voxseg.cli import main
from voxseg.data.io import Geometry, read_image, write_image
from tests.test_predictor import make_workdir, tiny_plan

pytestmark = pytest.mark.slow

SHAPE = "16,16,16"
LABELS = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
PLAN_TINY = ["--set", "patch_size=16,16,16", "--set", "batch_size=2", "--set", "network.features=4,8,8"]
CPU = ["--device", "cpu"]


@dataclass
class World:
    root: Path
    dataset: Path  # a good raw dataset (synth), 4 channels
    work: Path  # a planned (not preprocessed) work dir of it
    model: Path  # a model folder with fold 0 (untrained weights) for the same channels and labels
    archive: Path  # that model exported as an archive


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("matrix")
    dataset, work = root / "Dataset001_Bad", root / "work"
    for argv in (["synth", dataset, "--cases", 3, "--test-cases", 2, "--shape", SHAPE],
                 ["plan", dataset, "-o", work, "--folds", 2, *PLAN_TINY], ["preprocess", work, "--quiet", *CPU]):
        code, out, err = _run(argv)
        assert code == 0, err
    model = make_workdir(root / "model", tiny_plan(labels=LABELS, channels=4))
    archive = root / "model.zip"
    code, _, err = _run(["export", model, "--archive", archive, "--folds", "0"])
    assert code == 0, err
    return World(root, dataset, work, model, archive)


def _run(argv: list) -> tuple[int, str, str]:
    """main() in process; an exception escaping it is a traceback the user would see."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - reported as the traceback a user would get
            code = 1
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


# ----- building bad inputs -----------------------------------------------------------------------------------
def _copy_dataset(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.dataset, tmp / "ds"))


def _first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


def _rewrite(path: Path, change: Callable[[np.ndarray, Geometry], tuple[np.ndarray, Geometry]]) -> Path:
    if getattr(change, "whole_file", False):
        change(path)
        return path
    array, geometry = read_image(path)
    write_image(path, *change(array, geometry))
    return path


def _affine(geometry: Geometry, edit: Callable[[np.ndarray], None]) -> Geometry:
    affine = geometry.affine.copy()
    edit(affine)
    return Geometry(affine)


def _flip(a, g):
    return a, _affine(g, lambda m: m.__setitem__((slice(0, 3), 2), -m[:3, 2]))


def _shift(a, g):
    return a, _affine(g, lambda m: m.__setitem__((0, 3), m[0, 3] + 25.0))


def _spacing(value: float):
    return lambda a, g: (a, Geometry.from_spacing((value, value, value)))


def _zero_spacing(path: Path) -> None:
    """A NIfTI file whose affine has a zero column (nibabel cannot write one through the usual header update)."""
    import nibabel as nib

    image = nib.load(str(path))
    affine = image.affine.copy()
    affine[:3, 1] = 0.0
    header = image.header.copy()
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header=header), str(path))


_zero_spacing.whole_file = True  # type: ignore[attr-defined]


def _nan(a, g):
    a = a.astype(np.float32)
    a[2, 3, 4] = np.nan
    return a, g


def _value(value: float, dtype=np.float32):
    def change(a, g):
        a = a.astype(dtype)
        a[1, 1, 1] = value
        return a, g
    return change


def _dataset_with(change, pattern: str = "imagesTr/*_0001.nii.gz"):
    """A copy of the dataset with the first file matching `pattern` changed (every file, for a '*Tr/' pattern)."""
    def build(w: World, tmp: Path) -> Path:
        ds = _copy_dataset(w, tmp)
        for path in (sorted(ds.glob(pattern)) if pattern.startswith("*") else [_first(ds, pattern)]):
            _rewrite(path, change)
        return ds
    return build


def _inputs_with(change, channel: int = 1):
    """A copy of imagesTs whose first case's channel `channel` is changed."""
    def build(w: World, tmp: Path) -> Path:
        folder = Path(shutil.copytree(w.dataset / "imagesTs", tmp / "in"))
        _rewrite(_first(folder, f"*_{channel:04d}.nii.gz"), change)
        return folder
    return build


def _predictions(w: World, tmp: Path, change=None, extra: bool = False, drop: bool = False) -> Path:
    """Predictions for labelsTs (the references themselves), one of them changed."""
    preds = Path(shutil.copytree(w.dataset / "labelsTs", tmp / "preds"))
    victim = _first(preds, "*.nii.gz")
    if change is not None:
        _rewrite(victim, change)
    if extra:
        shutil.copy(victim, preds / "NOT_A_CASE.nii.gz")
    if drop:
        victim.unlink()
    return preds


def _text(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _pickled(tmp: Path) -> Path:
    path = tmp / "foreign.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)
    return path


def _model_with_checkpoint(w: World, tmp: Path, make: Callable[[Path], None]) -> Path:
    model = Path(shutil.copytree(w.model, tmp / "model"))
    make(model / "training" / "fold_0" / "checkpoint_final.pt")
    return model


def _zip_with(w: World, tmp: Path, name: str, data: bytes, add: bool = False, relist: bool = False) -> Path:
    """The archive with member `name` replaced by `data` (or added); `relist` also updates its manifest entry,
    so only what the member holds is wrong."""
    out = tmp / "bad.zip"
    with zipfile.ZipFile(w.archive) as old, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
        manifest = json.loads(old.read("voxseg_archive.json"))
        if relist:
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for info in old.infolist():
            if info.filename == "voxseg_archive.json":
                new.writestr(info.filename, json.dumps(manifest))
            else:
                new.writestr(info.filename, data if info.filename == name else old.read(info))
        if add:
            new.writestr(name, data)
    return out


def _truncated(w: World, tmp: Path) -> Path:
    out = tmp / "truncated.zip"
    data = w.archive.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def _onnx_tampered(w: World, tmp: Path) -> Path:
    model = Path(shutil.copytree(w.model, tmp / "model"))
    code, _, err = _run(["export", model, "--onnx", model / "training/fold_0/model.onnx", "--folds", "0"])
    assert code == 0, err
    onnx_file = model / "training/fold_0/model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    return model


def _traversal(w: World, tmp: Path) -> Path:
    return _zip_with(w, tmp, "../escaped.json", b"{}", add=True)


def _pickled_member(w: World, tmp: Path) -> Path:
    buffer = io.BytesIO()
    torch.save({"model": argparse.Namespace(a=1)}, buffer)
    return _zip_with(w, tmp, "training/fold_0/checkpoint_final.pt", buffer.getvalue(), relist=True)


def _installed(w: World, tmp: Path) -> Path:
    code, _, err = _run(["install", w.archive, tmp / "target"])
    assert code == 0, err
    return w.archive


def _drop(ds: Path, pattern: str) -> Path:
    _first(ds, pattern).unlink()
    return ds


def _cut(ds: Path, pattern: str) -> Path:
    victim = _first(ds, pattern)
    victim.write_bytes(victim.read_bytes()[:200])
    return ds


def _broken_json(ds: Path) -> Path:
    (ds / "dataset.json").write_text('{"labels": {"background": 0,')
    return ds


def _all_background(ds: Path) -> Path:
    for path in ds.glob("labels*/*.nii.gz"):
        _rewrite(path, lambda a, g: (np.zeros_like(a), g))
    return ds


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


_empty_file.whole_file = True  # type: ignore[attr-defined]


def _without_manifest(w: World, tmp: Path) -> Path:
    out = tmp / "bare.zip"
    with zipfile.ZipFile(w.archive) as old, zipfile.ZipFile(out, "w") as new:
        for name in old.namelist():
            if name != "voxseg_archive.json":
                new.writestr(name, old.read(name))
    return out


def _touch(tmp: Path, name: str) -> Path:
    _text(tmp, name, "a file")
    return tmp


def _broken_plans(w: World, tmp: Path) -> Path:
    work = Path(shutil.copytree(w.work, tmp / "work"))
    (work / "plans.json").write_text('{"dataset_name": ')
    return work


# ----- the catalogue -----------------------------------------------------------------------------------------
@dataclass
class Kind:
    name: str
    argv: Callable[[World, Path], list]
    words: tuple[str, ...]  # each must appear in stderr (the error or the warning)
    warning: bool = False  # exit 0 with a warning instead of an error
    absent: tuple[str, ...] = ()  # paths (relative to the kind's folder) that must not exist afterwards


def _ds(change, pattern="imagesTr/*_0001.nii.gz"):
    build = _dataset_with(change, pattern)
    return lambda w, t: ["check", build(w, t)]


def _plan(*options):
    return lambda w, t: ["plan", w.dataset, "-o", t / "work", "--folds", "2", *PLAN_TINY, *options]


def _predict(*options, inputs=None, model=None):
    def argv(w: World, t: Path) -> list:
        folder = inputs(w, t) if inputs else w.dataset / "imagesTs"
        return ["predict", "-m", model(w, t) if model else w.model, "-i", folder, "-o", t / "out", *CPU, *options]
    return argv


def _evaluate(*options, **change):
    return lambda w, t: ["evaluate", _predictions(w, t, **change), w.dataset / "labelsTs", "--dataset-json",
                         w.dataset / "dataset.json", *options]


def _train(*options):
    return lambda w, t: ["train", w.work, "--fold", "0", *CPU, "--epochs", "1", *options]


NO_OUT = ("out",)
NO_PLAN = ("work/plans.json", "work/fingerprint.json")
KINDS = [
    # check: the raw dataset
    Kind("check: missing dataset folder", lambda w, t: ["check", t / "nothing"], ("nothing",)),
    Kind("check: channel 1 x-flipped", _ds(_flip), ("_0001.nii.gz", "direction")),
    Kind("check: channel 1 origin shifted 25 mm", _ds(_shift), ("_0001.nii.gz", "origin")),
    Kind("check: zero spacing", _ds(_zero_spacing), ("_0001.nii.gz", "spacing is zero")),
    Kind("check: spacing 1e6 mm", _ds(_spacing(1e6), "*Tr/SYN_000*.nii.gz"), ("SYN_000", "spacing"), warning=True),
    Kind("check: spacing 1e-6 mm", _ds(_spacing(1e-6), "*Tr/SYN_000*.nii.gz"), ("SYN_000", "spacing"), warning=True),
    Kind("check: NaN voxels in an image", _ds(_nan), ("_0001.nii.gz", "NaN")),
    Kind("check: undeclared label value 7", _ds(_value(7, np.uint8), "labelsTr/*.nii.gz"), ("7",)),
    Kind("check: float label values", _ds(_value(0.5), "labelsTr/*.nii.gz"), ("labelsTr",)),
    Kind("check: label map missing", lambda w, t: ["check", _drop(_copy_dataset(w, t), "labelsTr/*.nii.gz")],
         ("labelsTr",)),
    Kind("check: channel file missing", lambda w, t: ["check", _drop(_copy_dataset(w, t), "imagesTr/*_0002.nii.gz")],
         ("_0002",)),
    Kind("check: truncated image", lambda w, t: ["check", _cut(_copy_dataset(w, t), "imagesTr/*_0000.nii.gz")],
         ("_0000.nii.gz",)),
    Kind("check: label shape differs from the image", _ds(lambda a, g: (a[:-2], g), "labelsTr/*.nii.gz"),
         ("shape",)),
    Kind("check: dataset.json not JSON", lambda w, t: ["check", _broken_json(_copy_dataset(w, t))],
         ("dataset.json",)),
    Kind("check: labels all background", lambda w, t: ["check", _all_background(_copy_dataset(w, t))],
         ("labelsTr", "background (0) only")),
    # plan
    Kind("plan: --folds 0", _plan("--folds", "0"), ("--folds",), absent=NO_PLAN),
    Kind("plan: --folds 100", _plan("--folds", "100"), ("--folds",), absent=NO_PLAN),
    Kind("plan: --val-fraction 1.5", _plan("--val-fraction", "1.5"), ("--val-fraction",), absent=NO_PLAN),
    Kind("plan: --gpu-memory -1", _plan("--gpu-memory", "-1"), ("--gpu-memory)",), absent=NO_PLAN),
    Kind("plan: -o is an existing file", lambda w, t: _plan()(w, _touch(t, "work")), ("work",)),
    Kind("plan: a dataset with a missing channel",
         lambda w, t: ["plan", _drop(_copy_dataset(w, t), "imagesTr/*_0002.nii.gz"), "-o", t / "work", *PLAN_TINY],
         ("_0002",), absent=NO_PLAN),
    Kind("plan: unknown --set key", _plan("--set", "patch_sise=16,16,16"), ("patch_sise",), absent=NO_PLAN),
    # preprocess
    Kind("preprocess: not a work dir", lambda w, t: ["preprocess", t / "nowork", *CPU], ("nowork",)),
    Kind("preprocess: plans.json not JSON",
         lambda w, t: ["preprocess", _broken_plans(w, t), *CPU], ("plans.json",)),
    # train
    Kind("train: --fold out of range", _train("--fold", "7"), ("fold 7",)),
    Kind("train: --pretrained text file", lambda w, t: _train("--pretrained", _text(t, "notes.pt", "notes\n"))(w, t),
         ("notes.pt",)),
    Kind("train: --pretrained git-lfs pointer",
         lambda w, t: _train("--pretrained", _text(t, "lfs.pt", "version https://git-lfs.github.com/spec/v1\n"
                                                  "oid sha256:4d7a\nsize 12\n"))(w, t), ("lfs.pt", "git lfs")),
    Kind("train: --pretrained pickled code", lambda w, t: _train("--pretrained", _pickled(t))(w, t),
         ("foreign.pt", "argparse.Namespace")),
    Kind("train: --pretrained missing file", lambda w, t: _train("--pretrained", t / "none.pt")(w, t), ("none.pt",)),
    # predict
    Kind("predict: --step 0", _predict("--step", "0"), ("step",), absent=NO_OUT),
    Kind("predict: --step 5", _predict("--step", "5"), ("step",), absent=NO_OUT),
    Kind("predict: --tile-batch 0", _predict("--tile-batch", "0"), ("tile",), absent=NO_OUT),
    Kind("predict: -o is an existing file", lambda w, t: _predict()(w, _touch(t, "out")), ("out",)),
    Kind("predict: channel 1 x-flipped", _predict(inputs=_inputs_with(_flip)), ("_0001.nii.gz", "direction")),
    Kind("predict: channel 1 origin shifted", _predict(inputs=_inputs_with(_shift)), ("_0001.nii.gz", "origin")),
    Kind("predict: zero spacing", _predict(inputs=_inputs_with(_zero_spacing)), ("_0001.nii.gz", "spacing is zero")),
    Kind("predict: a channel file missing",
         _predict(inputs=lambda w, t: _drop(Path(shutil.copytree(w.dataset / "imagesTs", t / "in")), "*_0003.nii.gz")),
         ("_0003",)),
    Kind("predict: model without checkpoint",
         _predict(model=lambda w, t: _model_with_checkpoint(w, t, lambda p: p.unlink())), ("checkpoint_final.pt",),
         absent=NO_OUT),
    Kind("predict: checkpoint is a text file",
         _predict(model=lambda w, t: _model_with_checkpoint(w, t, lambda p: p.write_text("notes\n"))),
         ("checkpoint_final.pt",), absent=NO_OUT),
    Kind("predict: pickled checkpoint",
         _predict(model=lambda w, t: _model_with_checkpoint(
             w, t, lambda p: torch.save({"model": argparse.Namespace(a=1)}, p))), ("checkpoint_final.pt",),
         absent=NO_OUT),
    Kind("predict: tampered ONNX file", _predict("--backend", "onnxruntime", model=_onnx_tampered),
         ("model.onnx", "SHA-256"), absent=NO_OUT),
    Kind("predict: no model folder", _predict(model=lambda w, t: t / "nomodel"), ("nomodel",), absent=NO_OUT),
    Kind("predict: NaN voxels in an input", _predict(inputs=_inputs_with(_nan)), ("channel 1", "NaN")),
    Kind("predict: a fold that was not trained", _predict("--folds", "3"), ("fold_3",), absent=NO_OUT),
    Kind("predict: --folds -1", _predict("--folds", "-1"), ("--folds",), absent=NO_OUT),
    Kind("predict: empty input folder", _predict(inputs=lambda w, t: _mkdir(t / "in")), ("in",), absent=NO_OUT),
    Kind("predict: --mirror-axes 5", _predict("--mirror-axes", "5"), ("mirror",), absent=NO_OUT),
    # evaluate
    Kind("evaluate: float prediction", _evaluate(change=_value(0.5)), ("preds",)),
    Kind("evaluate: NaN in a prediction", _evaluate(change=_nan), ("preds",)),
    Kind("evaluate: prediction without reference", _evaluate(extra=True), ("NOT_A_CASE", "--allow-missing")),
    Kind("evaluate: reference without prediction", _evaluate(drop=True), ("--allow-missing",)),
    Kind("evaluate: --tolerance -1", _evaluate("--tolerance", "-1"), ("--tolerance",)),
    Kind("evaluate: undeclared label value", _evaluate(change=_value(7, np.uint8)), ("7", "--allow-undeclared-labels")),
    Kind("evaluate: prediction on another grid", _evaluate(change=lambda a, g: (a[:-1], g)), ("shape",)),
    Kind("evaluate: --convention unknown", _evaluate("--convention", "itk"), ("--convention",)),
    Kind("evaluate: reference folder missing",
         lambda w, t: ["evaluate", _predictions(w, t), t / "norefs", "--dataset-json", w.dataset / "dataset.json"],
         ("norefs",)),
    Kind("evaluate: dataset.json without labels",
         lambda w, t: ["evaluate", _predictions(w, t), w.dataset / "labelsTs", "--dataset-json",
                       _text(t, "meta.json", "{}")], ("meta.json", "labels")),
    Kind("evaluate: an empty (0-byte) prediction", _evaluate(change=_empty_file), ("0 bytes",)),
    # export
    Kind("export: neither --onnx nor --archive", lambda w, t: ["export", w.model], ("--onnx",)),
    Kind("export: a fold that was not trained",
         lambda w, t: ["export", w.model, "--archive", t / "m.zip", "--folds", "3"], ("3",), absent=("m.zip",)),
    # install
    Kind("install: missing archive", lambda w, t: ["install", t / "none.zip", t / "target"], ("none.zip",),
         absent=("target",)),
    Kind("install: not a zip", lambda w, t: ["install", _text(t, "m.zip", "text"), t / "target"], ("m.zip",),
         absent=("target",)),
    Kind("install: truncated archive", lambda w, t: ["install", _truncated(w, t), t / "target"], ("truncated.zip",),
         absent=("target",)),
    Kind("install: path traversal member", lambda w, t: ["install", _traversal(w, t), t / "target"],
         ("../escaped.json",), absent=("target", "escaped.json")),
    Kind("install: tampered member",
         lambda w, t: ["install", _zip_with(w, t, "dataset.json", b'{"labels": {}}'), t / "target"],
         ("dataset.json", "SHA-256")),
    Kind("install: pickled checkpoint member", lambda w, t: ["install", _pickled_member(w, t), t / "target"],
         ("checkpoint_final.pt", "plain-weights"), absent=("target",)),
    Kind("install: no manifest",
         lambda w, t: ["install", _without_manifest(w, t), t / "target"], ("voxseg_archive.json",), absent=("target",)),
    Kind("install: member outside the manifest",
         lambda w, t: ["install", _zip_with(w, t, "training/fold_0/notes.json", b"{}", add=True), t / "target"],
         (), warning=True, absent=("target/training/fold_0/notes.json",)),
    Kind("export: --onnx with several folds",
         lambda w, t: ["export", w.model, "--onnx", t / "m.onnx", "--folds", "0,1"], ("--folds",), absent=("m.onnx",)),
    Kind("export: --onnx of fold 'all' never trained",
         lambda w, t: ["export", w.model, "--onnx", t / "m.onnx", "--folds", "all"], ("fold_all",), absent=("m.onnx",)),
    Kind("install: over an installed model", lambda w, t: ["install", _installed(w, t), t / "target"], ("--force",)),
]


TEMP_MARKS = (".tmp", "staging", ".partial")


def _leftover(path: Path) -> bool:
    """A file, or a folder holding any file."""
    return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))


def _problems(kind: Kind, world: World, folder: Path, report: list[str]) -> list[str]:
    folder.mkdir()
    argv = kind.argv(world, folder)
    code, out, err = _run(argv)
    shown = (err if code else out + err).strip().replace(str(folder), "TMP").replace(str(world.root), "ROOT")
    first = next((line for line in shown.splitlines() if line.strip()), "").replace("|", "\\|")
    report.append(f"| {kind.name} | {code} | {first[:200]} |")
    problems = []
    if "Traceback" in out + err:
        problems.append("traceback: " + err.strip().splitlines()[-1])
    elif kind.warning and code != 0:
        problems.append(f"exit {code} for a warning: {err.strip()[-300:]}")
    elif not kind.warning and code == 0:
        problems.append("exit 0: " + (out + err).strip()[-300:])
    missing = [word for word in kind.words if word not in (out + err if kind.warning else err)]
    if missing and not problems:
        problems.append(f"message lacks {missing}: {err.strip()[-400:]}")
    problems += [f"left {name}" for name in kind.absent if _leftover(folder / name)]
    problems += [f"temp file left: {p.relative_to(folder)}" for p in folder.rglob("*")
                 if any(mark in p.name for mark in TEMP_MARKS)]
    return problems


def test_the_bad_input_matrix(world: World, tmp_path: Path) -> None:
    assert len(KINDS) >= 40 and len({k.name for k in KINDS}) == len(KINDS)
    failed, report = {}, ["| kind | exit | message (first line) |", "|---|---|---|"]
    for index, kind in enumerate(KINDS):
        problems = _problems(kind, world, tmp_path / f"kind{index:02d}", report)
        if problems:
            failed[kind.name] = problems
    if os.environ.get("VOXSEG_MATRIX_REPORT"):  # a markdown table of every kind's exit code and message
        Path(os.environ["VOXSEG_MATRIX_REPORT"]).write_text("\n".join(report) + "\n")
    summary = "\n".join(f"{name}: {'; '.join(problems)}" for name, problems in failed.items())
    assert not failed, f"{len(failed)} of {len(KINDS)} kinds failed:\n{summary}"
