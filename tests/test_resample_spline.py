"""nnU-Net's resampling rule: cubic-spline images, the per-case separate axis, logits back linearly, label masks.

The references are scipy: `ndimage.zoom(order, mode="nearest", grid_mode=True)` clipped to the input range
is what skimage's `resize(order, mode="edge", anti_aliasing=False)` computes (what nnU-Net calls), and
`map_coordinates(order=0, mode="nearest")` at centres `(i + 0.5) * in / out - 0.5` is its rule along a
separately resampled coarse axis.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxseg.data.io import Geometry
from voxseg.data.preprocess import preprocess_case, restore_to_original
from voxseg.data.resample import resample, separate_axis
from voxseg.data.spline import nearest_indices, zoom
from voxseg.errors import CheckpointError
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan


def scipy_resize(volume: np.ndarray, new_shape, order: int) -> np.ndarray:
    """skimage's resize(order, mode='edge', anti_aliasing=False) of one volume/slice, in float64."""
    factors = np.array(new_shape, dtype=float) / np.array(volume.shape)
    out = ndimage.zoom(volume.astype(np.float64), factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape == tuple(new_shape)
    return np.clip(out, volume.min(), volume.max())


def nearest_along_reference(volume: np.ndarray, axis: int, size: int) -> np.ndarray:
    """nnU-Net's order_z=0 step: map_coordinates(order=0, mode='nearest') along `axis` only."""
    shape = list(volume.shape)
    grids = list(np.meshgrid(*[np.arange(size if a == axis else s, dtype=np.float64) for a, s in enumerate(shape)],
                             indexing="ij"))
    grids[axis] = shape[axis] / size * (grids[axis] + 0.5) - 0.5
    return ndimage.map_coordinates(volume, np.stack(grids), order=0, mode="nearest")


def separate_reference(volume: np.ndarray, new_shape, axis: int, order: int) -> np.ndarray:
    """Per-slice 2D resize orthogonal to `axis` (clipped per slice), then nearest along `axis`."""
    plane = [s for a, s in enumerate(new_shape) if a != axis]
    slices = [scipy_resize(np.take(volume, i, axis=axis), plane, order) for i in range(volume.shape[axis])]
    return nearest_along_reference(np.stack(slices, axis=axis), axis, new_shape[axis])


CASES = [((7, 9, 11), (13, 5, 11)), ((16, 15, 13), (9, 22, 14)), ((1, 6, 5), (3, 6, 2)), ((20, 17, 3), (9, 30, 1)),
         ((5, 1, 8), (5, 4, 8))]


@pytest.mark.parametrize("shape, new_shape", CASES)
@pytest.mark.parametrize("order", [3, 1, 0])
def test_zoom_equals_scipy_zoom_with_clip(shape, new_shape, order):
    rng = np.random.default_rng(sum(shape) + order)
    x = rng.normal(size=(2, *shape)) * 50 + 10
    expected = np.stack([scipy_resize(c, new_shape, order) for c in x])
    out64 = zoom(torch.from_numpy(x), new_shape, order=order).numpy()
    np.testing.assert_allclose(out64, expected, rtol=0, atol=1e-9)
    out32 = zoom(torch.from_numpy(x).float(), new_shape, order=order).numpy()
    np.testing.assert_allclose(out32, expected, rtol=0, atol=1e-5 * np.abs(x).max())
    # the clip is what keeps cubic overshoot inside each channel's own range
    for c in range(2):
        assert out64[c].min() >= x[c].min() and out64[c].max() <= x[c].max()


def test_resample_images_is_cubic_by_default_and_linear_on_request():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 12, 10, 9)).astype(np.float32)
    new_shape = (17, 7, 13)
    cubic = resample(torch.from_numpy(x), new_shape).numpy()
    linear = resample(torch.from_numpy(x), new_shape, order=1).numpy()
    for c in range(3):
        np.testing.assert_allclose(cubic[c], scipy_resize(x[c], new_shape, 3), atol=2e-5)
        np.testing.assert_allclose(linear[c], scipy_resize(x[c], new_shape, 1), atol=2e-5)
    assert np.abs(cubic - linear).max() > 0.1  # the two orders are really different maps


