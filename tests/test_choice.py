"""Choosing the configuration (or pair ensemble) by cross-validation Dice, and `voxseg predict` following the
choice: scores made known by writing validation label maps and probabilities by hand, refusals, and predict
with one configuration and with an ensemble of two trained ones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_configs import TRAIN_TINY as TRAIN_TINY_2D
from tests.test_configs import _main, _write_dataset
from tests.test_predictor import make_workdir, tiny_plan
from voxseg.crossval import choose_configuration
from voxseg.data.configs import config_workdir
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.data.plan import plan_dataset
from voxseg.data.splits import load_splits
from voxseg.errors import ConfigError, MemoryBudgetError
from voxseg.infer.ensemble import EnsemblePredictor, load_choice
from voxseg.infer.postprocess import apply_postprocessing, regions_to_labels
from voxseg.infer.predictor import Predictor, save_probabilities
from voxseg.workdir import WorkDir

SHAPE, SPACING = (20, 20, 12), (1.0, 1.0, 3.0)
TRUTH = (slice(6, 13), slice(5, 12), slice(3, 8))  # _write_dataset's tumour: 7 x 7 x 5 = 245 voxels
FALSE_A = (slice(0, 3), slice(0, 3), slice(0, 3))  # 27 voxels, far from the tumour
FALSE_B = (slice(15, 20), slice(15, 20), slice(8, 12))  # 100 voxels


def _tumour_probability(tumour: float, false_block=None, false_value: float = 0.0) -> np.ndarray:
    """(2, *SHAPE) softmax-like probabilities: `tumour` on the true tumour, 0.1 elsewhere, `false_value` in
    `false_block`."""
    foreground = np.full(SHAPE, 0.1, np.float32)
    foreground[TRUTH] = tumour
    if false_block is not None:
        foreground[false_block] = false_value
    return np.stack([1 - foreground, foreground])


def _write_validation(work: Path, name: str, probabilities: np.ndarray, with_npz: bool = True) -> None:
    """Every fold's validation cases of configuration `name`: label map = argmax, and CASE.npz."""
    folder = config_workdir(work, name)
    for fold, split in enumerate(load_splits(work)):
        validation = folder / "training" / f"fold_{fold}" / "validation"
        for case in split["val"]:
            write_image(validation / f"{case}.nii.gz", probabilities.argmax(0).astype(np.uint8),
                        Geometry.from_spacing(SPACING))
            if with_npz:
                save_probabilities(validation / f"{case}.npz", probabilities, ["background", "tumour"])


@pytest.fixture
def work(tmp_path: Path) -> Path:
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)
    plan_dataset(raw, work, num_folds=2)  # 3d_fullres and 2d, the same two folds
    return work


def _dice(false_positives: int) -> float:
    return 2 * 245 / (2 * 245 + false_positives)


def test_the_ensemble_is_chosen_when_it_is_best(work: Path, capsys) -> None:
    # each configuration finds the tumour and one false blob of its own; the other's 0.1 outvotes each blob
    _write_validation(work, "3d_fullres", _tumour_probability(0.9, FALSE_A, 0.6))
    _write_validation(work, "2d", _tumour_probability(0.9, FALSE_B, 0.7))
    assert _main("evaluate", "--crossval", work, "--configurations") == 0  # no value: all
    out = capsys.readouterr().out
    choice = json.loads(WorkDir(work).inference_choice.read_text())
    scores = {e["name"]: e["dice"] for e in choice["compared"]}
    assert scores == pytest.approx({"3d_fullres+2d": 1.0, "3d_fullres": _dice(27), "2d": _dice(100)})
    assert [e["name"] for e in choice["compared"]] == ["3d_fullres+2d", "3d_fullres", "2d"]  # ranked
    assert all(e["num_cases"] == 4 for e in choice["compared"]) and choice["folds"] == [0, 1]
    assert choice["choice"] == {"name": "3d_fullres+2d", "kind": "ensemble", "configurations": ["3d_fullres", "2d"],
                                "dice": pytest.approx(1.0)}
    assert choice["postprocessing"]["largest_component"] == []  # nothing left to remove
    labels, _ = read_image(work / "ensembles" / "3d_fullres+2d" / "case0.nii.gz")
    assert labels.sum() == 245 and labels[TRUTH].all()
    assert "3d_fullres+2d" in out and "<- chosen" in out and "inference_choice.json" in out
    assert load_choice(work)["choice"]["kind"] == "ensemble"


