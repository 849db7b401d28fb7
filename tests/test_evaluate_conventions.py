"""Evaluation conventions: how a class absent from the reference scores under voxseg, nnunet, monai and brats."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_evaluate import PLAIN_META, _write
from voxseg.errors import ConfigError
from voxseg.evaluate import evaluate_folder, format_table

ENDING = ".mha"


@pytest.fixture()
def folders(tmp_path):
    """Class b (2) absent from both files of 'both', predicted but not in the reference of 'fp'."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:10, 2:10] = 1
    with_b = ref.copy()
    with_b[8:10, 2:6, 2:6] = 2
    _write(ref_dir, "both", ref, ENDING)
    _write(pred_dir, "both", ref, ENDING)
    _write(ref_dir, "fp", ref, ENDING)
    _write(pred_dir, "fp", with_b, ENDING)
    return pred_dir, ref_dir


def _b(summary, case):
    return next(c["metrics"]["b"] for c in summary["per_case"] if c["name"] == case)


@pytest.mark.parametrize("convention, both_dice, both_nsd, fp_dice, fp_hd95, mean_dice", [
    ("voxseg", 1.0, 1.0, 0.0, None, 0.5),
    ("nnunet", None, 1.0, 0.0, None, 0.0),
    ("monai", None, None, None, None, None),
    ("brats", 1.0, 1.0, 0.0, 373.13, 0.5),
])
def test_a_class_absent_from_the_reference(folders, convention, both_dice, both_nsd, fp_dice, fp_hd95, mean_dice):
    summary = evaluate_folder(*folders, PLAIN_META, convention=convention, out=False)
    assert _b(summary, "both")["dice"] == both_dice and _b(summary, "both")["nsd"] == both_nsd
    assert _b(summary, "fp")["nsd"] == 0.0  # MONAI's SurfaceDiceMetric too: 0 when only one side has the class
    assert _b(summary, "fp")["dice"] == fp_dice and _b(summary, "fp")["hd95"] == fp_hd95
    assert summary["mean"]["b"]["dice"] == mean_dice
    assert summary["convention"] == convention and summary["conventions"]["empty_classes"]["name"] == convention
    assert f"convention: {convention}" in format_table(summary)


def test_unknown_convention(folders):
    with pytest.raises(ConfigError, match="convention 'itk' is unknown; use one of voxseg, nnunet, monai, brats"):
        evaluate_folder(*folders, PLAIN_META, convention="itk", out=False)


def _brute_directed(from_surface, to_surface, spacing):
    a = np.argwhere(from_surface) * np.asarray(spacing)
    b = np.argwhere(to_surface) * np.asarray(spacing)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(1)


def test_monai_convention_matches_monais_documented_surface_and_hd95():
    """MONAI: edges = mask XOR its erosion with scipy's default (face) structure, outside the image being
    background; HD95 = max of the two directed 95th percentiles; surface Dice over both edge sets."""
    from scipy import ndimage

    from voxseg.evaluate.conventions import metric_options
    from voxseg.evaluate.metrics import compute_case_metrics

    rng = np.random.default_rng(4)
    spacing = (1.5, 0.8, 1.1)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (14, 16, 15)], indexing="ij"))
    ref = (((grid - np.array([7, 8, 7])[:, None, None, None]) * np.array(spacing)[:, None, None, None]) ** 2
           ).sum(0) < 5.0 ** 2
    pred = ndimage.binary_dilation(ref, iterations=1) & (rng.random(ref.shape) > 0.15)
    pred[0, 0, :3] = True  # a far false positive touching the image border
    edges = {name: mask ^ ndimage.binary_erosion(mask) for name, mask in (("pred", pred), ("ref", ref))}
    p2r = _brute_directed(edges["pred"], edges["ref"], spacing)
    r2p = _brute_directed(edges["ref"], edges["pred"], spacing)
    expected_hd95 = max(np.percentile(p2r, 95), np.percentile(r2p, 95))
    expected_nsd = (np.count_nonzero(p2r <= 1.0) + np.count_nonzero(r2p <= 1.0)) / (p2r.size + r2p.size)
    monai = compute_case_metrics(pred.astype(np.uint8), ref.astype(np.uint8), spacing, {"c": [1]},
                                 tolerance_mm=1.0, **metric_options("monai"))["c"]
    assert monai["hd95"] == pytest.approx(expected_hd95, abs=1e-6)
    assert monai["nsd"] == pytest.approx(expected_nsd, abs=1e-6)
    voxseg = compute_case_metrics(pred.astype(np.uint8), ref.astype(np.uint8), spacing, {"c": [1]},
                                  tolerance_mm=1.0, **metric_options("voxseg"))["c"]
    assert voxseg["hd95"] != pytest.approx(monai["hd95"], abs=1e-3)  # the conventions really differ here
    assert metric_options("nnunet") == metric_options("voxseg") == {}
    assert metric_options("brats") == {"hd95_mode": "max_directed"}