def test_slabs_and_channels_do_not_change_the_result():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(3, 14, 11, 9)))
    whole = zoom(x, (19, 8, 12))
    for slab in (1, 7, 8 * 12 * 5):
        np.testing.assert_allclose(zoom(x, (19, 8, 12), slab_elements=slab).numpy(), whole.numpy(), rtol=0, atol=1e-12)
    one_channel = zoom(x[1:2], (19, 8, 12))
    np.testing.assert_allclose(one_channel[0].numpy(), whole[1].numpy(), rtol=0, atol=1e-12)
    per_slice = zoom(x, (14, 8, 12), per_slice_axis=0)
    np.testing.assert_allclose(zoom(x, (14, 8, 12), per_slice_axis=0, slab_elements=5).numpy(), per_slice.numpy(),
                               rtol=0, atol=1e-12)


def test_nearest_indices_are_map_coordinates_order_0():
    for size in range(1, 40):
        for out in range(1, 40):
            coords = size / out * (np.arange(out) + 0.5) - 0.5
            expected = ndimage.map_coordinates(np.arange(size, dtype=float), coords[None], order=0, mode="nearest")
            np.testing.assert_array_equal(nearest_indices(size, out), expected.astype(np.int64))


@pytest.mark.parametrize("axis, shape, new_shape", [(0, (6, 13, 11), (15, 9, 14)), (2, (12, 10, 4), (7, 15, 9)),
                                                    (1, (9, 3, 8), (9, 2, 12))])
@pytest.mark.parametrize("order", [3, 1])
def test_separate_axis_path_equals_per_slice_reference(axis, shape, new_shape, order):
    rng = np.random.default_rng(axis + order)
    x = rng.normal(size=(2, *shape)) * 3
    expected = np.stack([separate_reference(c, new_shape, axis, order) for c in x])
    out = resample(torch.from_numpy(x).float(), new_shape, anisotropy_axis=axis, order=order).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-5)
    # the clip is per slice: a slice of small values is not widened by its neighbours' range
    plain = resample(torch.from_numpy(x).float(), new_shape, order=order).numpy()
    assert np.abs(out - plain).max() > 1e-3


