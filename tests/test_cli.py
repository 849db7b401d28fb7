"""`voxseg` end to end through `voxseg.cli.main` (in process, CPU) on a tiny synthetic dataset: every stage's
files and printed output, resume, export / install, cross-validation, and the error paths (non-zero exit, a
message naming the file or option on stderr, never a traceback)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import voxseg
from voxseg.checkpoint import load_checkpoint
from voxseg.cli import build_parser, main
from voxseg.data.io import read_image

CLASSES = ("edema", "necrosis", "enhancing")
SHAPE = (24, 28, 32)  # not a cube, so a swapped axis anywhere changes a shape
PLAN_TINY = ["--set", "patch_size=16,16,16", "--set", "batch_size=2", "--set", "network.features=4,8,8"]
TRAIN_TINY = [
    "--epochs", "2", "--iterations", "2", "--device", "cpu", "--set", "logging.tensorboard=false",
    "--set", "logging.progress_png=false", "--set", "logging.progress_bar=false",
    "--set", "loop.val_iterations=1", "--set", "data.num_threads=2",
]


@dataclass
class Result:
    code: int
    out: str
    err: str


def _run(*args: object) -> Result:
    """main() with stdout/stderr captured (usable in a module-scoped fixture, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, --version, bad flags
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def _fails(capsys: pytest.CaptureFixture, *args: object) -> str:
    """Run main() expecting a user error: non-zero exit, no traceback; returns stderr."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code not in (0, None), f"expected a failure, got exit 0:\n{captured.out}"
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.strip(), "the error message belongs on stderr"
    return captured.err


@dataclass
class Pipeline:
    root: Path
    dataset: Path
    work: Path
    preds: Path
    steps: dict[str, Result]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("cli")
    dataset, work, preds = root / "Dataset001_Tiny", root / "work", root / "preds"
    steps: dict[str, Result] = {}

    def step(name: str, *args: object) -> None:
        steps[name] = result = _run(*args)
        assert result.code == 0, f"'voxseg {name}' failed ({result.code}):\n{result.out[-2000:]}\n{result.err[-3000:]}"

    step("synth", "synth", dataset, "--cases", 6, "--test-cases", 2, "--shape", ",".join(map(str, SHAPE)))
    step("check", "check", dataset)
    step("plan", "plan", dataset, "-o", work, "--folds", 2, *PLAN_TINY)
    step("preprocess", "preprocess", work, "--quiet")
    step("train0", "train", work, "--fold", 0, *TRAIN_TINY)
    step("train1", "train", work, "--fold", 1, *TRAIN_TINY)
    step("predict", "predict", "-m", work, "-i", dataset / "imagesTs", "-o", preds, "--device", "cpu")
    step("evaluate", "evaluate", preds, dataset / "labelsTs", "--dataset-json", dataset / "dataset.json")
    return Pipeline(root, dataset, work, preds, steps)


def _case_names(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))


def _log_epochs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----- the pipeline ------------------------------------------------------------------------------------------
def test_synth_check_and_plan(pipeline: Pipeline) -> None:
    ds, work = pipeline.dataset, pipeline.work
    assert len(list((ds / "imagesTr").glob("*_000[0-3].nii.gz"))) == 6 * 4
    assert len(_case_names(ds / "labelsTr")) == 6 and len(list((ds / "imagesTs").glob("*.nii.gz"))) == 2 * 4
    assert "OK: 6 training and 2 test case(s)" in pipeline.steps["check"].out
    plan = json.loads((work / "plans.json").read_text())
    assert plan["patch_size"] == [16, 16, 16] and plan["batch_size"] == 2
    assert plan["network"]["features"] == [4, 8, 8]
    assert "16x16x16 x 2" in pipeline.steps["plan"].out
    splits = json.loads((work / "splits.json").read_text())
    assert len(splits) == 2
    vals = [set(s["val"]) for s in splits]
    assert not vals[0] & vals[1] and vals[0] | vals[1] == set(_case_names(ds / "labelsTr"))
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
    assert (work / "fingerprint.json").is_file() and (work / "dataset.json").is_file()


def test_preprocess_writes_the_case_store(pipeline: Pipeline) -> None:
    pre = pipeline.work / "preprocessed"
    names = _case_names(pipeline.dataset / "labelsTr")
    assert f"preprocessed {len(names)} cases" in pipeline.steps["preprocess"].out
    for name in names:
        image = np.load(pre / f"{name}.npy", mmap_mode="r")
        seg = np.load(pre / f"{name}_seg.npy", mmap_mode="r")
        assert image.ndim == 4 and image.shape[0] == 4  # (C, d, h, w), four channels
        assert seg.shape == (1, *image.shape[1:])
        properties = json.loads((pre / f"{name}.json").read_text())
        assert properties["original_shape"] == list(SHAPE)
        assert (pre / f"{name}_fg.npz").is_file()


@pytest.mark.parametrize("fold", [0, 1])
def test_training_outputs(pipeline: Pipeline, fold: int) -> None:
    out = pipeline.work / "training" / f"fold_{fold}"
    for name in ("checkpoint_final.pt", "checkpoint_latest.pt", "config.json", "log.jsonl"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["loop"]["epochs"] == 2 and config["data"]["iterations_per_epoch"] == 2
    assert config["loop"]["device"] == "cpu" and config["logging"]["tensorboard"] is False
    assert not (out / "tensorboard").exists()
    epochs = _log_epochs(out / "log.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(e["iterations"] == 2 and math.isfinite(e["loss"]["loss"]) for e in epochs)
    assert load_checkpoint(out / "checkpoint_final.pt", "cpu")["progress"]["epoch"] == 2
    # full validation predicted exactly this fold's validation cases
    val = json.loads((pipeline.work / "splits.json").read_text())[fold]["val"]
    assert _case_names(out / "validation") == sorted(val)
    assert "training done: epochs=2" in pipeline.steps[f"train{fold}"].out


def test_predictions_keep_the_input_geometry(pipeline: Pipeline) -> None:
    names = sorted({p.name[: -len("_0000.nii.gz")] for p in (pipeline.dataset / "imagesTs").glob("*_0000.nii.gz")})
    assert _case_names(pipeline.preds) == names and len(names) == 2
    assert f"wrote {len(names)} prediction(s)" in pipeline.steps["predict"].out
    # without --folds: the ensemble of every trained fold, said so
    assert "using folds 0,1 (every trained fold; --folds to choose)" in pipeline.steps["predict"].out
    # stderr is no terminal here: a plain line per case with its time, then the summary (after the one line of
    # the CPU forward measurement, when this network was not measured before)
    lines = pipeline.steps["predict"].err.splitlines()
    measured = [line for line in lines if line.startswith("measured one forward pass on this CPU: ")]
    assert len(measured) <= 1 and lines[: len(measured)] == measured, lines
    lines = lines[len(measured):]
    assert len(lines) == 3, lines
    for number, (line, name) in enumerate(zip(lines, names), start=1):
        assert re.fullmatch(rf"{name}: \d+\.\d s \({number}/2\)", line), line
    assert re.fullmatch(r"predicted 2 case\(s\) in \d+\.\d s \(\d+\.\d s/case\)", lines[2]), lines[2]
    for name in names:
        image, geometry = read_image(pipeline.dataset / "imagesTs" / f"{name}_0000.nii.gz")
        labels, pred_geometry = read_image(pipeline.preds / f"{name}.nii.gz")
        assert labels.shape == image.shape == SHAPE
        np.testing.assert_allclose(pred_geometry.affine, geometry.affine, atol=1e-5)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_evaluate_writes_summary_and_prints_table(pipeline: Pipeline) -> None:
    summary = json.loads((pipeline.preds / "summary.json").read_text())
    assert set(CLASSES) <= set(summary["mean"]) and summary["counts"]["cases"] == 2
    table = pipeline.steps["evaluate"].out
    for name in CLASSES:
        line = next(line for line in table.splitlines() if line.startswith(name))
        dice = float(line.split()[1])  # the printed Dice is the summary's, rounded
        assert 0.0 <= dice <= 1.0
        assert dice == pytest.approx(summary["mean"][name]["dice"], abs=6e-5)
    fg_line = next(line for line in table.splitlines() if line.startswith("foreground mean"))
    assert float(fg_line.split()[2]) == pytest.approx(summary["foreground_mean"]["dice"], abs=6e-5)


def test_resume_continues_training(pipeline: Pipeline, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(pipeline.work, work)
    before = (work / "training" / "fold_0" / "log.jsonl").read_text().splitlines()
    result = _run("train", work, "--fold", 0, "--resume", "--epochs", 3)
    assert result.code == 0, result.err
    assert "resumed from" in result.out + result.err and "training done: epochs=3" in result.out
    after = (work / "training" / "fold_0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in after] == [0, 1, 2]
    assert after[:2] == before  # the old epochs are kept, one new epoch appended
    assert load_checkpoint(work / "training" / "fold_0" / "checkpoint_final.pt", "cpu")["progress"]["epoch"] == 3
    # the resumed run kept its own settings (2 iterations, CPU) although only --epochs was given
    assert _log_epochs(work / "training" / "fold_0" / "log.jsonl")[-1]["iterations"] == 2


def test_export_archive_install_and_onnx(pipeline: Pipeline, tmp_path: Path) -> None:
    archive, installed = tmp_path / "model.zip", tmp_path / "installed"
    result = _run("export", pipeline.work, "--archive", archive, "--folds", "0,1")
    assert result.code == 0, result.err
    assert archive.is_file()
    result = _run("install", archive, installed)
    assert result.code == 0, result.err
    assert (installed / "plans.json").is_file()

    reference = {n: read_image(pipeline.preds / f"{n}.nii.gz")[0] for n in _case_names(pipeline.preds)}
    out = tmp_path / "pred_installed"
    result = _run("predict", "-m", installed, "-i", pipeline.dataset / "imagesTs", "-o", out, "--device", "cpu")
    assert result.code == 0, result.err
    assert "using folds 0,1 (every trained fold" in result.out  # an installed archive: its folds by default
    for name, labels in reference.items():  # the installed model is the trained one
        np.testing.assert_array_equal(read_image(out / f"{name}.nii.gz")[0], labels)
    out = tmp_path / "pred_fold0"
    result = _run("predict", "-m", installed, "-i", pipeline.dataset / "imagesTs", "-o", out, "--device", "cpu",
                  "--folds", 0)
    assert result.code == 0 and "using fold 0\n" in result.out, result.err
    reference = {n: read_image(out / f"{n}.nii.gz")[0] for n in reference}

    onnx_file = installed / "training" / "fold_0" / "model.onnx"  # where the onnxruntime backend looks
    result = _run("export", installed, "--onnx", onnx_file, "--folds", 0)
    assert result.code == 0, result.err
    difference = float(re.search(r"max abs difference ([0-9.e+-]+)", result.out).group(1))
    assert onnx_file.is_file() and difference < 1e-3
    out = tmp_path / "pred_onnx"
    result = _run("predict", "-m", installed, "-i", pipeline.dataset / "imagesTs", "-o", out,
                  "--backend", "onnxruntime", "--folds", 0)
    assert result.code == 0, result.err
    for name, labels in reference.items():  # float differences may flip a rare tie, nothing more
        assert np.mean(read_image(out / f"{name}.nii.gz")[0] == labels) > 0.999


def test_crossval_evaluates_every_training_case(pipeline: Pipeline, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(pipeline.work, work)  # crossval writes postprocessing.json, which changes predictions
    result = _run("evaluate", "--crossval", work)
    assert result.code == 0, result.err
    crossval = work / "training" / "crossval"
    summary = json.loads((crossval / "summary.json").read_text())
    assert summary["folds"] == [0, 1]
    assert summary["counts"]["cases"] == 6
    assert sorted(c["name"] for c in summary["per_case"]) == _case_names(pipeline.dataset / "labelsTr")
    assert (work / "postprocessing.json").is_file() and "postprocessing: " in result.out
    assert all(name in result.out for name in CLASSES)


def test_benchmark_and_estimate_commands(pipeline: Pipeline, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        result = _run("benchmark", pipeline.work, "--device", "cpu", "--threads", 1, "--iterations", 1, "--warmup", 0,
                      "--no-inference", "--output", tmp_path / "benchmark.json")
    finally:
        torch.set_num_threads(threads)
    assert result.code == 0, result.err
    measured = json.loads((tmp_path / "benchmark.json").read_text())
    assert f"{measured['training']['samples_per_s']:.2f}" in result.out and "predict" not in result.out

    result = _run("estimate", pipeline.work, "--device", "cpu", "--batch-sizes", "2,4", "--num-samples", "1,2",
                  "--patch-sizes", "16,16,16", "--epochs", 5, "--iterations-per-epoch", 0, "--iterations", 1,
                  "--warmup", 1, "--rounds", 2, "--set", "loop.val_iterations=1",
                  "--output", tmp_path / "estimate.json")
    assert result.code == 0, result.err
    table = json.loads((tmp_path / "estimate.json").read_text())
    assert [(r["batch_size"], r["num_samples"]) for r in table["rows"]] == [(2, 1), (2, 2), (4, 1), (4, 2)]
    assert table["num_cases"] == 3 and table["val_iterations"] == 1  # fold 0 trains on 3 of 6
    assert "3 training cases (fold 0 of this work directory), one pass over the cases per epoch" in result.out
    assert "1.00x (baseline)" in result.out and table["schedule"]["rounds"] == 2

    result = _run("estimate", pipeline.work, "--device", "cpu", "--cases", 0)
    assert result.code != 0 and "--cases: must be >= 1" in result.err and "Traceback" not in result.err
    assert not (pipeline.work / "benchmark.json").exists() and not (pipeline.work / "estimate.json").exists()


# ----- errors: non-zero exit, a message naming the culprit, no traceback --------------------------------------
def _broken_dataset(src: Path, dst: Path) -> Path:
    """A copy of `src` with one channel file of the first training case removed."""
    shutil.copytree(src, dst)
    victim = sorted((dst / "imagesTr").glob("*_0002.nii.gz"))[0]
    victim.unlink()
    return victim


def test_missing_dataset_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    assert str(missing) in _fails(capsys, "check", missing)
    assert "no_such_dataset" in _fails(capsys, "plan", missing, "-o", tmp_path / "work")
    assert not (tmp_path / "work" / "plans.json").exists()


def test_plan_refuses_a_dataset_with_a_missing_channel(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    victim = _broken_dataset(pipeline.dataset, tmp_path / "broken")
    assert victim.name in _fails(capsys, "check", tmp_path / "broken")
    err = _fails(capsys, "plan", tmp_path / "broken", "-o", tmp_path / "work")
    assert victim.name in err and "FAILED" in err
    assert not (tmp_path / "work" / "plans.json").exists()


def test_unknown_set_keys_suggest_the_nearest(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    err = _fails(capsys, "plan", pipeline.dataset, "-o", tmp_path / "work", "--set", "patch_sise=16,16,16")
    assert "patch_sise" in err and "did you mean 'patch_size'" in err
    log = pipeline.work / "training" / "fold_0" / "log.jsonl"
    before = log.read_text()
    err = _fails(capsys, "train", pipeline.work, "--fold", 0, "--set", "optim.lrr=0.1")
    assert "optim.lrr" in err and "did you mean 'optim.lr'" in err
    assert log.read_text() == before  # nothing was trained or overwritten
    assert "KEY=VALUE" in _fails(capsys, "plan", pipeline.dataset, "-o", tmp_path / "work", "--set", "batch_size")


def test_predict_errors(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(pipeline.work / "plans.json", untrained / "plans.json")
    err = _fails(capsys, "predict", "-m", untrained, "-i", pipeline.dataset / "imagesTs", "-o", tmp_path / "out",
                 "--device", "cpu")
    assert "checkpoint_final.pt" in err and "voxseg train" in err
    assert "no_model" in _fails(capsys, "predict", "-m", tmp_path / "no_model", "-i", pipeline.dataset / "imagesTs",
                                "-o", tmp_path / "out", "--device", "cpu")

    images = sorted((pipeline.dataset / "imagesTs").glob("*.nii.gz"))[:2]  # two channels of a four-channel model
    err = _fails(capsys, "predict", "-m", pipeline.work, "-i", *images, "-o", tmp_path / "out", "--device", "cpu")
    assert "2 channel file(s)" in err and "expects 4" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_case_over_the_memory_budget_is_refused_before_any_work(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    err = _fails(capsys, "predict", "-m", pipeline.work, "-i", pipeline.dataset / "imagesTs", "-o", tmp_path / "out",
                 "--device", "cpu", "--max-memory", "0.001")
    assert "needs about" in err and "at its peak" in err and "--max-memory 0.001" in err and "band" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))  # nothing written, not even a half
    assert "--max-memory" in _fails(capsys, "predict", "-m", pipeline.work, "-i", pipeline.dataset / "imagesTs",
                                    "-o", tmp_path / "out", "--max-memory", "-2")
    result = _run("predict", "-m", pipeline.work, "-i", pipeline.dataset / "imagesTs", "-o", tmp_path / "out2",
                  "--device", "cpu", "--max-memory", "4")
    assert result.code == 0, result.err


def test_evaluate_errors(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    assert "no_preds" in _fails(capsys, "evaluate", tmp_path / "no_preds", pipeline.dataset / "labelsTs")
    assert "no_refs" in _fails(capsys, "evaluate", pipeline.preds, tmp_path / "no_refs", "--dataset-json",
                               pipeline.dataset / "dataset.json")
    assert "PRED and REF" in _fails(capsys, "evaluate")
    assert "not_a_workdir" in _fails(capsys, "evaluate", "--crossval", tmp_path / "not_a_workdir")


def test_train_fold_out_of_range(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    work = tmp_path / "work5"
    result = _run("plan", pipeline.dataset, "-o", work, *PLAN_TINY)  # default: 5 folds
    assert result.code == 0, result.err
    err = _fails(capsys, "train", work, "--fold", 7, "--device", "cpu")
    assert "fold 7" in err and "5 fold(s)" in err
    assert "--fold" in _fails(capsys, "train", work, "--fold", "seven")
    assert not (work / "training" / "fold_7").exists()


def test_bad_or_missing_device(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    images = ["-i", pipeline.dataset / "imagesTs", "-o", tmp_path / "out"]
    for command in (["predict", "-m", pipeline.work, *images], ["preprocess", pipeline.work], ["train", pipeline.work],
                    ["demo", tmp_path / "demo"], ["benchmark", pipeline.work], ["estimate", pipeline.work]):
        err = _fails(capsys, *command, "--device", "gpu")
        assert "argument --device" in err and "'gpu'" in err and "cuda:N" in err
    if not torch.cuda.is_available():
        err = _fails(capsys, "predict", "-m", pipeline.work, *images, "--device", "cuda:1")
        assert "--device cuda:1" in err and "not available" in err
        assert "--device cuda" in _fails(capsys, "preprocess", pipeline.work, "--device", "cuda")
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()


def test_export_and_install_errors(pipeline: Pipeline, capsys, tmp_path: Path) -> None:
    assert "--onnx" in _fails(capsys, "export", pipeline.work)
    assert "missing.zip" in _fails(capsys, "install", tmp_path / "missing.zip", tmp_path / "target")
    not_zip = tmp_path / "model.zip"
    not_zip.write_text("not a zip")
    assert "not a zip" in _fails(capsys, "install", not_zip, tmp_path / "target")


def test_help_of_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert {"synth", "check", "plan", "preprocess", "train", "predict", "evaluate", "export", "install",
            "benchmark", "estimate", "demo", "convert"} <= set(commands)
    for name in [*commands, None]:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"] if name else ["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"usage: voxseg{' ' + name if name else ''}" in out
    assert main([]) == 2 and "usage: voxseg" in capsys.readouterr().out


# ----- the real process --------------------------------------------------------------------------------------
def test_process_exit_codes(pipeline: Pipeline, tmp_path: Path) -> None:
    version = subprocess.run([sys.executable, "-m", "voxseg", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"voxseg {voxseg.__version__}"
    victim = _broken_dataset(pipeline.dataset, tmp_path / "broken")
    check = subprocess.run([sys.executable, "-m", "voxseg", "check", str(tmp_path / "broken")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1
    assert victim.name in check.stderr and "FAILED" in check.stderr and "Traceback" not in check.stderr


def test_cli_wires_continue_force_and_evaluation_options(pipeline: Pipeline, tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    shutil.copytree(pipeline.preds, preds)
    result = _run("predict", "-m", pipeline.work, "-i", pipeline.dataset / "imagesTs", "-o", preds, "--device", "cpu",
                  "--continue")
    assert result.code == 0, result.err
    assert "wrote 0 prediction(s)" in result.out and "skipped 2 already there" in result.out

    archive, installed = tmp_path / "model.zip", tmp_path / "installed"
    assert _run("export", pipeline.work, "--archive", archive, "--folds", 0).code == 0
    assert _run("install", archive, installed).code == 0
    again = _run("install", archive, installed)
    assert again.code != 0 and "--force" in again.err and "Traceback" not in again.err
    assert _run("install", archive, installed, "--force").code == 0

    dataset_json = pipeline.dataset / "dataset.json"
    result = _run("evaluate", preds, pipeline.dataset / "labelsTs", "--dataset-json", dataset_json,
                  "--convention", "nnunet")
    assert result.code == 0, result.err
    assert "convention: nnunet" in result.out
    assert json.loads((preds / "summary.json").read_text())["convention"] == "nnunet"
    extra = preds / "extra_case.nii.gz"
    shutil.copyfile(next(preds.glob("*.nii.gz")), extra)  # a prediction without a reference
    refused = _run("evaluate", preds, pipeline.dataset / "labelsTs", "--dataset-json", dataset_json)
    assert refused.code != 0 and "extra_case" in refused.err and "Traceback" not in refused.err
    allowed = _run("evaluate", preds, pipeline.dataset / "labelsTs", "--dataset-json", dataset_json,
                   "--allow-missing")
    assert allowed.code == 0, allowed.err
    assert json.loads((preds / "summary.json").read_text())["extra_predictions"] == ["extra_case"]
