"""The preprocessed case store: atomic writes, mmap round trip, completion marker, foreground samples."""
from __future__ import annotations

import numpy as np
import pytest

from voxseg.data.store import (
    list_cases,
    load_case,
    load_foreground_locations,
    sample_foreground_locations,
    save_case,
)
from voxseg.errors import DatasetError


def make_arrays(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, 12, 14, 16)).astype(np.float32)
    seg = rng.integers(-1, 4, size=(1, 12, 14, 16)).astype(np.int8)
    return image, seg


def test_round_trip_with_mmap(tmp_path):
    image, seg = make_arrays()
    props = {"name": "a", "shape_after_resample": [12, 14, 16]}
    fg = sample_foreground_locations(seg, [1, 2, 3, 4], max_per_label=50, seed="a")
    save_case(tmp_path, "a", image, seg, props, fg, image_dtype="float16")
    img, sg, pr = load_case(tmp_path, "a", mmap=True)
    assert isinstance(img, np.memmap) and isinstance(sg, np.memmap)
    assert img.dtype == np.float16 and sg.dtype == np.int8 and pr == props
    # float16 keeps z-scored values to ~1e-3 relative
    np.testing.assert_allclose(img.astype(np.float32), image, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(sg, seg)
    img2, _, _ = load_case(tmp_path, "a", mmap=False)
    assert not isinstance(img2, np.memmap)
    loaded = load_foreground_locations(tmp_path, "a")
    assert sorted(loaded) == [1, 2, 3, 4] and loaded[4].shape == (0, 3)
    for value in (1, 2, 3):
        assert loaded[value].dtype == np.int32 and np.array_equal(loaded[value], fg[value])
    assert not list(tmp_path.glob(".*"))


def test_float32_kept_and_image_only_case(tmp_path):
    image, _ = make_arrays()
    save_case(tmp_path, "b", image, None, {"name": "b"}, {})
    img, seg, _ = load_case(tmp_path, "b")
    assert img.dtype == np.float32 and seg is None and np.array_equal(img, image)


def test_list_cases_only_lists_complete_cases(tmp_path):
    image, seg = make_arrays()
    for name in ("c2", "c1", "c3"):
        save_case(tmp_path, name, image, seg, {"name": name}, {})
    (tmp_path / "c3.json").unlink()  # as if interrupted before the marker was written
    (tmp_path / ".c4.npy.tmp123").write_bytes(b"partial")
    assert list_cases(tmp_path) == ["c1", "c2"]
    with pytest.raises(DatasetError, match="c3"):
        load_case(tmp_path, "c3")


def test_overwrite_removes_marker_first(tmp_path, monkeypatch):
    image, seg = make_arrays()
    save_case(tmp_path, "d", image, seg, {"v": 1}, {})

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", crash)  # the foreground file is written after the arrays
    with pytest.raises(RuntimeError):
        save_case(tmp_path, "d", image * 2, seg, {"v": 2}, {})
    assert list_cases(tmp_path) == []  # the new arrays are not vouched for by the old CASE.json
    assert not list(tmp_path.glob(".*"))  # the temporary file was cleaned up


def test_sample_foreground_locations_seeded_and_capped():
    seg = np.zeros((20, 20, 20), np.int8)
    seg[2:12, 3:13, 4:14] = 1  # 1000 voxels
    seg[15, 15, 15] = 2
    a = sample_foreground_locations(seg, [1, 2, 3], max_per_label=100, seed="case_007")
    b = sample_foreground_locations(seg[None], [1, 2, 3], max_per_label=100, seed="case_007")
    c = sample_foreground_locations(seg, [1, 2, 3], max_per_label=100, seed="case_008")
    assert a[1].shape == (100, 3) and len(np.unique(a[1], axis=0)) == 100
    assert np.all(seg[tuple(a[1].T)] == 1)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert a[2].tolist() == [[15, 15, 15]] and a[3].shape == (0, 3)
    everything = sample_foreground_locations(seg, [1], max_per_label=5000, seed=0)
    assert everything[1].shape == (1000, 3)
