"""Dataset fingerprint on a tiny dataset written here: crop boxes, intensity statistics, class volumes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from voxseg.data.dataset import load_dataset
from voxseg.data.fingerprint import compute_fingerprint, load_fingerprint, nonzero_bbox, save_fingerprint
from voxseg.data.io import Geometry, write_image

# per case: shape, spacing, nonzero image box, label box (value 1) and a small value-2 box inside it
CASES = {
    "c0": ((20, 24, 16), (2.0, 1.0, 1.0), ((2, 18), (4, 20), (3, 13)), ((5, 10), (6, 12), (4, 9))),
    "c1": ((16, 16, 16), (1.0, 1.0, 1.0), ((0, 16), (0, 16), (0, 16)), ((3, 7), (3, 9), (2, 6))),
    # the label reaches outside the nonzero image region: the crop box must include it
    "c2": ((18, 20, 22), (1.5, 0.8, 0.8), ((4, 12), (5, 15), (6, 16)), ((10, 14), (8, 12), (7, 11))),
}


def _box(shape, box):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in box)] = True
    return mask


def write_tiny_dataset(root: Path, ignore: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two-channel dataset (channel 1 named CT); returns name -> (image (2,D,H,W), seg) as written."""
    rng = np.random.default_rng(0)
    labels = {"background": 0, "organ": 1, "lesion": 2}
    if ignore:
        labels["ignore"] = 3
    meta = {"name": "Tiny", "channel_names": {"0": "T1", "1": "CT"}, "labels": labels,
            "numTraining": len(CASES), "file_ending": ".nii.gz"}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    arrays = {}
    for name, (shape, spacing, image_box, label_box) in CASES.items():
        inside = _box(shape, image_box)
        image = np.stack([np.where(inside, rng.normal(100, 20, shape), 0.0),
                          np.where(inside, rng.normal(-300, 50, shape), 0.0)]).astype(np.float32)
        seg = _box(shape, label_box).astype(np.uint8)
        start = [a for a, _ in label_box]
        seg[start[0]:start[0] + 2, start[1]:start[1] + 2, start[2]:start[2] + 2] = 2
        if ignore:
            seg[start[0], start[1], start[2]] = 3
        geometry = Geometry.from_spacing(spacing)
        for channel in range(2):
            write_image(root / "imagesTr" / f"{name}_{channel:04d}.nii.gz", image[channel], geometry)
        write_image(root / "labelsTr" / f"{name}.nii.gz", seg, geometry)
        arrays[name] = (image, seg)
    return arrays


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp") / "Tiny"
    arrays = write_tiny_dataset(root)
    return load_dataset(root), arrays


def test_nonzero_bbox_union_and_empty():
    image = np.zeros((2, 10, 10, 10), np.float32)
    image[1, 2:5, 3:7, 4:6] = 1.0
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[6, 8, 1] = 1
    assert nonzero_bbox(image) == [[2, 5], [3, 7], [4, 6]]
    assert nonzero_bbox(image, seg) == [[2, 7], [3, 9], [1, 6]]
    assert nonzero_bbox(np.zeros((1, 4, 5, 6))) == [[0, 4], [0, 5], [0, 6]]


def test_geometry_and_crop(tiny):
    dataset, arrays = tiny
    fp = compute_fingerprint(dataset, samples_per_case=100000)
    assert fp["case_names"] == ["c0", "c1", "c2"]
    expected_rel = []
    for i, (name, (shape, spacing, image_box, label_box)) in enumerate(CASES.items()):
        assert fp["spacings"][i] == pytest.approx(spacing)
        assert fp["shapes_before_crop"][i] == list(shape)
        union = [[min(a[0], b[0]), max(a[1], b[1])] for a, b in zip(image_box, label_box)]
        assert fp["crop_bboxes"][i] == union
        crop_shape = [b - a for a, b in union]
        assert fp["shapes_after_crop"][i] == crop_shape
        expected_rel.append(np.prod(crop_shape) / np.prod(shape))
    assert fp["relative_sizes_after_crop"] == pytest.approx(expected_rel)
    assert fp["median_relative_size_after_cropping"] == pytest.approx(np.median(expected_rel))
    json.dumps(fp)  # JSON-serialisable