def test_the_best_single_configuration_and_its_postprocessing(work: Path) -> None:
    # 2d misses the tumour (0.05): the mean on the tumour is 0.475 < 0.5, so the ensemble misses it too
    _write_validation(work, "3d_fullres", _tumour_probability(0.9, FALSE_A, 0.6))
    _write_validation(work, "2d", _tumour_probability(0.05))
    choice = choose_configuration(work, ["3d_fullres", "2d"])
    scores = {e["name"]: e["dice"] for e in choice["compared"]}
    assert scores == pytest.approx({"3d_fullres": _dice(27), "3d_fullres+2d": 0.0, "2d": 0.0})
    assert choice["choice"]["name"] == "3d_fullres" and choice["choice"]["kind"] == "configuration"
    # decided on 3d_fullres's cross-validation: its false blob is not the largest component
    assert choice["postprocessing"]["largest_component"] == [[1]]
    assert json.loads((work / "postprocessing.json").read_text())["largest_component"] == [[1]]


def test_a_tie_goes_to_the_simpler_single_configuration(work: Path) -> None:
    probabilities = _tumour_probability(0.9, FALSE_A, 0.6)
    _write_validation(work, "3d_fullres", probabilities)
    _write_validation(work, "2d", probabilities)
    choice = choose_configuration(work)
    assert len({e["dice"] for e in choice["compared"]}) == 1  # all three score the same
    assert choice["choice"]["name"] == "3d_fullres"


def test_configurations_with_missing_folds_are_skipped_or_refused(work: Path, capsys) -> None:
    _write_validation(work, "3d_fullres", _tumour_probability(0.9, FALSE_A, 0.6))
    _write_validation(work, "2d", _tumour_probability(0.9, FALSE_B, 0.7))
    shutil.rmtree(config_workdir(work, "2d") / "training" / "fold_1")
    choice = choose_configuration(work, "all")
    assert [e["name"] for e in choice["compared"]] == ["3d_fullres"]
    assert choice["skipped"] == {"2d": "fold(s) 1 of 2 have no validation predictions"}
    assert choice["choice"]["name"] == "3d_fullres"
    capsys.readouterr()
    assert _main("evaluate", "--crossval", work, "--configurations", "3d_fullres,2d") != 0
    err = capsys.readouterr().err
    assert "2d: fold(s) 1 of 2 have no validation predictions" in err and "Traceback" not in err
    shutil.rmtree(work / "training")
    with pytest.raises(ConfigError, match="no configuration has all 2 folds validated.*3d_fullres: fold.*0, 1"):
        choose_configuration(work)
    with pytest.raises(ConfigError, match="unknown configuration '3d_lowres'"):
        choose_configuration(work, ["3d_lowres"])


def test_mismatched_folds_are_refused(work: Path) -> None:
    _write_validation(work, "3d_fullres", _tumour_probability(0.9))
    _write_validation(work, "2d", _tumour_probability(0.9))
    moved = load_splits(work)[0]["val"][0]
    two_d = config_workdir(work, "2d") / "training"
    for ending in (".nii.gz", ".npz"):  # 2d validated this case in fold 1, not in fold 0 as splits.json says
        (two_d / "fold_0" / "validation" / f"{moved}{ending}").rename(
            two_d / "fold_1" / "validation" / f"{moved}{ending}")
    with pytest.raises(ConfigError, match=f"'2d' fold 0: .*not the fold's validation cases.*{moved}"):
        choose_configuration(work)
    assert not WorkDir(work).inference_choice.exists()


