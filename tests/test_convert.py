"""BraTS and Decathlon folders -> nnU-Net v2 layout."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from voxseg.data.check import check_dataset
from voxseg.data.convert import convert_brats, convert_msd
from voxseg.data.dataset import load_dataset
from voxseg.data.io import read_image
from voxseg.errors import DatasetError

MODALITIES = ("t1", "t1ce", "t2", "flair")
SHAPE = (10, 12, 8)  # nibabel (x, y, z)


def _affine() -> np.ndarray:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # the usual BraTS LPS-like orientation
    affine[:3, 3] = [120.0, 119.0, -5.0]
    return affine


def _write_brats_case(root, name, seg_values=(0, 1, 2, 4), with_seg=True, skip=()):
    """One tiny case; channel c holds c + its voxel index so files can be told apart."""
    folder = root / name
    folder.mkdir(parents=True)
    base = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    for channel, modality in enumerate(MODALITIES):
        if modality not in skip:
            nib.save(nib.Nifti1Image(base + 1000 * channel, _affine()), str(folder / f"{name}_{modality}.nii.gz"))
    if with_seg:
        seg = np.zeros(SHAPE, dtype=np.uint8)
        for index, value in enumerate(seg_values):  # one slab per value, at known positions
            seg[index * 2: index * 2 + 2] = value
        nib.save(nib.Nifti1Image(seg, _affine()), str(folder / f"{name}_seg.nii.gz"))


@pytest.fixture
def brats_folder(tmp_path):
    src = tmp_path / "BraTS2021"
    for index in range(2):
        _write_brats_case(src, f"BraTS2021_{index:05d}")
    _write_brats_case(src, "BraTS2021_00099", with_seg=False)  # validation case: no seg
    return src


def test_brats_labels_are_mapped_and_regions_declared(brats_folder, tmp_path):
    dst = convert_brats(brats_folder, tmp_path / "Dataset100_BraTS")
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
    assert meta["regions_class_order"] == [1, 2, 3]
    assert meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    seg = nib.load(str(dst / "labelsTr" / "BraTS2021_00001.nii.gz"))
    data = np.asanyarray(seg.dataobj)
    assert data.dtype == np.uint8
    # slabs held BraTS 0, 1 (necrosis), 2 (edema), 4 (enhancing) -> 0, 2, 1, 3
    assert [int(data[i * 2, 0, 0]) for i in range(4)] == [0, 2, 1, 3]
    assert (data[8:] == 0).all()
    np.testing.assert_allclose(seg.affine, _affine())


def test_brats_channel_order_and_test_cases(brats_folder, tmp_path):
    dst = convert_brats(brats_folder, tmp_path / "out")
    dataset = load_dataset(dst)
    assert [c.name for c in dataset.cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert [c.name for c in dataset.test_cases] == ["BraTS2021_00099"]
    for channel, modality in enumerate(MODALITIES):
        converted = dst / "imagesTr" / f"BraTS2021_00000_{channel:04d}.nii.gz"
        original = brats_folder / "BraTS2021_00000" / f"BraTS2021_00000_{modality}.nii.gz"
        assert converted.read_bytes() == original.read_bytes()
        assert int(np.asanyarray(nib.load(str(converted)).dataobj)[0, 0, 0]) == 1000 * channel
    assert not (dst / "labelsTr" / "BraTS2021_00099.nii.gz").exists()
    report = check_dataset(dst)
    assert report.ok, report.format()


@pytest.mark.parametrize("link", [True, False])
def test_brats_images_linked_or_copied(brats_folder, tmp_path, link):
    dst = convert_brats(brats_folder, tmp_path / "out", link=link)
    converted = dst / "imagesTr" / "BraTS2021_00001_0003.nii.gz"
    original = brats_folder / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz"
    assert os.path.samefile(converted, original) == link  # a hard link (same file system) or an independent copy
    assert converted.read_bytes() == original.read_bytes()
    assert not [p for p in (dst / "imagesTr").iterdir() if p.name.startswith(".tmp")]


def test_brats_rerun_replaces_outputs(brats_folder, tmp_path):
    convert_brats(brats_folder, tmp_path / "out")
    dst = convert_brats(brats_folder, tmp_path / "out")
    assert len(list((dst / "imagesTr").iterdir())) == 8 and len(list((dst / "labelsTr").iterdir())) == 2


def test_not_a_brats_folder(tmp_path):
    src = tmp_path / "random"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="not a BraTS folder"):
        convert_brats(src, tmp_path / "out")
    with pytest.raises(DatasetError, match="not found"):
        convert_brats(tmp_path / "absent", tmp_path / "out")


def test_missing_modality_is_named(tmp_path):
    src = tmp_path / "brats"
    _write_brats_case(src, "BraTS2021_00000")
    _write_brats_case(src, "BraTS2021_00007", skip=("flair", "t1ce"))
    with pytest.raises(DatasetError, match=r"BraTS2021_00007 \(no t1ce, flair\)"):
        convert_brats(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-converted


def test_unexpected_brats_label_value(tmp_path):
    src = tmp_path / "brats"
    _write_brats_case(src, "BraTS2021_00000", seg_values=(0, 1, 5))
    with pytest.raises(DatasetError, match=r"BraTS2021_00000_seg.nii.gz: unexpected label values \[5"):
        convert_brats(src, tmp_path / "out")


# ----- Medical Segmentation Decathlon ------------------------------------------------------------------------

def _msd_affine() -> np.ndarray:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.0])
    affine[:3, 3] = [-40.0, 12.5, 7.25]
    return affine


def _make_msd(root, num_channels=3, image_channels=None):
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    images = {}
    for name, folder in (("BRATS_001", "imagesTr"), ("BRATS_002", "imagesTr"), ("BRATS_005", "imagesTs")):
        data = rng.integers(0, 3000, size=SHAPE + (image_channels or num_channels,)).astype(np.int16)
        images[name] = data
        nib.save(nib.Nifti1Image(data, _msd_affine()), str(root / folder / f"{name}.nii.gz"))
        if folder == "imagesTr":
            label = rng.integers(0, 3, size=SHAPE).astype(np.uint8)
            nib.save(nib.Nifti1Image(label, _msd_affine()), str(root / "labelsTr" / f"{name}.nii.gz"))
    meta = {
        "name": "BRATS", "description": "tiny fake", "reference": "test", "tensorImageSize": "4D",
        "modality": {str(i): name for i, name in enumerate(["FLAIR", "T1w", "t1gd", "T2w"][:num_channels])},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": 2, "numTest": 1,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                     for n in ("BRATS_001", "BRATS_002")],
        "test": ["./imagesTs/BRATS_005.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return images


def test_msd_split_keeps_data_and_geometry(tmp_path):
    src = tmp_path / "Task01_BrainTumour"
    images = _make_msd(src)
    dst = convert_msd(src, tmp_path / "Dataset001")
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["reference"] == "test"
    for name, folder in (("BRATS_002", "imagesTr"), ("BRATS_005", "imagesTs")):
        for channel in range(3):
            part = nib.load(str(dst / folder / f"{name}_{channel:04d}.nii.gz"))
            assert part.shape == SHAPE
            data = np.asanyarray(part.dataobj)
            assert data.dtype == np.int16
            np.testing.assert_array_equal(data, images[name][..., channel])
            np.testing.assert_allclose(part.affine, _msd_affine(), atol=1e-5)
    label = dst / "labelsTr" / "BRATS_001.nii.gz"
    assert label.read_bytes() == (src / "labelsTr" / "BRATS_001.nii.gz").read_bytes()
    # every channel and the label lie on the same grid as voxseg reads it
    _, label_geometry = read_image(label)
    _, channel_geometry = read_image(dst / "imagesTr" / "BRATS_001_0002.nii.gz")
    assert channel_geometry.allclose(label_geometry)
    np.testing.assert_allclose(channel_geometry.spacing, (2.0, 1.1, 0.9), rtol=1e-5)
    report = check_dataset(dst)
    assert report.ok, report.format()


def test_msd_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json: missing"):
        convert_msd(tmp_path, tmp_path / "out")
    wrong_channels = tmp_path / "wrong"
    _make_msd(wrong_channels, num_channels=4, image_channels=2)
    with pytest.raises(DatasetError, match=r"BRATS_001.nii.gz: image shape \(10, 12, 8, 2\) does not hold the 4"):
        convert_msd(wrong_channels, tmp_path / "out")
    missing = tmp_path / "missing"
    _make_msd(missing)
    (missing / "imagesTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match="BRATS_002.nii.gz: listed in dataset.json but not found"):
        convert_msd(missing, tmp_path / "out2")
    not_msd = tmp_path / "nnunet"
    not_msd.mkdir()
    (not_msd / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    with pytest.raises(DatasetError, match="missing key"):
        convert_msd(not_msd, tmp_path / "out3")


def test_link_falls_back_to_symlink_then_copy(brats_folder, tmp_path, monkeypatch):
    def no_hardlinks(*args, **kwargs):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_hardlinks)
    dst = convert_brats(brats_folder, tmp_path / "symlinked")
    converted = dst / "imagesTr" / "BraTS2021_00000_0001.nii.gz"
    assert converted.is_symlink() and os.path.samefile(
        converted, brats_folder / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz")
    monkeypatch.setattr(os, "symlink", no_hardlinks)
    dst = convert_brats(brats_folder, tmp_path / "copied")
    converted = dst / "imagesTr" / "BraTS2021_00000_0001.nii.gz"
    assert not converted.is_symlink() and converted.stat().st_nlink == 1
    assert converted.read_bytes() == (brats_folder / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz").read_bytes()


def test_synthetic_brats_round_trip(tmp_path):
    """BraTS layout written by the generator converts back to the generator's own labels."""
    from voxseg.data.synth import make_synthetic_dataset

    brats = make_synthetic_dataset(tmp_path / "brats", num_cases=2, num_test=1, shape=(16, 16, 16), seed=9,
                                   layout="brats")
    ours = make_synthetic_dataset(tmp_path / "ours", num_cases=2, num_test=1, shape=(16, 16, 16), seed=9)
    dst = convert_brats(brats, tmp_path / "converted")
    for index in range(2):
        converted, _ = read_image(dst / "labelsTr" / f"BraTS2021_{index:05d}.nii.gz")
        expected, _ = read_image(ours / "labelsTr" / f"SYN_{index:03d}.nii.gz")
        np.testing.assert_array_equal(converted, expected)
    assert [c.name for c in load_dataset(dst).test_cases] == ["BraTS2021_00002"]
    assert check_dataset(dst).ok
