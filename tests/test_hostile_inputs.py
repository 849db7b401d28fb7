"""Hostile JSON and the Python API as a front door: one reader refuses what JSON parsers take silently (duplicate
keys, deep nesting, oversized files, unreadable files), one schema check names the field of a plan that has the
wrong type or a non-finite number, nnU-Net's files with a field missing name it, and `Predictor.predict_array`
refuses what the command line refuses."""
from __future__ import annotations

import copy
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.test_export import tiny_plan
from tests.test_nnunet import PLANS, write_model_folder
from tests.test_nnunet_import import run_cli
from tests.test_predictor import make_workdir
from voxseg import jsonio
from voxseg.atomicio import os_error_message
from voxseg.data.io import Geometry, write_image
from voxseg.errors import CheckpointError, ConfigError, InputError
from voxseg.infer.inputs import find_input_cases
from voxseg.infer.predictor import Predictor
from voxseg.jsonio import parse_json, read_json
from voxseg.locks import folder_lock
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


# ----- one reader -------------------------------------------------------------------------------------------------
def test_a_key_twice_in_one_object_is_refused_by_name(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{"channel_names": {"0": "CT", "0": "MR"}, "labels": {"background": 0}}')
    with pytest.raises(ConfigError, match=r"dataset.json: key '0' appears twice in one object .*keep one"):
        read_json(path)
    dataset = tmp_path / "Dataset001_X"
    dataset.mkdir()
    (dataset / "dataset.json").write_text('{"channel_names": {"0": "CT", "0": "MR"}, "labels": {"background": 0, '
                                          '"a": 1}, "file_ending": ".nii.gz"}')
    code, _, err = run_cli("check", dataset)
    assert code != 0 and "key '0' appears twice" in err and "Traceback" not in err


def test_deep_nesting_is_refused_without_a_recursion_traceback(tmp_path):
    for depth in (100, 100_000):  # past the limit; past Python's recursion limit
        text = "[" * depth + "]" * depth
        with pytest.raises(ConfigError, match="nested"):
            parse_json(text, "x.json")
    work = make_workdir(tmp_path / "work", tiny_plan())
    (work / "plans.json").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
    code, _, err = run_cli("preprocess", work, "--device", "cpu")
    assert code != 0 and "plans.json" in err and "nested" in err and "Traceback" not in err


def test_oversized_and_unreadable_files_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text("[" + "1," * 100 + "1]")
    with pytest.raises(ConfigError, match=r"big.json is \d+ bytes, more than the 64"):
        read_json(path, max_bytes=64)
    monkeypatch.setattr(jsonio.Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "x")))
    with pytest.raises(ConfigError, match="big.json cannot be read: permission denied"):
        read_json(path)


def test_the_reader_keeps_what_json_means():
    assert parse_json('{"a": [1, 2.5, null, true], "b": {"c": "d"}}', "x") == {"a": [1, 2.5, None, True],
                                                                             "b": {"c": "d"}}
    assert parse_json("[" * 64 + "]" * 64, "x") == parse_json("[" * 64 + "]" * 64, "x")  # the limit itself is fine
    with pytest.raises(ConfigError, match="65 levels deep"):
        parse_json("[" * 65 + "]" * 65, "x")


# ----- one schema -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "named"), [
    ("target_spacing", [1.0, float("nan"), 1.0], r"target_spacing\[1\] is NaN, but target_spacing must be a list of "
                                                  "finite numbers"),
    ("target_spacing", [1.0, 1.0, float("inf")], r"target_spacing\[2\] is inf"),
    ("patch_size", "abc", "patch_size is 'abc', but patch_size must be a list of whole numbers"),
    ("batch_size", True, "batch_size is True, but batch_size must be a whole number"),
    ("batch_size", 2.5, "batch_size is 2.5"),
    ("network", {"features": [4, "x"]}, r"features\[1\] is 'x'"),
    ("normalization", [{"scheme": "zscore", "mean": float("-inf")}, {"scheme": "zscore"}],
     "mean is -inf, but mean must be a finite number or null"),
    ("target_spacing", [1.0, 0.0, 1.0], r"target_spacing \[1.0, 0.0, 1.0\] must be 3 positive spacings"),
])
def test_plan_fields_of_the_wrong_type_or_not_finite_are_named(tmp_path, field, value, named):
    data = tiny_plan().to_dict()
    data[field] = {**data["network"], **value} if field == "network" else value
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(data))  # Python writes NaN/Infinity, as a hand edit or another tool might
    with pytest.raises(ConfigError, match=named) as info:
        Plan.load(path)
    assert str(info.value).startswith(str(path))