@pytest.mark.parametrize("current, new, expected", [
    ((5.0, 0.8, 0.8), (1.0, 1.0, 1.0), 0),     # the case is anisotropic: its coarse axis
    ((1.0, 1.0, 1.0), (0.8, 0.8, 4.0), 2),     # isotropic case, anisotropic target: the target's axis
    ((0.8, 5.0, 0.8), (0.8, 0.8, 4.0), 1),     # both anisotropic: the current spacing decides
    ((0.24, 1.25, 1.25), (1.0, 1.0, 1.0), None),  # two axes tie for coarsest: no separate axis
    ((3.0, 3.0, 3.0), (1.0, 1.0, 1.0), None),  # three tie (and not anisotropic)
    ((3.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),  # ratio exactly 3: not above the threshold
    ((3.01, 1.0, 1.0), (1.0, 1.0, 1.0), 0),
    ((0.5, 0.5, 0.5), (1.5, 0.49, 1.5), None),  # the target is anisotropic but its coarsest axes tie
])
def test_separate_axis_rule(current, new, expected):
    assert separate_axis(current, new) == expected


def make_plan(target, anisotropy_axis=None, channels=1) -> Plan:
    return Plan(dataset_name="T", raw_dataset="", channel_names={str(c): f"c{c}" for c in range(channels)},
                labels={"background": 0, "a": 1, "b": 2}, file_ending=".nii.gz", target_spacing=list(target),
                patch_size=[8, 8, 8], batch_size=1, network=NetworkPlan(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2,
                                                                        strides=[[1, 1, 1], [2, 2, 2]]),
                normalization=[ChannelNormalization("none")] * channels, anisotropy_axis=anisotropy_axis)


def test_preprocessing_decides_the_axis_per_case_and_restores_with_the_reverse_question():
    rng = np.random.default_rng(7)
    image = rng.uniform(1, 2, size=(1, 6, 20, 18)).astype(np.float32)
    plan = make_plan((1.0, 1.0, 1.0), anisotropy_axis=None)  # the plan records no axis; the case has one
    out, _, props = preprocess_case(image, Geometry.from_spacing((4.0, 0.8, 0.8)), plan)
    assert props["anisotropy_axis"] == 0 and props["shape_after_resample"] == [24, 16, 14]
    np.testing.assert_allclose(out[0], separate_reference(image[0], (24, 16, 14), 0, 3), atol=2e-5)
    plan_with_axis = make_plan((1.0, 1.0, 1.0), anisotropy_axis=2)  # the plan's axis is not what decides
    _, _, props_iso = preprocess_case(image, Geometry.from_spacing((1.2, 1.0, 1.1)), plan_with_axis)
    assert props_iso["anisotropy_axis"] is None
    # back to the original grid: logits linearly in plane, nearest along axis 0, softmax afterwards
    logits = torch.from_numpy(rng.normal(size=(3, 24, 16, 14)).astype(np.float32))
    probabilities = restore_to_original(logits, props, is_label=False, activation=lambda t: torch.softmax(t, 0))
    expected = np.stack([separate_reference(c, (6, 20, 18), 0, 1) for c in logits.numpy().astype(np.float64)])
    expected = torch.softmax(torch.from_numpy(expected), 0).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_restored_logits_equal_a_scipy_linear_reference_then_softmax():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(3, 9, 8, 7)).astype(np.float32) * 4
    props = {"name": "c", "original_shape": [14, 13, 12], "crop_bbox": [[1, 13], [0, 11], [2, 12]],
             "shape_after_crop": [12, 11, 10], "shape_after_resample": [9, 8, 7],
             "original_spacing": [0.75, 0.73, 0.7], "target_spacing": [1.0, 1.0, 1.0]}
    out = restore_to_original(logits, props, is_label=False, activation=lambda t: torch.softmax(t, 0))
    inside = torch.softmax(torch.from_numpy(np.stack([scipy_resize(c, (12, 11, 10), 1) for c in logits])), 0)
    box = (slice(None), slice(1, 13), slice(0, 11), slice(2, 12))
    np.testing.assert_allclose(out[box], inside.numpy(), atol=1e-5)
    outside = np.ones((14, 13, 12), bool)
    outside[box[1:]] = False
    assert (out[0][outside] == 1).all() and (out[1:][:, outside] == 0).all()
    # activating before resampling (the previous rule) is another map
    before = restore_to_original(torch.softmax(torch.from_numpy(logits), 0), props, is_label=False)
    assert np.abs(before[box] - out[box]).max() > 1e-3


def labels_reference(seg: np.ndarray, new_shape) -> tuple[np.ndarray, np.ndarray]:
    """batchgenerators' resize_segmentation(order=1): argmax of clipped linear masks, exact ties to the
    nearest-neighbour label when it is among the tied values, else the lowest tied value. Also returns where
    the two best scores lie within float noise of each other without being equal (ties in exact arithmetic
    that the two implementations' rounding may break either way)."""
    values = np.unique(seg)
    scores = np.stack([scipy_resize((seg == v).astype(np.float64), new_shape, 1) for v in values])
    ordered = np.sort(scores, axis=0)
    best, gap = ordered[-1], ordered[-1] - ordered[-2]
    winner = values[scores.argmax(0)]
    nearest = ndimage.zoom(seg, np.array(new_shape) / np.array(seg.shape), order=0, mode="nearest", grid_mode=True)
    nearest_score = np.take_along_axis(scores, np.searchsorted(values, nearest)[None], 0)[0]
    return np.where((nearest_score == best) & (best > 0), nearest, winner), (gap > 0) & (gap < 1e-9)