def test_pairs_without_probabilities_are_named_and_left_out(work: Path) -> None:
    _write_validation(work, "3d_fullres", _tumour_probability(0.9, FALSE_A, 0.6))
    _write_validation(work, "2d", _tumour_probability(0.9, FALSE_B, 0.7), with_npz=False)
    choice = choose_configuration(work)
    assert [e["name"] for e in choice["compared"]] == ["3d_fullres", "2d"]
    assert "no validation probabilities for 2d" in choice["skipped"]["3d_fullres+2d"]
    assert "loop.save_val_probabilities=true" in choice["skipped"]["3d_fullres+2d"]


def test_configurations_flag_needs_crossval(work: Path, capsys) -> None:
    assert _main("evaluate", "--configurations", "all") != 0
    assert "add --crossval WORKDIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bad flag value: argparse's usage error
        _main("evaluate", "--crossval", work, "--configurations", "2d,2d")
    assert "distinct configuration names" in capsys.readouterr().err


# ----- predict follows the choice -------------------------------------------------------------------------------
TRAIN_TINY_3D = [a.replace("[[1,1],[2,2],[2,2]]", "[[1,1,1],[2,2,2],[2,2,2]]")
                 .replace("[[3,3],[3,3],[3,3]]", "[[3,3,3],[3,3,3],[3,3,3]]").replace("16,16", "16,16,8")
                 for a in TRAIN_TINY_2D]


def _write_choice(work: Path, names: list[str], largest_component: list) -> None:
    kind = "configuration" if len(names) == 1 else "ensemble"
    WorkDir(work).inference_choice.write_text(json.dumps({
        "choice": {"name": "+".join(names), "kind": kind, "configurations": names, "dice": 0.5},
        "postprocessing": {"largest_component": largest_component}}))


def test_predict_uses_the_choice(work: Path, tmp_path: Path, capsys) -> None:
    raw = tmp_path / "Mini"
    assert _main("preprocess", work, "--quiet") == 0
    assert _main("preprocess", work, "--configuration", "2d", "--quiet") == 0
    # 3d_fullres also validates fold 0 with probabilities, as a run meant for ensembles does
    assert _main("train", work, "--fold", 0, *TRAIN_TINY_3D, "--set", "loop.full_val=true",
                 "--set", "loop.save_val_probabilities=true") == 0
    assert _main("train", work, "--configuration", "2d", "--fold", 0, *TRAIN_TINY_2D) == 0
    for case in load_splits(work)[0]["val"]:
        labels, _ = read_image(work / "training" / "fold_0" / "validation" / f"{case}.nii.gz")
        with np.load(work / "training" / "fold_0" / "validation" / f"{case}.npz") as saved:
            assert list(saved["class_names"]) == ["background", "tumour"]
            saved_probabilities = saved["probabilities"].astype(np.float32)
        assert saved_probabilities.shape == (2, *SHAPE) and np.allclose(saved_probabilities.sum(0), 1, atol=2e-3)
        differ = saved_probabilities.argmax(0) != labels  # only where float16 rounding met a tie
        assert np.all(np.abs(saved_probabilities[1][differ] - 0.5) < 1e-3)
    predict = ["-i", raw / "imagesTs", "--device", "cpu", "--no-mirror"]
    image, geometry = read_image(raw / "imagesTs" / "case4_0000.nii.gz")
    members = [Predictor.from_workdir(config_workdir(work, n), folds=[0], device="cpu", mirror_axes=None)
               for n in ("3d_fullres", "2d")]
    probabilities = [m.predict_array(image, geometry, return_probabilities=True)[1] for m in members]
    assert np.abs(probabilities[0] - probabilities[1]).max() > 1e-3  # two different models
    mean = (probabilities[0] + probabilities[1]) / np.float32(2)
    capsys.readouterr()

    _write_choice(work, ["3d_fullres", "2d"], [])
    assert _main("predict", "-m", work, "-o", tmp_path / "ensemble", "--save-probabilities", *predict) == 0
    assert "ensemble of 3d_fullres + 2d" in capsys.readouterr().out
    labels, _ = read_image(tmp_path / "ensemble" / "case4.nii.gz")
    assert np.array_equal(labels, mean.argmax(0).astype(np.uint8))
    with np.load(tmp_path / "ensemble" / "case4.npz") as saved:
        assert np.allclose(saved["probabilities"].astype(np.float32), mean, atol=1e-3)

    _write_choice(work, ["2d"], [[1]])  # one configuration, with the chosen postprocessing
    assert _main("predict", "-m", work, "-o", tmp_path / "single", *predict) == 0
    assert "configuration 2d" in capsys.readouterr().out
    expected = apply_postprocessing(probabilities[1].argmax(0).astype(np.uint8), {"largest_component": [[1]]})
    assert np.array_equal(read_image(tmp_path / "single" / "case4.nii.gz")[0], expected)
    # --configuration overrides the choice
    assert _main("predict", "-m", work, "--configuration", "3d_fullres", "-o", tmp_path / "override", *predict) == 0
    assert "cross-validation choice" not in capsys.readouterr().out
    expected = probabilities[0].argmax(0).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "override" / "case4.nii.gz")[0], expected)

    WorkDir(work).inference_choice.write_text(json.dumps({"choice": {"kind": "ensemble", "configurations": ["2d"]}}))
    assert _main("predict", "-m", work, "-o", tmp_path / "bad", *predict) != 0
    err = capsys.readouterr().err
    assert WorkDir(work).inference_choice.name in err and "Traceback" not in err


