"""Metrics against hand-computed values, the empty-mask conventions and a brute-force reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from voxseg.errors import ConfigError, InputError
from voxseg.evaluate.metrics import (
    compute_case_metrics,
    confusion,
    conventions,
    dice,
    hausdorff95,
    iou,
    surface_dice,
    volume_ml,
)


def _cube(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# ----- overlap ------------------------------------------------------------------------------------------------
def test_offset_cubes_overlap_exact():
    pred = _cube((20, 20, 20), (4, 4, 4), (12, 12, 12))  # 512 voxels
    ref = _cube((20, 20, 20), (6, 4, 4), (14, 12, 12))  # shifted by 2 along axis 0: overlap 6*8*8 = 384
    tp, fp, fn, tn = confusion(pred, ref)
    assert (tp, fp, fn) == (384, 128, 128)
    assert tn == 8000 - 640
    assert dice(pred, ref) == pytest.approx(768 / 1024)
    assert iou(pred, ref) == pytest.approx(384 / 640)
    assert volume_ml(pred, (2.0, 1.0, 0.5)) == pytest.approx(512 * 1.0 / 1000)


def test_shape_mismatch_raises():
    with pytest.raises(InputError, match="shape"):
        dice(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))


# ----- surface distances: exact hand-computed cases -----------------------------------------------------------
def test_parallel_sheets_hd95_and_nsd_exact_with_anisotropic_spacing():
    # one-voxel sheets are all surface; every voxel is exactly 4 voxels (4 * 1.7 mm) from the other sheet
    spacing = (1.7, 0.6, 0.9)
    pred, ref = np.zeros((12, 10, 10), bool), np.zeros((12, 10, 10), bool)
    pred[3], ref[7] = True, True
    assert hausdorff95(pred, ref, spacing) == pytest.approx(4 * 1.7)
    assert surface_dice(pred, ref, spacing, tolerance_mm=6.7) == 0.0
    assert surface_dice(pred, ref, spacing, tolerance_mm=6.9) == 1.0


def test_shifted_cube_nsd_below_and_above_shift():
    # a cube shifted by one voxel along axis 2 (0.5 mm); lateral spacing 2 mm keeps every other distance larger.
    # Each 8^3 cube has 296 shell voxels; 196 of each shell coincide with the other shell, the other 100 are
    # exactly 0.5 mm away from it.
    spacing = (2.0, 2.0, 0.5)
    pred = _cube((16, 16, 16), (4, 4, 4), (12, 12, 12))
    ref = _cube((16, 16, 16), (4, 4, 5), (12, 12, 13))
    assert surface_dice(pred, ref, spacing, tolerance_mm=0.4) == pytest.approx(392 / 592)
    assert surface_dice(pred, ref, spacing, tolerance_mm=0.6) == 1.0
    assert hausdorff95(pred, ref, spacing) == pytest.approx(0.5)
    assert dice(pred, ref) == pytest.approx(2 * 448 / 1024)


def test_identical_masks():
    mask = _cube((12, 12, 12), (2, 3, 4), (9, 8, 10))
    assert hausdorff95(mask, mask, (1.0, 2.0, 3.0)) == 0.0
    assert surface_dice(mask, mask, (1.0, 2.0, 3.0), tolerance_mm=0.0) == 1.0
    assert dice(mask, mask) == 1.0 and iou(mask, mask) == 1.0


def _ball(shape, spacing, center_mm, radius_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, center_mm)) <= radius_mm**2


def test_concentric_spheres_hd95_anisotropic():
    spacing = (1.25, 0.8, 1.0)
    shape = (24, 38, 30)
    center = (15.0, 15.2, 15.0)
    inner, outer = _ball(shape, spacing, center, 6.0), _ball(shape, spacing, center, 11.0)
    hd = hausdorff95(inner, outer, spacing)
    assert abs(hd - 5.0) <= max(spacing)
    # the distance set is symmetric, so swapping the masks gives the same value
    assert hausdorff95(outer, inner, spacing) == pytest.approx(hd)
    assert surface_dice(inner, outer, spacing, tolerance_mm=3.0) < 0.05
    assert surface_dice(inner, outer, spacing, tolerance_mm=6.5) == 1.0


# ----- empty conventions --------------------------------------------------------------------------------------
def test_both_empty():
    empty = np.zeros((8, 8, 8), bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert hausdorff95(empty, empty, (1, 1, 1)) == 0.0
    assert surface_dice(empty, empty, (1, 1, 1)) == 1.0
    table = conventions()
    assert table["both_empty"] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}


@pytest.mark.parametrize("pred_empty", [True, False])
def test_one_empty(pred_empty):
    empty, full = np.zeros((8, 10, 12), bool), _cube((8, 10, 12), (2, 2, 2), (5, 5, 5))
    pred, ref = (empty, full) if pred_empty else (full, empty)
    spacing = (2.0, 1.0, 0.5)
    assert dice(pred, ref) == 0.0
    assert iou(pred, ref) == 0.0
    assert math.isnan(hausdorff95(pred, ref, spacing))
    assert hausdorff95(pred, ref, spacing, one_empty_hd95="diagonal") == pytest.approx(math.sqrt(16**2 + 10**2 + 6**2))
    assert surface_dice(pred, ref, spacing, tolerance_mm=100.0) == 0.0
    assert conventions()["one_empty"]["nsd"] == 0.0 and conventions()["one_empty"]["dice"] == 0.0


def test_bad_one_empty_option():
    mask = _cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    with pytest.raises(ConfigError, match="one_empty_hd95"):
        hausdorff95(mask, mask, (1, 1, 1), one_empty_hd95="max")


# ----- independent brute-force reference ----------------------------------------------------------------------
def _surface_points_mm(mask, spacing):
    structure = np.ones((3, 3, 3), bool)
    shell = mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return np.argwhere(shell) * np.asarray(spacing)


def _brute_force(pred, ref, spacing, tolerance):
    a, b = _surface_points_mm(pred, spacing), _surface_points_mm(ref, spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # (|A|, |B|)
    a_to_b, b_to_a = pairwise.min(1), pairwise.min(0)
    both = np.concatenate([a_to_b, b_to_a])
    nsd = (np.count_nonzero(a_to_b <= tolerance) + np.count_nonzero(b_to_a <= tolerance)) / both.size
    return float(np.percentile(both, 95)), nsd, both


def _blob(rng, shape, threshold):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return noise > threshold * noise.std()


@pytest.mark.parametrize("seed", range(6))
def test_hd95_and_nsd_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 12, 12)
    spacing = tuple(rng.uniform(0.5, 2.0, size=3))
    # different thresholds give blobs of different sizes, some touching the image border
    pred, ref = _blob(rng, shape, 0.3), _blob(rng, shape, 0.8)
    assert pred.any() and ref.any()
    for tolerance in (0.77, 1.93, 3.1):
        expected_hd, expected_nsd, distances = _brute_force(pred, ref, spacing, tolerance)
        assert np.abs(distances - tolerance).min() > 1e-6  # no tie at the tolerance
        assert hausdorff95(pred, ref, spacing) == pytest.approx(expected_hd, abs=1e-9)
        assert surface_dice(pred, ref, spacing, tolerance) == pytest.approx(expected_nsd, abs=1e-12)


def test_small_masks_in_large_volume_match_brute_force():
    # the bounding-box crop must not change the result: small masks far from each other and from the border
    rng = np.random.default_rng(7)
    pred, ref = np.zeros((40, 40, 40), bool), np.zeros((40, 40, 40), bool)
    pred[5:12, 6:14, 30:36] = _blob(rng, (7, 8, 6), 0.0)
    ref[20:30, 25:31, 2:10] = _blob(rng, (10, 6, 8), 0.0)
    spacing = (1.1, 0.9, 1.4)
    expected_hd, expected_nsd, _ = _brute_force(pred, ref, spacing, 25.3)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(expected_hd, abs=1e-9)
    assert surface_dice(pred, ref, spacing, 25.3) == pytest.approx(expected_nsd, abs=1e-12)


# ----- per-case metrics over classes and regions --------------------------------------------------------------
def test_compute_case_metrics_labels_regions_and_ignore():
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[2:10, 2:10, 2:10] = 1
    ref[4:8, 4:8, 4:8] = 2
    pred = ref.copy()
    pred[4:8, 4:8, 4:6] = 1  # half of label 2 predicted as 1: the region {1, 2} stays perfect
    ref[14:, 14:, 14:] = 3  # "ignore" voxels
    pred[14:, 14:, 14:] = 1  # predicted as 1 inside ignore: must not count
    spacing = (1.0, 2.0, 0.5)
    result = compute_case_metrics(
        pred, ref, spacing, {"outer": [1], "inner": [2], "both": [1, 2]}, tolerance_mm=1.0, ignore_value=3
    )
    assert result["inner"]["tp"] == 32 and result["inner"]["fn"] == 32 and result["inner"]["fp"] == 0
    assert result["inner"]["dice"] == pytest.approx(64 / 96)
    assert result["outer"]["fp"] == 32 and result["outer"]["fn"] == 0
    assert result["both"]["dice"] == 1.0 and result["both"]["hd95"] == 0.0 and result["both"]["nsd"] == 1.0
    assert result["both"]["ref_volume_ml"] == pytest.approx(512 * 1.0 / 1000)
    assert result["inner"]["pred_volume_ml"] == pytest.approx(32 * 1.0 / 1000)


@pytest.mark.parametrize("seed, fraction", [(0, 0.995), (1, 0.995), (2, 0.995), (3, 0.6)])
def test_surface_distances_equal_the_distance_transform_of_the_whole_volume(seed, fraction):
    """Both ways (the k-d tree for compact masks, distance transforms for speckle filling the box) give, voxel for
    voxel, what a distance transform of the whole volume gives."""
    from voxseg.evaluate.metrics import surface, surface_distances

    rng = np.random.default_rng(seed)
    shape, spacing = (23, 31, 27), (2.5, 0.8, 1.1)
    iterations = 2 if fraction > 0.9 else 0
    pred = rng.random(shape) > fraction
    ref = rng.random(shape) > fraction
    if iterations:
        pred, ref = ndimage.binary_dilation(pred, iterations=2), ndimage.binary_dilation(ref, iterations=3)
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    expected_to_ref = ndimage.distance_transform_edt(~surface(ref), sampling=spacing)[surface(pred)]
    expected_to_pred = ndimage.distance_transform_edt(~surface(pred), sampling=spacing)[surface(ref)]
    np.testing.assert_allclose(pred_to_ref, expected_to_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref_to_pred, expected_to_pred, rtol=1e-12, atol=1e-12)
    assert pred_to_ref.size == np.count_nonzero(surface(pred)) > 100