def test_intensity_statistics_match_numpy(tiny):
    dataset, arrays = tiny
    fp = compute_fingerprint(dataset, samples_per_case=100000)  # more than any case has: every voxel used
    for channel in range(2):
        values = np.concatenate([img[channel][seg > 0] for img, seg in arrays.values()]).astype(np.float64)
        stats = fp["foreground_intensity"][str(channel)]
        assert stats["num_samples"] == values.size
        assert stats["mean"] == pytest.approx(values.mean(), rel=1e-5)
        assert stats["std"] == pytest.approx(values.std(), rel=1e-5)
        assert stats["median"] == pytest.approx(np.median(values), rel=1e-5)
        assert stats["min"] == pytest.approx(values.min()) and stats["max"] == pytest.approx(values.max())
        assert stats["percentile_00_5"] == pytest.approx(np.percentile(values, 0.5), rel=1e-5)
        assert stats["percentile_99_5"] == pytest.approx(np.percentile(values, 99.5), rel=1e-5)


def test_sampling_is_bounded_seeded_and_close(tiny):
    dataset, arrays = tiny
    fp = compute_fingerprint(dataset, samples_per_case=50, seed=3)
    counts = [int((seg > 0).sum()) for _, seg in arrays.values()]
    assert fp["foreground_intensity"]["0"]["num_samples"] == sum(min(50, c) for c in counts)
    again = compute_fingerprint(dataset, samples_per_case=50, seed=3)
    other = compute_fingerprint(dataset, samples_per_case=50, seed=4)
    assert again["foreground_intensity"] == fp["foreground_intensity"]
    assert other["foreground_intensity"]["0"]["mean"] != fp["foreground_intensity"]["0"]["mean"]
    # 50 voxels per case still estimate the mean of all foreground voxels (std ~40 here) to a few units
    full = np.concatenate([img[0][seg > 0] for img, seg in arrays.values()])
    assert fp["foreground_intensity"]["0"]["mean"] == pytest.approx(full.mean(), abs=12.0)


def test_class_volumes(tiny):
    dataset, arrays = tiny
    fp = compute_fingerprint(dataset)
    for value in (0, 1, 2):
        counts = [int((seg == value).sum()) for _, seg in arrays.values()]
        assert fp["class_voxel_counts"][str(value)] == counts
        mm3 = [c * np.prod(spec[1]) for c, spec in zip(counts, CASES.values())]
        assert fp["class_volumes_mm3"][str(value)] == pytest.approx(np.mean(mm3))
    assert fp["class_voxel_counts"]["2"] == [8, 8, 8]


def test_parallel_equals_serial_and_round_trip(tiny, tmp_path):
    dataset, _ = tiny
    serial = compute_fingerprint(dataset, num_workers=1, samples_per_case=30)
    parallel = compute_fingerprint(dataset, num_workers=2, samples_per_case=30)
    assert parallel == serial
    save_fingerprint(tmp_path / "fingerprint.json", serial)
    assert load_fingerprint(tmp_path) == json.loads(json.dumps(serial))


def test_ignore_label_is_not_foreground(tmp_path):
    root = tmp_path / "Tiny"
    arrays = write_tiny_dataset(root, ignore=True)
    fp = compute_fingerprint(load_dataset(root), samples_per_case=100000)
    expected = sum(int(((seg > 0) & (seg != 3)).sum()) for _, seg in arrays.values())
    assert fp["foreground_intensity"]["0"]["num_samples"] == expected
    assert fp["class_voxel_counts"]["3"] == [1, 1, 1]