@pytest.mark.slow
def test_train_choose_and_predict_end_to_end(work: Path, tmp_path: Path, capsys) -> None:
    """Both configurations trained on both folds without probabilities (singles compared, the pair named),
    re-validated with them as the skip reason says (the pair compared too), then predict follows the choice."""
    assert _main("preprocess", work, "--quiet") == 0
    assert _main("preprocess", work, "--configuration", "2d", "--quiet") == 0
    for fold in (0, 1):
        assert _main("train", work, "--fold", fold, *TRAIN_TINY_3D, "--set", "loop.full_val=true") == 0
        assert _main("train", work, "--configuration", "2d", "--fold", fold, *TRAIN_TINY_2D,
                     "--set", "loop.full_val=true") == 0
    first = choose_configuration(work)
    assert [e["kind"] for e in first["compared"]] == ["configuration"] * 2 and "3d_fullres+2d" in first["skipped"]
    for name in ("3d_fullres", "2d"):
        for fold in (0, 1):
            assert _main("train", work, "--configuration", name, "--fold", fold, "--test-only", "--checkpoint",
                         "final", "--device", "cpu", "--set", "loop.save_val_probabilities=true") == 0
    second = choose_configuration(work)
    assert sorted(e["name"] for e in second["compared"]) == ["2d", "3d_fullres", "3d_fullres+2d"]
    singles = {e["name"]: e["dice"] for e in first["compared"]}
    assert {e["name"]: e["dice"] for e in second["compared"] if e["kind"] == "configuration"} == \
        pytest.approx(singles)  # the same final weights validated again
    capsys.readouterr()
    assert _main("predict", "-m", work, "-i", tmp_path / "Mini" / "imagesTs", "-o", tmp_path / "preds",
                 "--device", "cpu", "--no-mirror") == 0
    assert "cross-validation choice" in capsys.readouterr().out
    assert read_image(tmp_path / "preds" / "case4.nii.gz")[0].shape == SHAPE