def test_a_plan_that_is_not_an_object_and_preprocess_of_a_nan_plan(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a list, not a plan"):
        Plan.load(path)
    work = make_workdir(tmp_path / "work", tiny_plan())
    data = json.loads((work / "plans.json").read_text())
    data["target_spacing"][0] = float("nan")
    (work / "plans.json").write_text(json.dumps(data))
    code, _, err = run_cli("preprocess", work, "--device", "cpu")
    assert code != 0 and "target_spacing[0] is NaN" in err and "Traceback" not in err


def _model_folder_without(tmp_path: Path, remove) -> Path:
    """A good nnU-Net model folder whose plans.json was edited afterwards by `remove(plans)`."""
    folder, _ = write_model_folder(tmp_path / "results")
    plans = copy.deepcopy(PLANS)
    remove(plans)
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


@pytest.mark.parametrize("field", ["architecture", "patch_size", "spacing", "normalization_schemes"])
def test_an_nnunet_plans_file_missing_a_field_names_it(tmp_path, field):
    folder = _model_folder_without(tmp_path, lambda plans: plans["configurations"]["3d_fullres"].pop(field))
    with pytest.raises(CheckpointError, match=f"{folder}/plans.json: field '{field}' is missing"):
        Predictor.from_workdir(folder, device="cpu")
    code, _, err = run_cli("predict", "-m", folder, "-i", tmp_path, "-o", tmp_path / "out")
    assert code != 0 and f"'{field}' is missing" in err and "Traceback" not in err


def test_an_nnunet_architecture_without_n_stages_names_it(tmp_path):
    folder = _model_folder_without(
        tmp_path, lambda plans: plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].pop("n_stages"))
    code, _, err = run_cli("predict", "-m", folder, "-i", tmp_path, "-o", tmp_path / "out")
    assert code != 0 and "n_stages" in err and "Traceback" not in err


def test_archive_manifests_with_duplicate_keys_or_a_newer_format_are_refused(tmp_path):
    import zipfile

    from voxseg.infer.archive import export_archive, install_archive
    from voxseg.infer.install import MANIFEST

    work = make_workdir(tmp_path / "work", tiny_plan())
    archive = export_archive(work, tmp_path / "model.zip")
    with zipfile.ZipFile(archive) as handle:
        members = {n: handle.read(n) for n in handle.namelist()}
    manifest = members[MANIFEST].decode()
    for name, text, words in [("dup.zip", manifest.replace('"format":', '"format": "x", "format":', 1),
                               "key 'format' appears twice"),
                              ("new.zip", manifest.replace('"version": 3', '"version": 99'), "version 99")]:
        with zipfile.ZipFile(tmp_path / name, "w") as handle:
            for member, data in members.items():
                handle.writestr(member, text if member == MANIFEST else data)
        with pytest.raises(CheckpointError, match=words):
            install_archive(tmp_path / name, tmp_path / "target")
        assert not (tmp_path / "target").exists()


# ----- the Python API ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("api") / "work", tiny_plan())
    return Predictor.from_workdir(work, device="cpu", mirror_axes=None)


IMAGE = np.random.default_rng(0).normal(size=(2, 18, 16, 20)).astype(np.float32)


@pytest.mark.parametrize(("image", "geometry", "named"), [
    (IMAGE, (1.0, 0.0, 1.0), r"spacing \(1.0, 0.0, 1.0\) must be 3 finite positive numbers"),
    (IMAGE, (1.0, float("nan"), 1.0), "must be 3 finite positive numbers"),
    (IMAGE, (1.0, 1.0), r"spacing \(1.0, 1.0\) must be 3"),
    (IMAGE, (-1.0, 1.0, 1.0), "must be 3 finite positive numbers"),
    (IMAGE, "1,1,1", "is neither a Geometry nor 3 spacings"),
    (IMAGE[:, :0], (1.0, 1.0, 1.0), "has an empty axis"),
    (IMAGE.astype(np.complex64), (1.0, 1.0, 1.0), "dtype complex64 given; give real numbers"),
    (IMAGE.astype(object), (1.0, 1.0, 1.0), "dtype object given"),
    (np.where(IMAGE > 2, np.nan, IMAGE), (1.0, 1.0, 1.0), "NaN/Inf voxel"),
])
def test_predict_array_refuses_what_the_command_line_refuses(predictor, image, geometry, named):
    with pytest.raises(InputError, match=named):
        predictor.predict_array(image, geometry, name="api")


