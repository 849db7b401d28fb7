"""Evaluation conventions: how a class absent from the reference scores under voxseg, nnunet, monai and brats."""
from __future__ import annotations

import numpy as np
import pytest

from voxseg.errors import ConfigError
from voxseg.evaluate import evaluate_folder, format_table
from tests.test_evaluate import PLAIN_META, _write

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


@pytest.mark.parametrize("convention, both_dice, fp_dice, fp_hd95, mean_dice", [
    ("voxseg", 1.0, 0.0, None, 0.5),
    ("nnunet", None, 0.0, None, 0.0),
    ("monai", None, None, None, None),
    ("brats", 1.0, 0.0, 373.13, 0.5),
])
def test_a_class_absent_from_the_reference(folders, convention, both_dice, fp_dice, fp_hd95, mean_dice):
    summary = evaluate_folder(*folders, PLAIN_META, convention=convention, out=False)
    assert _b(summary, "both")["dice"] == both_dice
    assert _b(summary, "fp")["dice"] == fp_dice and _b(summary, "fp")["hd95"] == fp_hd95
    assert summary["mean"]["b"]["dice"] == mean_dice
    assert summary["convention"] == convention and summary["conventions"]["empty_classes"]["name"] == convention
    assert f"convention: {convention}" in format_table(summary)


def test_unknown_convention(folders):
    with pytest.raises(ConfigError, match="convention 'itk' is unknown; use one of voxseg, nnunet, monai, brats"):
        evaluate_folder(*folders, PLAIN_META, convention="itk", out=False)