def test_region_ensemble_thresholds_the_mean_of_the_sigmoids(tmp_path: Path) -> None:
    """Two region-based models (different weights): the ensemble's regions come from the mean of the two
    sigmoid maps, thresholded and written in regions_class_order, as for one model."""
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    members = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        make_workdir(folder, tiny_plan(labels=labels, regions_class_order=[1, 2]), seed=seed)
        members.append(Predictor.from_workdir(folder, folds=[0], device="cpu", mirror_axes=None))
    image = np.random.default_rng(0).normal(0, 1, (2, 18, 20, 17)).astype(np.float32)
    outputs = [m.predict_array(image, (1.0, 1.0, 1.0), return_probabilities=True)[1] for m in members]
    mean = (outputs[0] + outputs[1]) / np.float32(2)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3
    ensemble = EnsemblePredictor(members)
    got, probabilities = ensemble.predict_array(image, (1.0, 1.0, 1.0), return_probabilities=True)
    assert np.array_equal(probabilities, mean)
    assert np.array_equal(got, regions_to_labels(torch.from_numpy(mean), [1, 2]).numpy())
    with pytest.raises(ConfigError, match="different channels or classes"):
        other = tmp_path / "other"
        other.mkdir()
        make_workdir(other, tiny_plan())
        EnsemblePredictor([members[0], Predictor.from_workdir(other, folds=[0], device="cpu")])


def test_an_ensemble_over_the_memory_budget_is_refused_before_any_work(tmp_path: Path) -> None:
    members = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        make_workdir(folder, tiny_plan(), seed=seed)
        members.append(Predictor.from_workdir(folder, folds=[0], device="cpu", mirror_axes=None,
                                              max_memory=0.002))
    image = np.random.default_rng(0).normal(0, 1, (2, 40, 40, 40)).astype(np.float32)
    calls = []
    members[0].predict_logits = lambda *args, **kwargs: calls.append(1)  # must never run
    refusal = r"case 'big': an ensemble of 2 configurations holds .*\(3 x 40x40x40 .* MiB allowed"
    with pytest.raises(MemoryBudgetError, match=refusal):
        EnsemblePredictor(members).predict_array(image, (1.0, 1.0, 1.0), name="big")
    assert calls == []


def test_probabilities_of_a_test_only_validation_count_while_its_checkpoint_is_unchanged(work: Path) -> None:
    """A run validated without probabilities gets them from `--test-only --checkpoint final` in
    validation_final/ (its cross-validation outputs stay as they are); once checkpoint_final.pt is rewritten (a
    resumed, longer run), those probabilities are stale and the ensemble is not compared."""
    from voxseg.checkpoint import checkpoint_identity

    _write_validation(work, "3d_fullres", _tumour_probability(0.9, FALSE_A, 0.6), with_npz=False)
    _write_validation(work, "2d", _tumour_probability(0.9, FALSE_B, 0.7))
    folder = config_workdir(work, "3d_fullres")
    for fold in (0, 1):
        run = folder / "training" / f"fold_{fold}"
        (run / "checkpoint_final.pt").write_bytes(b"weights")
        shutil.copytree(run / "validation", run / "validation_final")
        for case in load_splits(work)[fold]["val"]:
            save_probabilities(run / "validation_final" / f"{case}.npz", _tumour_probability(0.9, FALSE_A, 0.6),
                               ["background", "tumour"])
        (run / "validation_final" / "checkpoint.json").write_text(json.dumps(checkpoint_identity(
            run / "checkpoint_final.pt")))
    choice = choose_configuration(work)
    assert {e["name"]: e["dice"] for e in choice["compared"]}["3d_fullres+2d"] == pytest.approx(1.0)
    assert not list((folder / "training" / "fold_0" / "validation").glob("*.npz"))  # untouched
    (folder / "training" / "fold_1" / "checkpoint_final.pt").write_bytes(b"longer run")  # a resume rewrote it
    stale = choose_configuration(work)
    assert "3d_fullres+2d" not in {e["name"] for e in stale["compared"]}
    assert "validation_final" in stale["skipped"]["3d_fullres+2d"]
