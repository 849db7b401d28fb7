"""Folder evaluation (labels, regions, summary files, missing/mismatched predictions) and fold aggregation."""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from voxseg.data.io import Geometry, write_image
from voxseg.errors import InputError
from voxseg.evaluate import aggregate_folds, compute_case_metrics, evaluate_folder, format_table

SPACING = (1.5, 1.0, 0.8)
REGION_META = {
    "channel_names": {"0": "T1"},
    "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3},
    "regions_class_order": [1, 2, 3],
    "file_ending": ".nii.gz",
}
PLAIN_META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".mha"}


def _tumour(with_enhancing: bool = True) -> np.ndarray:
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[3:13, 3:13, 3:13] = 1  # edema
    seg[5:11, 5:11, 5:11] = 2  # core
    if with_enhancing:
        seg[7:9, 7:9, 7:9] = 3
    return seg


def _write(folder: Path, name: str, array: np.ndarray, ending: str, spacing=SPACING) -> Path:
    path = folder / f"{name}{ending}"
    write_image(path, array, Geometry.from_spacing(spacing))
    return path


@pytest.fixture()
def region_folders(tmp_path):
    """Three BraTS-like cases: perfect, enhancing predicted as core, and no enhancing in either."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    refs = {"case_a": _tumour(), "case_b": _tumour(), "case_c": _tumour(with_enhancing=False)}
    preds = {"case_a": _tumour(), "case_b": _tumour(with_enhancing=False), "case_c": _tumour(with_enhancing=False)}
    for name in refs:
        _write(ref_dir, name, refs[name], ".nii.gz")
        _write(pred_dir, name, preds[name], ".nii.gz")
    return pred_dir, ref_dir, refs, preds


def test_region_dataset_summary_numbers(region_folders):
    pred_dir, ref_dir, refs, preds = region_folders
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META, tolerance_mm=1.0)
    assert list(summary["classes"]) == ["whole_tumor", "tumor_core", "enhancing", "label_1", "label_2"]
    assert summary["classes"]["whole_tumor"] == {"values": [1, 2, 3], "kind": "region"}
    assert summary["foreground_classes"] == ["whole_tumor", "tumor_core", "enhancing"]
    assert summary["counts"] == {"cases": 3, "references": 3, "missing_predictions": 0}
    mean = summary["mean"]
    # enhancing: perfect (1), missed (0, HD95 NaN), both empty (1, HD95 0)
    assert mean["enhancing"]["dice"] == pytest.approx(2 / 3)
    assert mean["enhancing"]["n_hd95_nan"] == 1 and mean["enhancing"]["hd95"] == 0.0
    assert mean["enhancing"]["n_ref_empty"] == 1 and mean["enhancing"]["n_pred_empty"] == 2
    assert mean["whole_tumor"]["dice"] == 1.0 and mean["tumor_core"]["dice"] == 1.0
    # label 2 of case_b: 6^3 - 2^3 = 208 reference voxels, the 8 enhancing ones predicted as 2 too
    assert mean["label_2"]["dice"] == pytest.approx((1 + 2 * 208 / (2 * 208 + 8) + 1) / 3)
    assert summary["foreground_mean"]["dice"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert summary["foreground_mean"]["classes"] == ["whole_tumor", "tumor_core", "enhancing"]
    # per case numbers are exactly compute_case_metrics on the arrays, with the reference spacing
    case_b = next(c for c in summary["per_case"] if c["name"] == "case_b")
    classes = {name: spec["values"] for name, spec in summary["classes"].items()}
    expected = compute_case_metrics(preds["case_b"], refs["case_b"], SPACING, classes, tolerance_mm=1.0)
    for name in classes:
        for metric, value in expected[name].items():
            got = case_b["metrics"][name][metric]
            assert (got is None and math.isnan(value)) or got == pytest.approx(value, rel=1e-6), (name, metric)


def test_summary_files_match_result(region_folders):
    pred_dir, ref_dir, _, _ = region_folders
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META)
    on_disk = json.loads((pred_dir / "summary.json").read_text())  # strict JSON: NaN is null
    assert on_disk == json.loads(json.dumps(summary))
    case_b = next(c for c in on_disk["per_case"] if c["name"] == "case_b")
    assert case_b["metrics"]["enhancing"]["hd95"] is None
    assert on_disk["conventions"]["both_empty"]["dice"] == 1.0
    with open(pred_dir / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 5
    row = next(r for r in rows if r["case"] == "case_b" and r["class"] == "enhancing")
    assert float(row["dice"]) == 0.0 and math.isnan(float(row["hd95"])) and int(row["fn"]) == 8
    table = format_table(summary)
    assert "whole_tumor" in table and "0.6667" in table and "foreground mean" in table


def test_regions_false_skips_dataset_regions(region_folders):
    pred_dir, ref_dir, _, _ = region_folders
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META, regions=False, out=False)
    assert list(summary["classes"]) == ["enhancing", "label_1", "label_2"]
    assert not (pred_dir / "summary.json").exists()


def test_plain_labels_extra_region_missing_prediction_and_out_dir(tmp_path):
    ref_dir, pred_dir, out = tmp_path / "labelsTr", tmp_path / "pred", tmp_path / "eval"
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:10, 2:10], ref[6:10, 2:10, 2:10] = 1, 2
    pred = ref.copy()
    pred[ref == 2] = 1  # all of b predicted as a
    for name in ("c1", "c2", "c3"):
        _write(ref_dir, name, ref, ".mha")
    for name in ("c1", "c3"):
        _write(pred_dir, name, pred, ".mha")
    (tmp_path / "dataset.json").write_text(json.dumps(PLAIN_META))  # found next to labelsTr
    with pytest.warns(UserWarning, match="c2"):
        summary = evaluate_folder(pred_dir, ref_dir, regions={"ab": [1, 2]}, out=out, allow_missing=True)
    assert summary["missing_predictions"] == ["c2"]
    assert [c["name"] for c in summary["per_case"]] == ["c1", "c3"]
    assert summary["classes"]["ab"]["kind"] == "extra_region"
    assert summary["mean"]["a"]["dice"] == pytest.approx(2 * 256 / (256 + 512))
    assert summary["mean"]["b"]["dice"] == 0.0 and summary["mean"]["b"]["hd95"] is None
    assert summary["mean"]["b"]["n_hd95_nan"] == 2
    assert summary["mean"]["ab"]["dice"] == 1.0
    # the extra region is reported but is not part of the foreground mean
    assert summary["foreground_mean"]["dice"] == pytest.approx((2 * 256 / 768 + 0.0) / 2)
    assert (out / "summary.json").is_file() and (out / "summary.csv").is_file()
    assert not (pred_dir / "summary.json").exists()


def test_shape_and_geometry_mismatch_name_the_file(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    _write(ref_dir, "case_x", _tumour(), ".nii.gz")
    _write(pred_dir, "case_x", np.zeros((16, 16, 15), np.uint8), ".nii.gz")
    with pytest.raises(InputError, match=r"case_x\.nii\.gz.*shape"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META)
    _write(pred_dir, "case_x", _tumour(), ".nii.gz", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match=r"case_x\.nii\.gz.*geometry"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META)


def test_no_labels_and_no_matches_are_clear_errors(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    _write(ref_dir, "case_x", _tumour(), ".nii.gz")
    pred_dir.mkdir()
    with pytest.raises(InputError, match="labels"):
        evaluate_folder(pred_dir, ref_dir)
    with pytest.raises(InputError, match="none of the 1 references"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_folder(pred_dir, ref_dir, labels=[1, 2, 3])


def test_parallel_workers_give_same_result(region_folders):
    pred_dir, ref_dir, _, _ = region_folders
    serial = evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META, out=False)
    parallel = evaluate_folder(pred_dir, ref_dir, dataset_json=REGION_META, out=False, num_workers=2)
    assert parallel["per_case"] == serial["per_case"] and parallel["mean"] == serial["mean"]


# ----- cross-validation aggregation ---------------------------------------------------------------------------
def _workdir_with_folds(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    raw, workdir = tmp_path / "raw", tmp_path / "work"
    refs = {"case_a": _tumour(), "case_b": _tumour(), "case_c": _tumour(with_enhancing=False)}
    for name, seg in refs.items():
        _write(raw / "labelsTr", name, seg, ".nii.gz")
    (raw / "dataset.json").write_text(json.dumps(REGION_META))
    workdir.mkdir()
    (workdir / "dataset.json").write_text(json.dumps(REGION_META))
    (workdir / "plans.json").write_text(json.dumps({"raw_dataset": str(raw), "file_ending": ".nii.gz"}))
    fold_cases = {0: ["case_a"], 1: ["case_b", "case_c"]}
    for fold, names in fold_cases.items():
        for name in names:
            pred = _tumour(with_enhancing=False) if name == "case_b" else refs[name]
            _write(workdir / "training" / f"fold_{fold}" / "validation", name, pred, ".nii.gz")
    return workdir, refs


def test_aggregate_folds(tmp_path):
    workdir, _ = _workdir_with_folds(tmp_path)
    crossval = workdir / "training" / "crossval"
    crossval.mkdir(parents=True)
    _write(crossval, "stale_case", _tumour(), ".nii.gz")  # left over from an earlier run
    summary = aggregate_folds(workdir, folds=[0, 1])
    assert summary["folds"] == [0, 1]
    assert sorted(p.name for p in crossval.glob("*.nii.gz")) == ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"]
    assert [c["name"] for c in summary["per_case"]] == ["case_a", "case_b", "case_c"]
    assert summary["mean"]["enhancing"]["dice"] == pytest.approx(2 / 3)
    on_disk = json.loads((crossval / "summary.json").read_text())
    assert on_disk["folds"] == [0, 1] and on_disk["counts"]["cases"] == 3


def test_aggregate_folds_missing_fold_is_named(tmp_path):
    workdir, _ = _workdir_with_folds(tmp_path)
    with pytest.raises(InputError, match="fold 2 has no validation predictions"):
        aggregate_folds(workdir, folds=[0, 1, 2])
