"""Synthetic brain-tumour cases and datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from voxseg.data.dataset import load_dataset
from voxseg.data.io import read_image
from voxseg.data.synth import generate_case, make_synthetic_dataset
from voxseg.errors import ConfigError

T1, T1CE, T2, FLAIR = range(4)


def test_same_seed_same_case_and_different_seeds_differ():
    image_a, seg_a = generate_case((20, 24, 16), seed=7)
    image_b, seg_b = generate_case((20, 24, 16), seed=7)
    image_c, seg_c = generate_case((20, 24, 16), seed=8)
    assert image_a.shape == (4, 20, 24, 16) and image_a.dtype == np.float32
    assert seg_a.shape == (20, 24, 16) and seg_a.dtype == np.uint8
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(seg_a, seg_b)
    assert not np.array_equal(seg_a, seg_c)
    assert np.abs(image_a - image_c).mean() > 1.0


def test_labels_present_and_about_a_fifth_without_enhancing():
    label_sets = [set(np.unique(generate_case((32, 32, 32), seed=seed)[1]).tolist()) for seed in range(20)]
    assert all(labels <= {0, 1, 2, 3} for labels in label_sets)
    assert all({0, 1, 2} <= labels for labels in label_sets)
    without_enhancing = sum(3 not in labels for labels in label_sets)
    assert 1 <= without_enhancing <= 8


@pytest.mark.parametrize("enhancing, expected", [(True, {0, 1, 2, 3}), (False, {0, 1, 2})])
def test_enhancing_can_be_forced(enhancing, expected):
    for seed in range(3):
        _, seg = generate_case((24, 24, 24), seed=seed, enhancing=enhancing)
        assert set(np.unique(seg).tolist()) == expected


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 32, 20)])
def test_zero_outside_the_brain_and_tumour_inside_it(shape):
    for seed in range(4):
        image, seg = generate_case(shape, seed=seed)
        brain = image[0] > 0
        for channel in range(4):  # one brain mask shared by all channels, strictly positive inside
            np.testing.assert_array_equal(image[channel] > 0, brain)
        assert (image[:, ~brain] == 0).all()
        assert brain[seg > 0].all()
        # there is background to crop on every side
        corners = image[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
        assert (corners == 0).all()
        occupied = np.argwhere(brain)
        assert (occupied.min(0) > 0).all() and (occupied.max(0) < np.array(shape) - 1).all()
        assert 0.15 < brain.mean() < 0.5


def _mean_by_label(num_cases: int = 4, shape=(40, 40, 40)) -> np.ndarray:
    """(4 labels with 0 = healthy brain, 4 channels) means of per-case normalised intensities."""
    means = np.zeros((4, 4))
    for seed in range(num_cases):
        image, seg = generate_case(shape, seed=seed, enhancing=True)
        brain = image[0] > 0
        for channel in range(4):
            normalised = image[channel] / image[channel][brain].mean()
            means[0, channel] += normalised[brain & (seg == 0)].mean() / num_cases
            for label in (1, 2, 3):
                means[label, channel] += normalised[seg == label].mean() / num_cases
    return means


def test_tumour_contrasts_differ_per_channel():
    means = _mean_by_label()
    healthy, edema, necrosis, enhancing = means
    assert edema[FLAIR] > 1.3 * healthy[FLAIR] and edema[T2] > 1.3 * healthy[T2]
    assert enhancing[T1CE] > 1.2 * max(healthy[T1CE], edema[T1CE], necrosis[T1CE])
    assert enhancing[T1CE] / enhancing[T1] > 1.5  # enhancement shows in T1ce only
    assert necrosis[T1] < edema[T1] < healthy[T1]


def test_intensity_ranges_overlap_between_classes():
    image, seg = generate_case((40, 40, 40), seed=1, enhancing=True)
    brain = image[0] > 0
    for channel in range(4):
        values = image[channel]
        low, high = np.percentile(values[brain & (seg == 0)], [1, 99])
        # some edema voxels fall inside the healthy range in every channel: no single threshold separates them
        edema = values[seg == 1]
        assert ((edema > low) & (edema < high)).mean() > 0.05


def test_spacing_sets_physical_size():
    """The same seed at half the resolution along axis 0 gives about the same brain and tumour in millimetres."""
    for seed in range(2):
        sizes = []
        for shape, spacing in (((48, 48, 48), (1.0, 1.0, 1.0)), ((24, 48, 48), (2.0, 1.0, 1.0))):
            image, seg = generate_case(shape, spacing, seed=seed)
            brain = np.argwhere(image[0] > 0)
            voxel_mm3 = float(np.prod(spacing))
            extent_mm = (brain.max(0) - brain.min(0) + 1) * np.asarray(spacing)
            sizes.append((len(brain) * voxel_mm3, extent_mm, (seg > 0).sum() * voxel_mm3))
        (fine_volume, fine_extent, fine_tumour), (coarse_volume, coarse_extent, coarse_tumour) = sizes
        assert 0.8 < coarse_volume / fine_volume < 1.2
        np.testing.assert_allclose(coarse_extent, fine_extent, rtol=0.15)
        assert 0.6 < coarse_tumour / fine_tumour < 1.5
        # a round brain: in mm, axis 0 is as long as the others although it has half the voxels
        assert 0.8 < coarse_extent[0] / coarse_extent[1] < 1.25


def test_invalid_shape_raises():
    with pytest.raises(ConfigError, match="shape"):
        generate_case((4, 32, 32))
    with pytest.raises(ConfigError, match="layout"):
        make_synthetic_dataset("/nonexistent", layout="msd")


def test_nnunet_dataset_layout(tmp_path):
    root = make_synthetic_dataset(tmp_path / "Dataset001_Syn", num_cases=3, num_test=2, shape=(16, 20, 18),
                                  spacing=(1.5, 1.0, 0.75), seed=5)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert meta["labels"] == {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert "regions_class_order" not in meta
    dataset = load_dataset(root)
    assert [c.name for c in dataset.cases] == ["SYN_000", "SYN_001", "SYN_002"]
    assert [c.name for c in dataset.test_cases] == ["SYN_003", "SYN_004"]
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == ["SYN_003.nii.gz", "SYN_004.nii.gz"]
    label, geometry = read_image(dataset.cases[0].label_file)
    assert label.shape == (16, 20, 18) and set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_allclose(geometry.spacing, (1.5, 1.0, 0.75))
    assert np.abs(geometry.origin).max() > 1.0  # a scanner-like origin, not (0, 0, 0)
    for path in dataset.cases[0].image_files:
        image, image_geometry = read_image(path)
        assert image.shape == label.shape and image_geometry.allclose(geometry)
        assert (image[label > 0] > 0).all()


def test_dataset_is_deterministic_and_regions_are_declared(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", num_cases=2, shape=(16, 16, 16), seed=1, regions=True)
    second = make_synthetic_dataset(tmp_path / "b", num_cases=2, shape=(16, 16, 16), seed=1)
    other = make_synthetic_dataset(tmp_path / "c", num_cases=2, shape=(16, 16, 16), seed=2)
    meta = json.loads((first / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
    assert meta["regions_class_order"] == [1, 2, 3]
    for name in ("imagesTr/SYN_001_0002.nii.gz", "labelsTr/SYN_001.nii.gz"):
        np.testing.assert_array_equal(read_image(first / name)[0], read_image(second / name)[0])
        assert not np.array_equal(read_image(first / name)[0], read_image(other / name)[0])
    # the cases of one dataset are not copies of each other
    assert not np.array_equal(read_image(first / "labelsTr/SYN_000.nii.gz")[0],
                              read_image(first / "labelsTr/SYN_001.nii.gz")[0])


def test_brats_layout_uses_brats_names_and_label_values(tmp_path):
    brats = make_synthetic_dataset(tmp_path / "brats", num_cases=2, num_test=1, shape=(16, 16, 16), seed=4,
                                   layout="brats")
    nnunet = make_synthetic_dataset(tmp_path / "nnunet", num_cases=2, num_test=1, shape=(16, 16, 16), seed=4)
    assert sorted(p.name for p in brats.iterdir()) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    case = brats / "BraTS2021_00001"
    assert sorted(p.name for p in case.iterdir()) == sorted(
        f"BraTS2021_00001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
    assert not (brats / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").exists()  # test case: no reference
    brats_seg, _ = read_image(case / "BraTS2021_00001_seg.nii.gz")
    ours, _ = read_image(nnunet / "labelsTr" / "SYN_001.nii.gz")
    assert set(np.unique(brats_seg).tolist()) <= {0, 1, 2, 4}
    for our_value, brats_value in ((0, 0), (1, 2), (2, 1), (3, 4)):
        assert (brats_seg[ours == our_value] == brats_value).all()
    flair, _ = read_image(case / "BraTS2021_00001_flair.nii.gz")
    np.testing.assert_array_equal(flair, read_image(nnunet / "imagesTr" / "SYN_001_0003.nii.gz")[0])


def test_ct_like_cases_hold_every_class_in_hounsfield_units(tmp_path):
    from voxseg.data.synth_ct import generate_ct_case, make_ct_dataset

    image, seg = generate_ct_case((16, 40, 40), (2.5, 0.8, 0.8), num_classes=12, seed=3)
    assert image.shape == (1, 16, 40, 40) and image.dtype == np.int16 and seg.dtype == np.uint8
    assert set(np.unique(seg)) == set(range(12))  # every class, even where organs meet
    assert image.min() >= -1024 and (image[0][seg == 0] < -500).mean() > 0.2  # air around the body
    again, same = generate_ct_case((16, 40, 40), (2.5, 0.8, 0.8), num_classes=12, seed=3)
    assert np.array_equal(again, image) and np.array_equal(same, seg)
    out = make_ct_dataset(tmp_path / "ct", num_cases=2, num_test=1, shape=(12, 24, 24), num_classes=5)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and list(meta["labels"].values()) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["CT_002_0000.nii.gz"]