@pytest.mark.parametrize("new_shape", [(6, 7, 5), (24, 28, 10), (13, 9, 21)])
def test_labels_follow_the_mask_argmax_with_nearest_tie_break(new_shape):
    rng = np.random.default_rng(9)
    seg = rng.choice(np.array([-1, 0, 1, 2, 5], np.int8), size=(12, 14, 10))
    expected, noisy = labels_reference(seg, new_shape)
    for chunk in (1, 2, 64):
        out = resample(torch.from_numpy(seg)[None], new_shape, is_label=True, label_chunk=chunk)[0].numpy()
        assert set(np.unique(out)) <= set(np.unique(seg))
        differ = out != expected
        assert not (differ & ~noisy).any() and differ.sum() <= 0.002 * out.size
    if new_shape in ((6, 7, 5), (24, 28, 10)):  # factors 1/2 and 2: weights are exact, so is every tie
        np.testing.assert_array_equal(out, expected)
    if new_shape == (6, 7, 5):  # halving: boundary voxels are exact ties, and the tie-break decides many
        values = np.unique(seg)
        lowest = values[np.stack([scipy_resize((seg == v).astype(float), new_shape, 1) for v in values]).argmax(0)]
        assert (expected != lowest).sum() > 10


def test_labels_separate_axis_per_slice_then_nearest():
    rng = np.random.default_rng(10)
    seg = rng.choice(np.array([0, 1, 2], np.int8), size=(5, 12, 10))
    new_shape = (11, 7, 15)
    plane, noisy = zip(*[labels_reference(s, new_shape[1:]) for s in seg])
    expected = nearest_along_reference(np.stack(plane).astype(np.float64), 0, new_shape[0]).astype(np.int8)
    noisy = nearest_along_reference(np.stack(noisy).astype(np.float64), 0, new_shape[0]) > 0
    out = resample(torch.from_numpy(seg)[None], new_shape, is_label=True, anisotropy_axis=0)[0].numpy()
    differ = out != expected
    assert not (differ & ~noisy).any() and differ.sum() <= 0.02 * out.size
    # slices are copied along the coarse axis, never blended: each output slice is one resampled input slice
    index = nearest_indices(5, 11)
    np.testing.assert_array_equal(out, out[np.searchsorted(index, index)])
    assert sorted(set(index.tolist())) == [0, 1, 2, 3, 4]


# ----- nnU-Net plans ---------------------------------------------------------------------------------------------
def _nnunet_plans(**changes):
    from tests.test_nnunet import PLANS

    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_fullres"].update(changes)
    return plans


DEFAULT_KWARGS = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}


def test_nnunet_default_resampling_is_accepted_and_others_refused_by_name():
    from tests.test_nnunet import DATASET
    from voxseg.infer.nnunet import plan_from_nnunet

    plan, _ = plan_from_nnunet(_nnunet_plans(**DEFAULT_KWARGS), DATASET, "3d_fullres")
    assert plan.target_spacing == [1.0, 1.0, 1.0]
    for key, change, named in [
        ("resampling_fn_data_kwargs", {"order": 1}, "order=1"),
        ("resampling_fn_probabilities_kwargs", {"order_z": 1}, "order_z=1"),
        ("resampling_fn_data_kwargs", {"force_separate_z": True}, "force_separate_z=True"),
        ("resampling_fn_seg_kwargs", {"separate_z_anisotropy_threshold": 2.0}, "separate_z_anisotropy_threshold"),
    ]:
        kwargs = {**DEFAULT_KWARGS, key: {**DEFAULT_KWARGS[key], **change}}
        with pytest.raises(CheckpointError, match=f"{key}.*{named}"):
            plan_from_nnunet(_nnunet_plans(**kwargs), DATASET, "3d_fullres")
    missing = {**DEFAULT_KWARGS, "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0}}
    with pytest.raises(CheckpointError, match="force_separate_z=False"):  # the function's default: never separate
        plan_from_nnunet(_nnunet_plans(**missing), DATASET, "3d_fullres")
    with pytest.raises(CheckpointError, match="resample_torch_fornnunet"):
        plan_from_nnunet(_nnunet_plans(**{**DEFAULT_KWARGS, "resampling_fn_data": "resample_torch_fornnunet"}),
                         DATASET, "3d_fullres")
