"""Dataset check: a matrix of broken datasets, each giving a problem that names the case, the file and the issue."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from voxseg.data.check import check_dataset
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.data.synth import make_synthetic_dataset

SHAPE = (16, 20, 18)


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "Dataset001_Syn"
    return make_synthetic_dataset(root, num_cases=3, num_test=1, shape=SHAPE, spacing=(1.5, 1.0, 1.0), seed=3)


@pytest.fixture
def dataset(clean_dataset, tmp_path):
    root = tmp_path / clean_dataset.name
    shutil.copytree(clean_dataset, root)
    return root


def _rewrite(path, change_array=None, change_geometry=None):
    array, geometry = read_image(path)
    if change_array is not None:
        array = change_array(array)
    if change_geometry is not None:
        geometry = change_geometry(geometry)
    write_image(path, array, geometry)


def _set_json(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def _flip_axis_2(geometry):
    affine = geometry.affine.copy()
    affine[:3, 2] *= -1
    return Geometry(affine)


def _stretch_axis_2(geometry):
    affine = geometry.affine.copy()
    affine[:3, 2] *= 1.2
    return Geometry(affine)


def _with_nan(array):
    array = array.astype(np.float32)
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    return array


def _with_value_7(array):
    array = array.copy()
    array[0, 0, 0] = 7  # a corner voxel, background before
    return array


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name -> (break the dataset, expected case, expected file (part of the path), words the message must contain)
BREAKERS = {
    "missing channel": (lambda r: (r / "imagesTr/SYN_001_0002.nii.gz").unlink(),
                        "SYN_001", "imagesTr/SYN_001_0002.nii.gz", ["channel file", "missing"]),
    "missing label": (lambda r: (r / "labelsTr/SYN_002.nii.gz").unlink(),
                      "SYN_002", "labelsTr/SYN_002.nii.gz", ["label file", "missing"]),
    "shape mismatch": (lambda r: _rewrite(r / "imagesTr/SYN_000_0001.nii.gz", lambda a: a[:, :, :-1]),
                       "SYN_000", "SYN_000_0001.nii.gz", ["shape (16, 20, 17)", "(16, 20, 18)"]),
    "label shape mismatch": (lambda r: _rewrite(r / "labelsTr/SYN_001.nii.gz", lambda a: a[1:]),
                             "SYN_001", "labelsTr/SYN_001.nii.gz", ["shape (15, 20, 18)"]),
    "spacing mismatch": (lambda r: _rewrite(r / "imagesTr/SYN_002_0003.nii.gz",
                                            change_geometry=_stretch_axis_2),
                         "SYN_002", "SYN_002_0003.nii.gz", ["spacing (1.5, 1.0, 1.2)", "(1.5, 1.0, 1.0)"]),
    "flipped direction": (lambda r: _rewrite(r / "labelsTr/SYN_000.nii.gz", change_geometry=_flip_axis_2),
                          "SYN_000", "labelsTr/SYN_000.nii.gz", ["direction"]),
    "shifted origin": (lambda r: _rewrite(r / "imagesTr/SYN_001_0000.nii.gz",
                                          change_geometry=lambda g: Geometry(
                                              g.affine + np.pad(np.ones((3, 1)) * 4.0, ((0, 1), (3, 0))))),
                       "SYN_001", "SYN_001_0000.nii.gz", ["origin"]),
    "unexpected label value": (lambda r: _rewrite(r / "labelsTr/SYN_001.nii.gz", _with_value_7),
                               "SYN_001", "labelsTr/SYN_001.nii.gz", ["unexpected label value(s) [7]", "[0, 1, 2, 3]"]),
    "non-integer label": (lambda r: _rewrite(r / "labelsTr/SYN_000.nii.gz", lambda a: a.astype(np.float32) + 0.5),
                          "SYN_000", "labelsTr/SYN_000.nii.gz", ["non-integer"]),
    "nan in image": (lambda r: _rewrite(r / "imagesTr/SYN_002_0001.nii.gz", _with_nan),
                     "SYN_002", "SYN_002_0001.nii.gz", ["2 NaN/Inf voxel(s)"]),
    "truncated file": (lambda r: _truncate(r / "imagesTr/SYN_000_0003.nii.gz"),
                       "SYN_000", "SYN_000_0003.nii.gz", ["unreadable", "truncated"]),
    "empty file": (lambda r: (r / "labelsTr/SYN_001.nii.gz").write_bytes(b""),
                   "SYN_001", "labelsTr/SYN_001.nii.gz", ["empty"]),
    "test case channel missing": (lambda r: (r / "imagesTs/SYN_003_0001.nii.gz").unlink(),
                                  "SYN_003", "imagesTs/SYN_003_0001.nii.gz", ["missing"]),
    "test case unreadable": (lambda r: (r / "imagesTs/SYN_003_0002.nii.gz").write_bytes(b"junk" * 50),
                             "SYN_003", "imagesTs/SYN_003_0002.nii.gz", ["unreadable"]),
    "extra channel file": (lambda r: shutil.copy(r / "imagesTr/SYN_000_0000.nii.gz",
                                                 r / "imagesTr/SYN_000_0004.nii.gz"),
                           "SYN_000", "imagesTr/SYN_000_0004.nii.gz", ["channel 4", "4 channel(s)"]),
    "labels not consecutive": (lambda r: _set_json(r, labels={"background": 0, "edema": 1, "necrosis": 2,
                                                              "enhancing": 3, "cyst": 5}),
                               None, "dataset.json", ["not consecutive", "[0, 1, 2, 3, 5]"]),
    "regions without class order": (lambda r: _set_json(r, labels={"background": 0, "whole": [1, 2, 3],
                                                                   "core": [2, 3], "enh": [3]}),
                                    None, "dataset.json", ["regions_class_order"]),
    "missing dataset.json": (lambda r: (r / "dataset.json").unlink(), None, "dataset.json",
                             ["missing", "channel_names"]),
    "broken dataset.json": (lambda r: (r / "dataset.json").write_text("{not json"), None, "dataset.json",
                            ["not valid JSON"]),
}


def test_clean_dataset_is_ok(dataset):
    report = check_dataset(dataset)
    assert report.ok and report.problems == []
    assert (report.num_cases, report.num_test_cases) == (3, 1)
    assert report.format().startswith("OK: 3 training and 1 test case(s)")


@pytest.mark.parametrize("name", list(BREAKERS))
def test_broken_dataset_is_reported(dataset, name):
    breaker, case, file, words = BREAKERS[name]
    breaker(dataset)
    report = check_dataset(dataset)
    assert not report.ok
    assert len(report.errors) == 1, report.format()  # exactly the one thing broken, nothing spurious
    problem = report.errors[0]
    assert problem.case == case
    assert file in problem.file
    for word in words:
        assert word in problem.message, problem.message
    lines = report.format().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("FAILED: 1 error(s)")
    assert file in lines[0] and (case is None or case in lines[0])


def test_num_training_mismatch_is_a_warning(dataset):
    _set_json(dataset, numTraining=5)
    report = check_dataset(dataset)
    assert report.ok
    assert [(p.severity, p.file) for p in report.problems] == [("warning", "dataset.json")]
    assert "numTraining is 5 but 3" in report.problems[0].message
    assert report.format().splitlines()[-1].startswith("OK with warnings: 0 error(s), 1 warning(s)")


def test_stray_file_is_a_warning(dataset):
    (dataset / "imagesTr" / "notes.txt").write_text("scan protocol")
    report = check_dataset(dataset)
    assert report.ok and len(report.warnings) == 1 and "notes.txt" in report.warnings[0].file


def test_all_problems_are_reported_and_workers_agree(dataset):
    for name in ("missing channel", "nan in image", "truncated file", "unexpected label value",
                 "test case channel missing"):
        BREAKERS[name][0](dataset)
    _set_json(dataset, numTraining=4)
    serial = check_dataset(dataset)
    parallel = check_dataset(dataset, num_workers=3)
    assert serial.problems == parallel.problems
    assert len(serial.errors) == 5 and len(serial.warnings) == 1
    assert [p.case for p in serial.errors] == ["SYN_000", "SYN_001", "SYN_001", "SYN_002", "SYN_003"]  # case order


def test_label_checks_count_region_members(dataset):
    _set_json(dataset, labels={"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]},
              regions_class_order=[1, 2, 3])
    assert check_dataset(dataset).ok
    _rewrite(dataset / "labelsTr/SYN_000.nii.gz", lambda a: np.where(a == 1, 4, a).astype(a.dtype))
    report = check_dataset(dataset)
    assert [p.case for p in report.errors] == ["SYN_000"] and "[4]" in report.errors[0].message


@pytest.mark.parametrize("changes, words", [
    ({"labels": {"background": 0, "tumour": "one"}}, ["must map names to integers"]),
    ({"channel_names": ["T1", "T1ce", "T2", "FLAIR"]}, ["channel_names", "\"0\""]),
    ({"file_ending": ".nrrd"}, ["no training cases found", ".nrrd"]),
])
def test_bad_dataset_json_fields_are_problems_not_crashes(dataset, changes, words):
    _set_json(dataset, **changes)
    report = check_dataset(dataset)
    assert not report.ok
    assert any(all(word in p.message for word in words) for p in report.errors), report.format()


def _zero_axis_1(geometry):
    affine = geometry.affine.copy()
    affine[:3, 1] = 0.0
    return Geometry(affine)


def _metres(geometry):
    affine = geometry.affine.copy()
    affine[:3, :3] *= 1000.0
    return Geometry(affine)


def test_zero_spacing_is_reported_as_such_not_as_a_direction_difference(dataset, monkeypatch):
    import voxseg.data.check as check_module

    def read_with_a_zero_voxel_size(path):  # NIfTI writers refuse such a header, a broken file can hold one
        array, geometry = read_image(path)
        return array, (_zero_axis_1(geometry) if path.name == "SYN_001_0000.nii.gz" else geometry)

    monkeypatch.setattr(check_module, "read_image", read_with_a_zero_voxel_size)
    report = check_dataset(dataset)
    messages = [p.message for p in report.errors if p.case == "SYN_001"]
    assert any("spacing is zero along array axis [1]" in m for m in messages), messages
    assert not any("direction" in m for m in messages)


def test_implausible_spacing_is_a_warning(dataset):
    for path in sorted(dataset.glob("*Tr/SYN_002*.nii.gz")):
        _rewrite(path, change_geometry=_metres)
    report = check_dataset(dataset)
    warnings = [p for p in report.warnings if p.case == "SYN_002" and "outside 0.001..100.0 mm" in p.message]
    assert warnings and report.ok


def test_training_labels_that_are_all_background_are_an_error(dataset):
    for path in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        _rewrite(path, change_array=lambda array: np.zeros_like(array))
    report = check_dataset(dataset)
    assert not report.ok
    assert any(p.file == "labelsTr" and "background (0) only" in p.message for p in report.errors)


def test_one_background_only_case_is_fine(dataset):
    _rewrite(dataset / "labelsTr/SYN_000.nii.gz", change_array=lambda array: np.zeros_like(array))
    assert not any("background (0) only" in p.message for p in check_dataset(dataset).problems)