def test_predict_array_takes_good_input(predictor):
    labels = predictor.predict_array(IMAGE, (1.0, 1.0, 1.0))
    assert labels.shape == IMAGE.shape[1:] and labels.dtype == np.uint8
    assert np.array_equal(predictor.predict_array(IMAGE.astype(np.int16), (1, 1, 1)).shape, labels.shape)


def test_a_fold_given_twice_is_refused(tmp_path):
    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0, 1))
    with pytest.raises(ConfigError, match="folds lists fold 0 more than once"):
        Predictor.from_workdir(work, folds=[0, 0], device="cpu")
    code, _, err = run_cli("predict", "-m", work, "-i", tmp_path, "-o", tmp_path / "out", "--folds", "0,1,0")
    assert code != 0 and "fold 0 more than once" in err
    assert Path(work).is_dir()


# ----- what the operating system refuses --------------------------------------------------------------------------
@pytest.mark.parametrize(("error", "words"), [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "/data/out: permission denied: give your user"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/plans.json"), "/mnt/ro/plans.json: the file system is "
                                                                          "read-only"),
    (OSError(errno.ENOSPC, "No space left on device", "/tmp/x.npy"), "/tmp/x.npy: no space left on device"),
    (OSError("70200 requested and 14272 written"), "no space left on device"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b"), "/a/b: it does not exist"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
])
def test_os_errors_are_described_with_the_path_and_the_cause(error, words):
    assert words in os_error_message(error)


