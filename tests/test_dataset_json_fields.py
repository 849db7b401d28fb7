"""Every dataset.json field nnU-Net v2 accepts is read or refused by name (voxseg/data/dataset.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.test_nnunet import DATASET, PLANS
from voxseg.data.check import check_dataset
from voxseg.data.dataset import load_dataset, read_dataset_json
from voxseg.data.synth import make_synthetic_dataset
from voxseg.errors import CheckpointError, DatasetError
from voxseg.infer.nnunet import plan_from_nnunet


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw") / "Dataset001_Tiny", num_cases=3,
                                  shape=(16, 16, 16), seed=2)


def _with(raw, tmp_path, **changes):
    """A copy of the dataset with dataset.json entries changed (None removes one)."""
    copy = tmp_path / raw.name
    shutil.copytree(raw, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (copy / "dataset.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("ending", [".nii", ".mha", ".nrrd"])
def test_file_endings_voxseg_reads(ending, tmp_path):
    root = make_synthetic_dataset(tmp_path / "D", num_cases=2, shape=(16, 16, 16), seed=3, file_ending=ending)
    report = check_dataset(root)
    assert report.ok, report.format()
    assert [c.name for c in load_dataset(root).cases] == ["SYN_000", "SYN_001"]
    assert load_dataset(root).cases[0].image_files[0].name == f"SYN_000_0000{ending}"


@pytest.mark.parametrize("ending, says", [
    (".png", "2D natural images"), (".bmp", "2D natural images"), (".tif", "TIFF images"),
    (".tiff", "TIFF images"), (".gipl", "GIPL images"), (".jpg", "a format"),
])
def test_file_endings_voxseg_does_not_read_are_refused(raw, tmp_path, ending, says):
    root = _with(raw, tmp_path, file_ending=ending)
    with pytest.raises(DatasetError, match=rf"file_ending '{ending}' is .*{says}.*convert"):
        read_dataset_json(root)
    assert not check_dataset(root).ok  # `voxseg check` reports it instead of crashing


def test_file_ending_without_its_dot_is_refused(raw, tmp_path):
    with pytest.raises(DatasetError, match="file_ending 'nii.gz' lacks its leading dot: write \".nii.gz\""):
        read_dataset_json(_with(raw, tmp_path, file_ending="nii.gz"))


@pytest.mark.parametrize("reader", ["SimpleITKIO", "NibabelIO", "None"])
def test_readers_that_give_voxsegs_arrays_are_read(raw, tmp_path, reader):
    assert len(load_dataset(_with(raw, tmp_path, overwrite_image_reader_writer=reader)).cases) == 3


@pytest.mark.parametrize("reader, says", [
    ("NibabelIOWithReorient", "reorients every image to RAS"), ("NaturalImage2DIO", "2D natural images"),
    ("Tiff3DIO", "TIFF|.tif stacks"), ("MyCompanyIO", "a reader voxseg does not know"),
])
def test_other_readers_are_refused_by_name(raw, tmp_path, reader, says):
    root = _with(raw, tmp_path, overwrite_image_reader_writer=reader)
    with pytest.raises(DatasetError, match=rf"overwrite_image_reader_writer '{reader}' .*({says})"):
        load_dataset(root)
    # an nnU-Net model trained with such a reader is refused too: its inputs were read differently
    with pytest.raises(CheckpointError, match=reader):
        plan_from_nnunet(PLANS, dict(DATASET, overwrite_image_reader_writer=reader), "3d_fullres")


def test_num_training_is_compared_with_the_cases_found(raw, tmp_path):
    report = check_dataset(_with(raw, tmp_path, numTraining=5))
    assert report.ok  # a warning: the cases on disk are used
    assert any("numTraining is 5 but 3 training case(s)" in p.message for p in report.warnings)
    assert not check_dataset(raw).warnings


def test_modality_is_read_as_channel_names(raw, tmp_path):
    meta = json.loads((raw / "dataset.json").read_text())
    root = _with(raw, tmp_path, modality=meta["channel_names"], channel_names=None)
    dataset = load_dataset(root)
    assert dataset.channel_names == meta["channel_names"] and dataset.num_channels == 4


def test_explicit_file_list_of_the_standard_layout_is_read(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("VOXSEG_TEST_RAW", str(tmp_path / raw.name))
    listed = {
        "SYN_000": {"images": [f"imagesTr/SYN_000_{c:04d}.nii.gz" for c in range(4)],
                    "label": "labelsTr/SYN_000.nii.gz"},
        "SYN_002": {"images": [f"$VOXSEG_TEST_RAW/imagesTr/SYN_002_{c:04d}.nii.gz" for c in range(4)],
                    "label": str(tmp_path / raw.name / "labelsTr" / "SYN_002.nii.gz")},
    }
    dataset = load_dataset(_with(raw, tmp_path, dataset=listed, numTraining=2))
    assert [c.name for c in dataset.cases] == ["SYN_000", "SYN_002"]  # the listed cases only, as nnU-Net reads them
    assert dataset.cases[1].label_file == tmp_path / raw.name / "labelsTr" / "SYN_002.nii.gz"
    assert check_dataset(tmp_path / raw.name).ok


def test_explicit_files_elsewhere_are_refused(raw, tmp_path):
    listed = {"SYN_000": {"images": ["elsewhere/a.nii.gz", "b", "c", "d"], "label": "labelsTr/SYN_000.nii.gz"}}
    with pytest.raises(DatasetError, match=r"lists elsewhere/a.nii.gz for case SYN_000.*move or link.*"
                                           r"imagesTr/SYN_000_0000.nii.gz for this one"):
        load_dataset(_with(raw, tmp_path, dataset=listed))
    bad = {"SYN_000": {"images": ["imagesTr/SYN_000_0000.nii.gz"], "label": "labelsTr/SYN_000.nii.gz"}}
    with pytest.raises(DatasetError, match=r"case SYN_000 needs \"images\" \(one file per channel, 4\)"):
        load_dataset(_with(raw, tmp_path / "b", dataset=bad))
