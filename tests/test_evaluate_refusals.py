"""Evaluate refuses what would change the means silently: unmatched cases, undeclared or non-integer label
values, a negative tolerance; allowed on request, and then listed in summary.json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_evaluate import PLAIN_META, _write
from voxseg.errors import ConfigError, InputError
from voxseg.evaluate import evaluate_folder

ENDING = ".mha"


@pytest.fixture()
def folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:10, 2:10], ref[6:10, 2:10, 2:10] = 1, 2
    for name in ("c1", "c2"):
        _write(ref_dir, name, ref, ENDING)
        _write(pred_dir, name, ref, ENDING)
    return pred_dir, ref_dir, ref


def test_a_reference_without_prediction_is_an_error_unless_allowed(folders):
    pred_dir, ref_dir, _ = folders
    (pred_dir / f"c2{ENDING}").unlink()
    with pytest.raises(InputError, match="no prediction in .* for 1 reference case\\(s\\): c2.*allow_missing=True"):
        evaluate_folder(pred_dir, ref_dir, PLAIN_META, out=False)
    with pytest.warns(UserWarning, match="c2"):
        summary = evaluate_folder(pred_dir, ref_dir, PLAIN_META, out=False, allow_missing=True)
    assert summary["missing_predictions"] == ["c2"] and summary["counts"]["cases"] == 1


def test_a_prediction_without_reference_is_an_error_unless_allowed(folders):
    pred_dir, ref_dir, ref = folders
    _write(pred_dir, "stray", ref, ENDING)
    with pytest.raises(InputError, match="no reference in .* for 1 predicted case\\(s\\): stray"):
        evaluate_folder(pred_dir, ref_dir, PLAIN_META, out=False)
    with pytest.warns(UserWarning, match="stray"):
        evaluate_folder(pred_dir, ref_dir, PLAIN_META, allow_missing=True)
    assert json.loads((pred_dir / "summary.json").read_text())["extra_predictions"] == ["stray"]


def test_undeclared_label_values_are_an_error_unless_allowed(folders):
    pred_dir, ref_dir, ref = folders
    odd = ref.copy()
    odd[0, 0, 0] = 7
    _write(pred_dir, "c2", odd, ENDING)
    with pytest.raises(InputError, match=r"(?s)declared: \[0, 1, 2\].*c2: prediction \[7\]"):
        evaluate_folder(pred_dir, ref_dir, PLAIN_META, out=False)
    summary = evaluate_folder(pred_dir, ref_dir, PLAIN_META, out=False, allow_undeclared=True)
    assert summary["undeclared_values"] == {"c2": {"prediction": [7]}}


def test_non_integer_predictions_and_negative_tolerance_are_refused(folders):
    pred_dir, ref_dir, ref = folders
    probabilities = ref.astype(np.float32) * 0.4
    _write(pred_dir, "c1", probabilities, ENDING)
    with pytest.raises(InputError, match=f"c1{ENDING}: contains non-integer values"):
        evaluate_folder(pred_dir, ref_dir, PLAIN_META, out=False)
    _write(pred_dir, "c1", ref, ENDING)
    with pytest.raises(ConfigError, match="tolerance_mm=-1"):
        evaluate_folder(pred_dir, ref_dir, PLAIN_META, tolerance_mm=-1, out=False)
    assert evaluate_folder(pred_dir, ref_dir, PLAIN_META, tolerance_mm=0, out=False)["mean"]["a"]["nsd"] == 1.0