@pytest.fixture()
def brats_folders(tmp_path):
    """BraTS regions (labels of voxseg convert-brats: 1 edema, 2 necrosis, 3 enhancing), spacing 2.5 x 1 x 1 mm.

    near:  reference one enhancing voxel; prediction that voxel and one 3 voxels (7.5 mm) away along axis 0.
    missed: reference an edema block, prediction empty.  false_pos: reference empty, prediction one necrosis voxel.
    """
    from voxseg.data.convert import BRATS_REGION_LABELS

    spacing = (2.5, 1.0, 1.0)
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    empty = np.zeros((10, 8, 8), np.uint8)
    near_ref, near_pred = empty.copy(), empty.copy()
    near_ref[2, 3, 3] = near_pred[2, 3, 3] = near_pred[5, 3, 3] = 3
    missed_ref = empty.copy()
    missed_ref[1:3, 1:3, 1:3] = 1
    false_pred = empty.copy()
    false_pred[6, 6, 6] = 2
    for name, pred, ref in (("near", near_pred, near_ref), ("missed", empty, missed_ref),
                            ("false_pos", false_pred, empty)):
        _write(ref_dir, name, ref, ENDING, spacing)
        _write(pred_dir, name, pred, ENDING, spacing)
    meta = {"channel_names": {"0": "T1"}, "labels": dict(BRATS_REGION_LABELS), "file_ending": ENDING}
    return pred_dir, ref_dir, meta


def test_brats_convention_by_hand(brats_folders):
    """BraTS: Dice 1 and HD95 0 for a region absent from both, HD95 373.13 mm when exactly one side is empty,
    HD95 the larger of the two directed 95th percentiles."""
    summary = evaluate_folder(*brats_folders, convention="brats", out=False)
    metrics = {case["name"]: case["metrics"] for case in summary["per_case"]}
    # near: prediction surface distances to the reference [0, 7.5] mm -> 95th percentile 0.95 * 7.5; other way [0]
    for region in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        assert metrics["near"][region]["dice"] == pytest.approx(2 / 3)
        assert metrics["near"][region]["hd95"] == pytest.approx(0.95 * 7.5)
    assert metrics["missed"]["whole_tumor"]["dice"] == 0.0 and metrics["missed"]["whole_tumor"]["hd95"] == 373.13
    assert metrics["missed"]["tumor_core"]["dice"] == 1.0 and metrics["missed"]["tumor_core"]["hd95"] == 0.0
    assert metrics["false_pos"]["tumor_core"]["dice"] == 0.0 and metrics["false_pos"]["tumor_core"]["hd95"] == 373.13
    assert metrics["false_pos"]["enhancing_tumor"]["dice"] == 1.0
    assert metrics["false_pos"]["enhancing_tumor"]["hd95"] == 0.0
    mean = summary["mean"]
    assert mean["whole_tumor"]["dice"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert mean["whole_tumor"]["hd95"] == pytest.approx((0.95 * 7.5 + 373.13 + 373.13) / 3)
    assert mean["enhancing_tumor"]["dice"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert mean["enhancing_tumor"]["hd95"] == pytest.approx(0.95 * 7.5 / 3)
    # voxseg pools both directions, [0, 7.5] and [0]: sorted [0, 0, 7.5], 95th percentile at 1.9 -> 0.9 * 7.5;
    # a region on one side only has no HD95 (NaN, left out of the mean)
    plain = evaluate_folder(*brats_folders, convention="voxseg", out=False)
    near = next(case for case in plain["per_case"] if case["name"] == "near")
    assert near["metrics"]["whole_tumor"]["hd95"] == pytest.approx(0.9 * 7.5)
    assert plain["mean"]["whole_tumor"]["hd95"] == pytest.approx(0.9 * 7.5)
    assert plain["mean"]["whole_tumor"]["n_hd95_nan"] == 2


def test_monai_has_no_hd95_for_an_empty_prediction_even_with_the_diagonal_option():
    from voxseg.evaluate.conventions import apply_convention
    from voxseg.evaluate.metrics import binary_metrics, image_diagonal_mm

    ref = np.zeros((6, 6, 6), bool)
    ref[2:4, 2:4, 2:4] = True
    metrics = binary_metrics(np.zeros_like(ref), ref, (1.0, 2.0, 1.0), one_empty_hd95="diagonal")
    assert metrics["hd95"] == pytest.approx(image_diagonal_mm(ref.shape, (1.0, 2.0, 1.0)))
    monai = apply_convention(metrics, "monai")  # MONAI's HausdorffDistanceMetric: NaN
    assert np.isnan(monai["hd95"]) and monai["dice"] == 0.0 and monai["nsd"] == 0.0
    assert apply_convention(metrics, "brats")["hd95"] == 373.13
