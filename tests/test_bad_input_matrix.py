"""The bad-input matrix as a whole: a catalogue of bad inputs run through the CLI (check, plan, preprocess, train,
predict, evaluate, export, install). Each kind must exit non-zero (zero where it is only a warning) with a
message naming the file or option, without a Python traceback, and leave no half-written output.

The single refusals are tested where they are implemented (test_refusal_messages, test_check, test_install,
test_evaluate_refusals, test_channel_geometry, test_cli, ...); this module runs them all together, through the
command line, so a refusal that is lost between a library function and the CLI shows up here.
Run: python -m pytest -q -m slow tests/test_bad_input_matrix.py
(VOXSEG_MATRIX_REPORT=FILE also writes a markdown table of every kind's exit code and message.)
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tests import bad_inputs as b
from tests.bad_inputs import World
from tests.test_predictor import make_workdir, tiny_plan

pytestmark = pytest.mark.slow

SHAPE = "16,16,16"
LABELS = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
PLAN_TINY = ["--set", "patch_size=16,16,16", "--set", "batch_size=2", "--set", "network.features=4,8,8"]
CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("matrix")
    dataset, work = root / "Dataset001_Bad", root / "work"
    for argv in (["synth", dataset, "--cases", 3, "--test-cases", 2, "--shape", SHAPE],
                 ["plan", dataset, "-o", work, "--folds", 2, *PLAN_TINY], ["preprocess", work, "--quiet", *CPU]):
        code, out, err = b.run(argv)
        assert code == 0, err
    model = make_workdir(root / "model", tiny_plan(labels=LABELS, channels=4))
    archive = root / "model.zip"
    code, _, err = b.run(["export", model, "--archive", archive, "--folds", "0"])
    assert code == 0, err
    return World(root, dataset, work, model, archive)


# ----- the catalogue -----------------------------------------------------------------------------------------
@dataclass
class Kind:
    name: str
    argv: Callable[[World, Path], list]
    words: tuple[str, ...]  # each must appear in stderr (the error or the warning)
    warning: bool = False  # exit 0 with a warning instead of an error
    absent: tuple[str, ...] = ()  # paths (relative to the kind's folder) that must not exist afterwards


def _ds(change, pattern="imagesTr/*_0001.nii.gz"):
    build = b.dataset_with(change, pattern)
    return lambda w, t: ["check", build(w, t)]


def _plan(*options):
    return lambda w, t: ["plan", w.dataset, "-o", t / "work", "--folds", "2", *PLAN_TINY, *options]


def _predict(*options, inputs=None, model=None):
    def argv(w: World, t: Path) -> list:
        folder = inputs(w, t) if inputs else w.dataset / "imagesTs"
        return ["predict", "-m", model(w, t) if model else w.model, "-i", folder, "-o", t / "out", *CPU, *options]
    return argv


def _evaluate(*options, **change):
    return lambda w, t: ["evaluate", b.predictions(w, t, **change), w.dataset / "labelsTs", "--dataset-json",
                         w.dataset / "dataset.json", *options]


def _train(*options):
    return lambda w, t: ["train", w.work, "--fold", "0", *CPU, "--epochs", "1", *options]


NO_OUT = ("out",)
NO_PLAN = ("work/plans.json", "work/fingerprint.json")
KINDS = [
    # check: the raw dataset
    Kind("check: missing dataset folder", lambda w, t: ["check", t / "nothing"], ("nothing",)),
    Kind("check: channel 1 x-flipped", _ds(b.flip), ("_0001.nii.gz", "direction")),
    Kind("check: channel 1 origin shifted 25 mm", _ds(b.shift), ("_0001.nii.gz", "origin")),
    Kind("check: zero spacing", _ds(b.zero_spacing), ("_0001.nii.gz", "spacing is zero")),
    Kind("check: spacing 1e6 mm", _ds(b.spacing(1e6), "*Tr/SYN_000*.nii.gz"), ("SYN_000", "spacing"), warning=True),
    Kind("check: spacing 1e-6 mm", _ds(b.spacing(1e-6), "*Tr/SYN_000*.nii.gz"), ("SYN_000", "spacing"), warning=True),
    Kind("check: NaN voxels in an image", _ds(b.nan), ("_0001.nii.gz", "NaN")),
    Kind("check: undeclared label value 7", _ds(b.value(7, np.uint8), "labelsTr/*.nii.gz"), ("7",)),
    Kind("check: float label values", _ds(b.value(0.5), "labelsTr/*.nii.gz"), ("labelsTr",)),
    Kind("check: label map missing", lambda w, t: ["check", b.drop(b.copy_dataset(w, t), "labelsTr/*.nii.gz")],
         ("labelsTr",)),
    Kind("check: channel file missing", lambda w, t: ["check", b.drop(b.copy_dataset(w, t), "imagesTr/*_0002.nii.gz")],
         ("_0002",)),
    Kind("check: truncated image", lambda w, t: ["check", b.cut(b.copy_dataset(w, t), "imagesTr/*_0000.nii.gz")],
         ("_0000.nii.gz",)),
    Kind("check: label shape differs from the image", _ds(lambda a, g: (a[:-2], g), "labelsTr/*.nii.gz"),
         ("shape",)),
    Kind("check: dataset.json not JSON", lambda w, t: ["check", b.broken_json(b.copy_dataset(w, t))],
         ("dataset.json",)),
    Kind("check: labels all background", lambda w, t: ["check", b.all_background(b.copy_dataset(w, t))],
         ("labelsTr", "background (0) only")),
    Kind("check: dataset.json names a channel twice",
         lambda w, t: ["check", b.duplicate_channel(b.copy_dataset(w, t))], ("dataset.json", "appears twice")),
    Kind("plan: dataset.json names a channel twice",
         lambda w, t: ["plan", b.duplicate_channel(b.copy_dataset(w, t)), "-o", t / "work", *PLAN_TINY],
         ("dataset.json", "appears twice"), absent=NO_PLAN),
    Kind("check: dataset.json nested 50000 deep",
         lambda w, t: ["check", b.dataset_json_text(b.copy_dataset(w, t), '{"a": ' * 50_000 + "1" + "}" * 50_000)],
         ("dataset.json", "nested")),
    Kind("check: dataset.json with a label name twice",
         lambda w, t: ["check", b.dataset_json_text(b.copy_dataset(w, t), (w.dataset / "dataset.json").read_text()
                                                    .replace('"labels": {', '"labels": {"edema": 5, ', 1))],
         ("dataset.json", "key 'edema' appears twice")),
    Kind("check: 201 label values", lambda w, t: ["check", b.many_labels(b.copy_dataset(w, t))],
         ("201 label values", "up to 127")),
    Kind("plan: 201 label values",
         lambda w, t: ["plan", b.many_labels(b.copy_dataset(w, t)), "-o", t / "work", *PLAN_TINY],
         ("201 label values",), absent=NO_PLAN),
    # plan
    Kind("plan: --folds 0", _plan("--folds", "0"), ("--folds",), absent=NO_PLAN),
    Kind("plan: --folds 100", _plan("--folds", "100"), ("--folds",), absent=NO_PLAN),
    Kind("plan: --val-fraction 1.5", _plan("--val-fraction", "1.5"), ("--val-fraction",), absent=NO_PLAN),
    Kind("plan: --gpu-memory -1", _plan("--gpu-memory", "-1"), ("--gpu-memory)",), absent=NO_PLAN),
    Kind("plan: -o is an existing file", lambda w, t: _plan()(w, b.touch(t, "work")), ("work",)),
    Kind("plan: a dataset with a missing channel",
         lambda w, t: ["plan", b.drop(b.copy_dataset(w, t), "imagesTr/*_0002.nii.gz"), "-o", t / "work", *PLAN_TINY],
         ("_0002",), absent=NO_PLAN),
    Kind("plan: unknown --set key", _plan("--set", "patch_sise=16,16,16"), ("patch_sise",), absent=NO_PLAN),
    # preprocess
    Kind("preprocess: not a work dir", lambda w, t: ["preprocess", t / "nowork", *CPU], ("nowork",)),
    Kind("preprocess: plans.json not JSON",
         lambda w, t: ["preprocess", b.broken_plans(w, t), *CPU], ("plans.json",)),
    Kind("preprocess: plans.json nested 50000 deep",
         lambda w, t: ["preprocess", b.plans_edited(w, t, text='{"a": ' * 50_000 + "1" + "}" * 50_000), *CPU],
         ("plans.json", "nested")),
    Kind("preprocess: NaN target spacing",
         lambda w, t: ["preprocess", b.plans_edited(w, t, lambda d: d["target_spacing"].__setitem__(1, float("nan"))),
                       *CPU], ("plans.json", "target_spacing[1] is NaN")),
    Kind("preprocess: patch size given as text",
         lambda w, t: ["preprocess", b.plans_edited(w, t, lambda d: d.__setitem__("patch_size", "16")), *CPU],
         ("plans.json", "patch_size is '16'")),
    Kind("preprocess: plans.json is a list", lambda w, t: ["preprocess", b.plans_edited(w, t, text="[]"), *CPU],
         ("plans.json", "not a plan")),
    Kind("preprocess: infinite normalisation mean",
         lambda w, t: ["preprocess", b.plans_edited(w, t, lambda d: d["normalization"][0].__setitem__(
             "mean", float("inf"))), *CPU], ("plans.json", "mean is inf")),
    Kind("preprocess: batch size true",
         lambda w, t: ["preprocess", b.plans_edited(w, t, lambda d: d.__setitem__("batch_size", True)), *CPU],
         ("plans.json", "batch_size is True")),
    Kind("preprocess: plans.json with a key twice",
         lambda w, t: ["preprocess", b.plans_edited(w, t, text=(w.work / "plans.json").read_text().replace(
             '"batch_size"', '"batch_size": 3, "batch_size"', 1)), *CPU], ("plans.json", "'batch_size' appears twice")),
    # train
    Kind("train: a patch of 4096^3 in plans.json",
         lambda w, t: ["train", b.plans_edited(w, t, lambda d: d.__setitem__("patch_size", [4096] * 3)), "--fold",
                       "0", *CPU, "--epochs", "1"], ("training step needs about", "plan.patch_size"),
         absent=("work/training",)),
    Kind("train: a batch of 100000 in plans.json",
         lambda w, t: ["train", b.plans_edited(w, t, lambda d: d.__setitem__("batch_size", 100_000)), "--fold",
                       "0", *CPU, "--epochs", "1"], ("training step needs about", "batch 100000"),
         absent=("work/training",)),
    Kind("train: network features of 100000 in plans.json",
         lambda w, t: ["train", b.plans_edited(w, t, lambda d: d["network"].__setitem__(
             "features", [100_000] * len(d["network"]["features"]))), "--fold", "0", *CPU, "--epochs", "1"],
         ("training step needs about", "features [100000"), absent=("work/training",)),
    Kind("train: plan override of a 2048^3 patch", _train("--set", "plan.patch_size=2048,2048,2048"),
         ("training step needs about", "[2048, 2048, 2048]")),
    Kind("train: the fold is being trained by another process",
         lambda w, t: ["train", b.held(b.work_copy(w, t) / "training" / "fold_0").parent.parent, "--fold", "0", *CPU,
                       "--epochs", "1"], ("is in use", "process 4242 on elsewhere"), absent=("work/training/fold_0",)),
    Kind("preprocess: the case store is in use",
         lambda w, t: ["preprocess", b.held(b.work_copy(w, t) / "preprocessed").parent, *CPU],
         ("is in use", "preprocessing into this case store")),
    # what the operating system refuses (/sys cannot be written, even by root): one line, the path and the cause
    Kind("synth: into a folder that cannot be written", lambda w, t: ["synth", "/sys/voxseg_matrix/ds"],
         ("/sys/voxseg_matrix",)),
    Kind("plan: -o in a folder that cannot be written", lambda w, t: ["plan", w.dataset, "-o", "/sys/voxseg_matrix",
                                                                      "--folds", "2", *PLAN_TINY],
         ("/sys/voxseg_matrix",)),
    Kind("predict: -o in a folder that cannot be written",
         lambda w, t: ["predict", "-m", w.model, "-i", w.dataset / "imagesTs", "-o", "/sys/voxseg_matrix", *CPU],
         ("/sys/voxseg_matrix",)),
    Kind("export: --archive in a folder that cannot be written",
         lambda w, t: ["export", w.model, "--archive", "/sys/voxseg_matrix/m.zip"], ("/sys/voxseg_matrix",)),
    Kind("train: --fold out of range", _train("--fold", "7"), ("fold 7",)),
    Kind("train: --pretrained text file", lambda w, t: _train("--pretrained", b.text(t, "notes.pt", "notes\n"))(w, t),
         ("notes.pt",)),
    Kind("train: --pretrained git-lfs pointer",
         lambda w, t: _train("--pretrained", b.text(t, "lfs.pt", "version https://git-lfs.github.com/spec/v1\n"
                                                  "oid sha256:4d7a\nsize 12\n"))(w, t), ("lfs.pt", "git lfs")),
    Kind("train: --pretrained pickled code", lambda w, t: _train("--pretrained", b.pickled(t))(w, t),
         ("foreign.pt", "argparse.Namespace")),
    Kind("train: --pretrained missing file", lambda w, t: _train("--pretrained", t / "none.pt")(w, t), ("none.pt",)),
    # predict
    Kind("predict: --step 0", _predict("--step", "0"), ("step",), absent=NO_OUT),
    Kind("predict: --step 5", _predict("--step", "5"), ("step",), absent=NO_OUT),
    Kind("predict: --tile-batch 0", _predict("--tile-batch", "0"), ("tile",), absent=NO_OUT),
    Kind("predict: -o is an existing file", lambda w, t: _predict()(w, b.touch(t, "out")), ("out",)),
    Kind("predict: channel 1 x-flipped", _predict(inputs=b.inputs_with(b.flip)), ("_0001.nii.gz", "direction")),
    Kind("predict: channel 1 origin shifted", _predict(inputs=b.inputs_with(b.shift)), ("_0001.nii.gz", "origin")),
    Kind("predict: zero spacing", _predict(inputs=b.inputs_with(b.zero_spacing)), ("_0001.nii.gz", "spacing is zero")),
    Kind("predict: a channel file missing",
         _predict(inputs=lambda w, t: b.drop(Path(shutil.copytree(w.dataset / "imagesTs", t / "in")), "*_0003.nii.gz")),
         ("_0003",)),
    Kind("predict: model without checkpoint",
         _predict(model=lambda w, t: b.model_with_checkpoint(w, t, lambda p: p.unlink())), ("checkpoint_final.pt",),
         absent=NO_OUT),
    Kind("predict: checkpoint is a text file",
         _predict(model=lambda w, t: b.model_with_checkpoint(w, t, lambda p: p.write_text("notes\n"))),
         ("checkpoint_final.pt",), absent=NO_OUT),
    Kind("predict: pickled checkpoint",
         _predict(model=lambda w, t: b.model_with_checkpoint(
             w, t, lambda p: torch.save({"model": argparse.Namespace(a=1)}, p))), ("checkpoint_final.pt",),
         absent=NO_OUT),
    Kind("predict: tampered ONNX file", _predict("--backend", "onnxruntime", model=b.onnx_tampered),
         ("model.onnx", "SHA-256"), absent=NO_OUT),
    Kind("predict: no model folder", _predict(model=lambda w, t: t / "nomodel"), ("nomodel",), absent=NO_OUT),
    Kind("predict: NaN voxels in an input", _predict(inputs=b.inputs_with(b.nan)), ("channel 1", "NaN")),
    Kind("predict: a fold that was not trained", _predict("--folds", "3"), ("fold_3",), absent=NO_OUT),
    Kind("predict: --folds -1", _predict("--folds", "-1"), ("--folds",), absent=NO_OUT),
    Kind("predict: empty input folder", _predict(inputs=lambda w, t: b.mkdir(t / "in")), ("in",), absent=NO_OUT),
    Kind("predict: --mirror-axes 5", _predict("--mirror-axes", "5"), ("mirror",), absent=NO_OUT),
    Kind("predict: --folds 0,0", _predict("--folds", "0,0"), ("fold 0 more than once",), absent=NO_OUT),
    Kind("predict: channel files of three cases as one",
         lambda w, t: ["predict", "-m", w.model, "-i", *b.test_files(w, t, lambda f: [f[0], f[5], f[1]]), "-o",
                       t / "out", *CPU], ("belong to 2 cases",), absent=NO_OUT),
    Kind("predict: a channel file given twice",
         lambda w, t: ["predict", "-m", w.model, "-i", *b.test_files(w, t, lambda f: [f[0], f[0], f[1], f[2]]),
                       "-o", t / "out", *CPU], ("given twice",), absent=NO_OUT),
    Kind("predict: channel files without channel suffixes",
         lambda w, t: ["predict", "-m", w.model, "-i", *b.test_files(
             w, t, lambda f: [b.renamed(f[0], "a.nii.gz"), b.renamed(f[1], "b.nii.gz")]), "-o", t / "out", *CPU],
         ("cannot tell which channel",), absent=NO_OUT),
    Kind("predict: -o is the input folder",
         lambda w, t: ["predict", "-m", w.model, "-i", shutil.copytree(w.dataset / "imagesTs", t / "in"), "-o",
                       t / "in", *CPU], ("is the folder the input images are read from",)),
    # evaluate
    Kind("evaluate: float prediction", _evaluate(change=b.value(0.5)), ("preds",)),
    Kind("evaluate: NaN in a prediction", _evaluate(change=b.nan), ("preds",)),
    Kind("evaluate: prediction without reference", _evaluate(extra=True), ("NOT_A_CASE", "--allow-missing")),
    Kind("evaluate: reference without prediction", _evaluate(drop=True), ("--allow-missing",)),
    Kind("evaluate: --tolerance -1", _evaluate("--tolerance", "-1"), ("--tolerance",)),
    Kind("evaluate: undeclared label value", _evaluate(change=b.value(7, np.uint8)),
         ("7", "--allow-undeclared-labels")),
    Kind("evaluate: prediction on another grid", _evaluate(change=lambda a, g: (a[:-1], g)), ("shape",)),
    Kind("evaluate: --convention unknown", _evaluate("--convention", "itk"), ("--convention",)),
    Kind("evaluate: reference folder missing",
         lambda w, t: ["evaluate", b.predictions(w, t), t / "norefs", "--dataset-json", w.dataset / "dataset.json"],
         ("norefs",)),
    Kind("evaluate: dataset.json without labels",
         lambda w, t: ["evaluate", b.predictions(w, t), w.dataset / "labelsTs", "--dataset-json",
                       b.text(t, "meta.json", "{}")], ("meta.json", "labels")),
    Kind("evaluate: an empty (0-byte) prediction", _evaluate(change=b.empty_file), ("0 bytes",)),
    Kind("evaluate: --dataset-json with a key twice",
         lambda w, t: ["evaluate", b.predictions(w, t), w.dataset / "labelsTs", "--dataset-json",
                       b.text(t, "meta.json", '{"labels": {"background": 0, "edema": 1, "edema": 2}}')],
         ("meta.json", "'edema' appears twice")),
    Kind("predict: nnU-Net model folder whose plans.json lacks 'spacing'",
         _predict(model=lambda w, t: b.nnunet_without(t, "spacing")), ("plans.json", "field 'spacing' is missing"),
         absent=NO_OUT),
    Kind("import nnunet: plans.json lacks 'architecture'",
         lambda w, t: ["import", "nnunet", b.nnunet_without(t, "architecture"), t / "work"],
         ("field 'architecture' is missing",), absent=("work",)),
    # export
    Kind("export: neither --onnx nor --archive", lambda w, t: ["export", w.model], ("--onnx",)),
    Kind("export: a fold that was not trained",
         lambda w, t: ["export", w.model, "--archive", t / "m.zip", "--folds", "3"], ("3",), absent=("m.zip",)),
    # install
    Kind("install: missing archive", lambda w, t: ["install", t / "none.zip", t / "target"], ("none.zip",),
         absent=("target",)),
    Kind("install: not a zip", lambda w, t: ["install", b.text(t, "m.zip", "text"), t / "target"], ("m.zip",),
         absent=("target",)),
    Kind("install: truncated archive", lambda w, t: ["install", b.truncated(w, t), t / "target"], ("truncated.zip",),
         absent=("target",)),
    Kind("install: path traversal member", lambda w, t: ["install", b.traversal(w, t), t / "target"],
         ("../escaped.json",), absent=("target", "escaped.json")),
    Kind("install: tampered member",
         lambda w, t: ["install", b.zip_with(w, t, "dataset.json", b'{"labels": {}}'), t / "target"],
         ("dataset.json", "SHA-256")),
    Kind("install: pickled checkpoint member (archive format 2)",
         lambda w, t: ["install", b.pickled_member(w, t), t / "target"],
         ("checkpoint_final.pt", "Python objects", "nothing was installed"), absent=("target",)),
    Kind("install: pickled checkpoint member (archive format 3)",
         lambda w, t: ["install", b.pickled_member(w, t, version=3), t / "target"],
         ("checkpoint_final.pt", "format 3 never holds"), absent=("target",)),
    Kind("install: manifest of a newer format", lambda w, t: ["install", b.zip_with(w, t, "x", b"", version=99),
                                                              t / "target"], ("version 99", "upgrade voxseg"),
         absent=("target",)),
    Kind("install: weights header altered", lambda w, t: ["install", b.weights_header_tampered(w, t), t / "target"],
         ("model_final.safetensors", "corrupt or altered header"), absent=("target",)),
    Kind("install: fold plan of another network", lambda w, t: ["install", b.weights_of_another_plan(w, t),
                                                                t / "target"],
         ("fold_0/plans.json", "do not fit the network"), absent=("target",)),
    Kind("verify: an altered archive", lambda w, t: ["verify", b.weights_header_tampered(w, t)],
         ("failed verification", "corrupt or altered header")),
    Kind("predict: weights older than their checkpoint", _predict(model=b.stale_weights),
         ("model_final.safetensors", "--write-weights"), absent=NO_OUT),
    Kind("install: no manifest",
         lambda w, t: ["install", b.without_manifest(w, t), t / "target"], ("voxseg_archive.json",),
         absent=("target",)),
    Kind("install: member outside the manifest",
         lambda w, t: ["install", b.zip_with(w, t, "training/fold_0/notes.json", b"{}", add=True), t / "target"],
         (), warning=True, absent=("target/training/fold_0/notes.json",)),
    Kind("export: --onnx with several folds",
         lambda w, t: ["export", w.model, "--onnx", t / "m.onnx", "--folds", "0,1"], ("--folds",), absent=("m.onnx",)),
    Kind("export: --onnx of fold 'all' never trained",
         lambda w, t: ["export", w.model, "--onnx", t / "m.onnx", "--folds", "all"], ("fold_all",), absent=("m.onnx",)),
    Kind("install: manifest with a key twice",
         lambda w, t: ["install", b.manifest_text(w, t, lambda m: m.replace('"format":', '"format": "x", "format":',
                                                                            1)), t / "target"],
         ("voxseg_archive.json", "'format' appears twice"), absent=("target",)),
    Kind("install: manifest nested 50000 deep",
         lambda w, t: ["install", b.manifest_text(w, t, lambda m: '{"a": ' * 50_000 + "1" + "}" * 50_000),
                       t / "target"], ("voxseg_archive.json", "nested"), absent=("target",)),
    Kind("install: a refused install into a new nested folder",
         lambda w, t: ["install", b.zip_with(w, t, "dataset.json", b'{"labels": {}}'), t / "new" / "deep" / "target"],
         ("SHA-256",), absent=("new",)),
    Kind("verify: a folder that is not a model", lambda w, t: ["verify", b.mkdir(t / "empty")], ("no plans.json",)),
    Kind("install: over an installed model", lambda w, t: ["install", b.installed(w, t), t / "target"], ("--force",)),
]


TEMP_MARKS = (".tmp", "staging", ".partial")


def _leftover(path: Path) -> bool:
    """A file, or a folder holding any file."""
    return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))


def _problems(kind: Kind, world: World, folder: Path, report: list[str]) -> list[str]:
    folder.mkdir()
    argv = kind.argv(world, folder)
    code, out, err = b.run(argv)
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
    assert len(KINDS) >= 100 and len({k.name for k in KINDS}) == len(KINDS)
    failed, report = {}, ["| kind | exit | message (first line) |", "|---|---|---|"]
    for index, kind in enumerate(KINDS):
        problems = _problems(kind, world, tmp_path / f"kind{index:02d}", report)
        if problems:
            failed[kind.name] = problems
    if os.environ.get("VOXSEG_MATRIX_REPORT"):  # a markdown table of every kind's exit code and message
        Path(os.environ["VOXSEG_MATRIX_REPORT"]).write_text("\n".join(report) + "\n")
    summary = "\n".join(f"{name}: {'; '.join(problems)}" for name, problems in failed.items())
    assert not failed, f"{len(failed)} of {len(KINDS)} kinds failed:\n{summary}"