def test_an_os_error_reaches_the_user_as_a_message(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "locked" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, _, err = run_cli("synth", tmp_path / "locked" / "ds", "--cases", "2", "--shape", "16,16,16")
    assert code != 0 and "Traceback" not in err
    assert f"{tmp_path / 'locked'}" in err and "permission denied" in err


# ----- prediction inputs ------------------------------------------------------------------------------------------
def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return [folder / name for name in names]


def test_channel_files_go_in_the_order_of_their_suffixes_not_as_typed(tmp_path):
    files = _touch(tmp_path, "c_0002.nii.gz", "c_0000.nii.gz", "c_0001.nii.gz")
    assert find_input_cases(files, 3) == [("c", [tmp_path / f"c_000{i}.nii.gz" for i in range(3)])]
    brats = _touch(tmp_path / "b", "B_flair.nii.gz", "B_t1.nii.gz", "B_t2.nii.gz", "B_t1ce.nii.gz")
    name, ordered = find_input_cases(brats, 4)[0]
    assert name == "B" and [p.name for p in ordered] == ["B_t1.nii.gz", "B_t1ce.nii.gz", "B_t2.nii.gz",
                                                         "B_flair.nii.gz"]
    with pytest.raises(InputError, match=r"case 'c': channel\(s\) 0 not given \(given: c_0001.nii.gz, "
                                         r"c_0002.nii.gz\)"):  # never taken from the folder, never shifted
        find_input_cases([files[0], files[2]], 3)
    assert find_input_cases([files[1], files[2]], 3)[0][1] == [tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"]


@pytest.mark.parametrize(("names", "words"), [
    (["a_0000.nii.gz", "b_0001.nii.gz", "c_0002.nii.gz"], "belong to 3 cases"),
    (["a_0000.nii.gz", "a_0000.nii", "a_0001.nii.gz"], "channel 0 of case 'a' is given twice"),
    (["a_0000.nii.gz", "scan.nii.gz"], "cannot tell which channel"),
    (["a_t1.nii.gz", "a_0000.nii.gz"], "channel 0 of case 'a' is given twice"),
])
def test_mixtures_and_ambiguous_channel_files_are_refused(tmp_path, names, words):
    with pytest.raises(InputError, match=words):
        find_input_cases(_touch(tmp_path, *names), 2)


def test_the_input_folder_as_output_is_refused_and_other_endings_are_named(tmp_path):
    work = make_workdir(tmp_path / "work", tiny_plan())
    images = tmp_path / "images"
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    for channel in range(2):
        write_image(images / f"case_{channel:04d}.nii.gz", IMAGE[channel], geometry)
    write_image(images / "case_0000.nii", IMAGE[0], geometry)
    before = sorted(p.name for p in images.iterdir())
    code, _, err = run_cli("predict", "-m", work, "-i", images, "-o", images, "--device", "cpu")
    assert code != 0 and "is the folder the input images are read from" in err
    assert sorted(p.name for p in images.iterdir()) == before
    with pytest.warns(UserWarning, match=r"1 channel file\(s\) with another ending .* not read: case_0000.nii"):
        cases = find_input_cases(images, 2, ".nii.gz")
    assert [name for name, _ in cases] == ["case"]


def test_a_fold_outside_the_splits_is_not_told_to_be_trained(tmp_path):
    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    (work / "splits.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]))
    with pytest.raises(CheckpointError, match=r"the model has 2 folds \(0..1, splits.json\), so there is no fold 7; "
                                              r"trained folds: 0"):
        Predictor.from_workdir(work, folds=[7], device="cpu")
    with pytest.raises(CheckpointError, match=r"train this fold first: 'voxseg train .* --fold 1' "
                                              r"\(trained folds: 0\)"):
        Predictor.from_workdir(work, folds=[1], device="cpu")


# ----- two processes, one folder ----------------------------------------------------------------------------------
def test_a_fold_or_a_case_store_in_use_is_refused_naming_the_other_process(tmp_path):
    dataset, work = tmp_path / "Dataset001_L", tmp_path / "work"
    assert run_cli("synth", dataset, "--cases", "3", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    assert run_cli("plan", dataset, "-o", work, "--folds", "2", "--set", "patch_size=16,16,16", "--set",
                   "network.features=4,8,8")[0] == 0
    fold = WorkDir(work).fold(0).path
    with folder_lock(fold, "training this fold"):
        with pytest.raises(InputError, match=rf"{fold} is in use: process {os.getpid()} on .* is training this fold"):
            with folder_lock(fold, "training this fold"):
                pass
        code, _, err = run_cli("train", work, "--fold", "0", "--device", "cpu", "--epochs", "1")
        assert code != 0 and "is in use" in err and f"process {os.getpid()}" in err and "Traceback" not in err
        assert not fold.exists()  # nothing of a second run was written
    with folder_lock(WorkDir(work).preprocessed, "preprocessing into this case store"):
        code, _, err = run_cli("preprocess", work, "--device", "cpu")
        assert code != 0 and "preprocessing into this case store" in err
    with folder_lock(fold, "training this fold"):  # released when its holder let go
        pass


def test_a_plan_that_fails_to_write_leaves_the_work_directory_as_it_was(tmp_path, monkeypatch):
    from voxseg.data import planfiles as plan_module
    from voxseg.errors import DiskFullError

    dataset, work = tmp_path / "Dataset001_P", tmp_path / "work"
    assert run_cli("synth", dataset, "--cases", "3", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    tiny = ["--folds", "2", "--set", "patch_size=16,16,16", "--set", "network.features=4,8,8"]

    def full_disk(*args, **kwargs):
        raise DiskFullError("configurations.json: no space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(plan_module, "write_index", full_disk)
        code, _, err = run_cli("plan", dataset, "-o", work, *tiny)
    assert code != 0 and "no space left" in err
    assert not work.exists() or not [p for p in work.rglob("*") if p.is_file()]  # no plans.json without splits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_P"]  # no staging folder left
    assert run_cli("plan", dataset, "-o", work, *tiny)[0] == 0
    before = {p.name: p.read_bytes() for p in work.glob("*.json")}
    with monkeypatch.context() as patch:
        patch.setattr(plan_module, "write_index", full_disk)
        assert run_cli("plan", dataset, "-o", work, *tiny[:2], "--set", "patch_size=8,8,8",
                       "--set", "network.features=4,8")[0] != 0
    assert {p.name: p.read_bytes() for p in work.glob("*.json")} == before


def test_a_truncated_case_array_is_preprocessed_again_not_kept(tmp_path):
    from voxseg.data.preprocess import preprocess_dataset

    dataset, work = tmp_path / "Dataset001_T", tmp_path / "work"
    assert run_cli("synth", dataset, "--cases", "3", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    assert run_cli("plan", dataset, "-o", work, "--folds", "2", "--set", "patch_size=16,16,16", "--set",
                   "network.features=4,8,8")[0] == 0
    assert preprocess_dataset(work, progress=False)["done"] == 3
    victim = sorted(WorkDir(work).preprocessed.glob("*_seg.npy"))[0]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])  # a disk that filled up, a copy cut short
    result = preprocess_dataset(work, progress=False)
    assert (result["done"], result["skipped"]) == (1, 2)
    assert victim.read_bytes() == whole


def test_a_plan_too_large_for_the_machine_is_refused_before_anything_is_written(tmp_path):
    dataset, work = tmp_path / "Dataset001_Big", tmp_path / "work"
    assert run_cli("synth", dataset, "--cases", "3", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    assert run_cli("plan", dataset, "-o", work, "--folds", "2", "--set", "patch_size=16,16,16", "--set",
                   "network.features=4,8,8")[0] == 0
    data = json.loads((work / "plans.json").read_text())
    data["patch_size"] = [4096, 4096, 4096]  # a hand edit: 7 TB of batch
    (work / "plans.json").write_text(json.dumps(data))
    code, _, err = run_cli("train", work, "--fold", "0", "--device", "cpu", "--epochs", "1")
    assert code != 0 and "Traceback" not in err
    assert "training step needs about" in err and "[4096, 4096, 4096]" in err and "plan.patch_size" in err
    assert not WorkDir(work).training.exists()


def test_more_labels_than_training_takes_are_refused_at_check_saying_it_is_our_limit(tmp_path):
    dataset = tmp_path / "Dataset001_Many"
    assert run_cli("synth", dataset, "--cases", "2", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{f"class{i}": i for i in range(1, 201)}}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    for command in (["check", dataset], ["plan", dataset, "-o", tmp_path / "work", "--folds", "2"]):
        code, _, err = run_cli(*command)
        assert code != 0 and "201 label values (0..200)" in err and "up to 127" in err and "int8" in err
    assert not (tmp_path / "work").exists()


def test_a_single_case_dataset_is_planned_with_one_fold_without_validation(tmp_path):
    from voxseg.data.splits import get_fold

    dataset, work = tmp_path / "Dataset001_One", tmp_path / "work"
    assert run_cli("synth", dataset, "--cases", "1", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    code, out, err = run_cli("plan", dataset, "-o", work, "--set", "patch_size=16,16,16")
    assert code == 0, err
    assert "1 training case (SYN_000): no validation split is possible" in out and "--fold all" in out
    assert "--val-fraction" not in out + err
    assert get_fold(work, 0, available=["SYN_000"]) == (["SYN_000"], [])
    assert get_fold(work, "all", available=["SYN_000"]) == (["SYN_000"], ["SYN_000"])


def test_a_disk_that_fills_up_during_preprocess_says_so(tmp_path, monkeypatch):
    from voxseg.data import store
    from voxseg.data.preprocess import preprocess_dataset
    from voxseg.errors import DatasetError

    dataset, work = tmp_path / "Dataset001_Full", tmp_path / "work"
    assert run_cli("synth", dataset, "--cases", "2", "--test-cases", "0", "--shape", "16,16,16")[0] == 0
    assert run_cli("plan", dataset, "-o", work, "--folds", "2", "--set", "patch_size=16,16,16")[0] == 0

    def short_write(*args, **kwargs):
        raise OSError("70200 requested and 14272 written")  # what numpy says when the disk fills up

    monkeypatch.setattr(store.np, "save", short_write)
    with pytest.raises(DatasetError, match="no space left on device") as info:
        preprocess_dataset(work, progress=False)
    assert "requested and" not in str(info.value)
    assert not [p for p in WorkDir(work).preprocessed.iterdir() if p.name.startswith(".")]  # no temporaries left
