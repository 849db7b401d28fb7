"""Restoring network outputs to the original grid in slabs: the same labels and probabilities as restoring the
whole grid at once, whatever the slab size, with the values held at once bounded by the cap."""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_predictor import REGIONS, tiny_plan
from voxseg.data.preprocess import restore_to_original
from voxseg.data.restore import DEFAULT_RESTORE_VALUES, RestoreSlabs, linear_weights, restore_in_slabs
from voxseg.infer.postprocess import activate, labels_on_original_grid, probabilities_to_labels


class LiveValues(TorchDispatchMode):
    """Counts the values of the tensors torch creates under it while they are alive (views and in-place results
    share memory and are not counted); `peak` is the most held at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, count: int) -> None:
        self.live -= count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and not tensor._is_view():
                self.live += tensor.numel()
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, tensor.numel())
        return out


def _properties(in_shape, crop_shape, target, original, original_shape=None, box_start=(0, 0, 0)):
    original_shape = original_shape or [c + 2 * s for c, s in zip(crop_shape, box_start)]
    return {"name": "c", "original_shape": list(original_shape), "shape_after_crop": list(crop_shape),
            "shape_after_resample": list(in_shape), "target_spacing": list(target), "original_spacing": list(original),
            "crop_bbox": [[s, s + c] for s, c in zip(box_start, crop_shape)]}


GEOMETRIES = {  # (K x) shape after resample -> crop box, target and original spacing
    "upsampled": _properties((5, 6, 5), (10, 12, 10), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), box_start=(1, 1, 0)),
    "down_and_up, one axis kept": _properties((12, 9, 14), (8, 13, 14), (1.0, 1.5, 1.0), (1.5, 1.04, 1.0),
                                              box_start=(2, 0, 3)),
    "separate axis 0": _properties((10, 18, 20), (8, 20, 23), (4.0, 1.0, 1.0), (5.0, 0.9, 0.87), box_start=(0, 2, 1)),
    "separate axis 2": _properties((12, 11, 6), (10, 13, 5), (1.0, 1.0, 4.0), (1.2, 0.85, 4.8), box_start=(3, 1, 2)),
    "same grid": _properties((7, 9, 8), (7, 9, 8), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), box_start=(1, 0, 2)),
}


def _whole_grid_reference(logits, plan, properties):
    """The previous implementation: the whole crop box resampled with F.interpolate, activated, pasted, labels."""
    restored = restore_to_original(logits, properties, is_label=False, background_channel=not plan.is_region_based,
                                   as_tensor=True, activation=lambda values: activate(values, plan))
    return probabilities_to_labels(restored, plan).numpy(), restored.numpy()


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", ["labels", "regions"])
def test_slabs_give_the_whole_grid_result_whatever_the_cap(geometry, kind):
    plan = tiny_plan() if kind == "labels" else tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3])
    properties = GEOMETRIES[geometry]
    generator = torch.Generator().manual_seed(len(geometry))
    logits = torch.randn(plan.num_outputs, *properties["shape_after_resample"], generator=generator) * 3
    expected_labels, expected_probabilities = _whole_grid_reference(logits, plan, properties)
    two_rows = RestoreSlabs(logits, properties).footprint(2)  # a cap that gives slabs of 2 rows
    results = {cap: labels_on_original_grid(logits, plan, properties, with_probabilities=True, max_values=cap)
               for cap in (DEFAULT_RESTORE_VALUES, two_rows, 1)}
    assert RestoreSlabs(logits, properties, 1).rows == 1 and RestoreSlabs(logits, properties, two_rows).rows == 2
    labels, probabilities = results[DEFAULT_RESTORE_VALUES]
    assert labels.dtype == np.uint8 and probabilities.dtype == np.float32
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=0, atol=1e-5)  # float32 rounding
    for cap in (two_rows, 1):  # the resampling is the same whatever the slab size; the softmax's vectorised exp
        assert np.array_equal(results[cap][0], labels)  # may round the last bit differently with the shape
        np.testing.assert_allclose(results[cap][1], probabilities, rtol=0, atol=1e-6)
    assert np.array_equal(labels_on_original_grid(logits, plan, properties, max_values=two_rows)[0], labels)


def test_linear_weights_are_the_align_corners_false_rule():
    low, high, weight = linear_weights(4, 8)  # sources (i + 0.5) / 2 - 0.5 = -0.25 (clamped), 0.25, 0.75, ...
    np.testing.assert_array_equal(low, [0, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(high, [1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_allclose(weight, [0, 0.25, 0.75, 0.25, 0.75, 0.25, 0.75, 0])
    low, high, weight = linear_weights(6, 3)  # sources 0.5, 2.5, 4.5
    np.testing.assert_array_equal(low, [0, 2, 4]) and np.testing.assert_allclose(weight, [0.5, 0.5, 0.5])


def test_the_values_held_at_once_stay_under_the_cap():
    plan = tiny_plan()
    properties = GEOMETRIES["upsampled"] | {"shape_after_crop": [30, 28, 24], "original_shape": [32, 30, 24],
                                            "crop_bbox": [[1, 31], [1, 29], [0, 24]]}
    logits = torch.randn(plan.num_outputs, 5, 6, 5)
    whole = 3 * 30 * 28 * 24  # values of one K x crop-box tensor
    cap = whole // 2
    with LiveValues() as unbounded:
        _whole_grid_reference(logits, plan, properties)
    with LiveValues() as bounded:
        labels, _ = labels_on_original_grid(logits, plan, properties, max_values=cap)
    assert unbounded.peak > 2 * whole  # restored, activated and pasted copies of the whole grid at once
    assert bounded.peak <= cap and len(RestoreSlabs(logits, properties, cap).slabs()) > 2
    np.testing.assert_array_equal(labels, _whole_grid_reference(logits, plan, properties)[0])


def test_a_ct_sized_case_is_restored_within_the_default_cap():
    """512 x 512 x 300 voxels, 41 classes: restoring the whole grid at once would need 3 x 41 x 78.6 M float32
    values (~39 GB); in slabs the values held at once stay within DEFAULT_RESTORE_VALUES (1 GiB of float32).
    Measured on the meta device: shapes only, nothing is allocated."""
    logits = torch.empty((41, 150, 256, 256), device="meta")  # at a target spacing twice as coarse
    properties = _properties((150, 256, 256), (300, 512, 512), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0))
    whole_grid_bytes = 3 * 41 * 300 * 512 * 512 * 4
    assert whole_grid_bytes > 38e9
    plan = tiny_plan({"background": 0, **{f"class_{value}": value for value in range(1, 41)}})
    slabs = []

    def consume(rows, restored):
        slabs.append(rows)
        assert restored.shape == (41, rows.stop - rows.start, 512, 512)
        probabilities_to_labels(activate(restored, plan), plan)

    with LiveValues() as held:
        restore_in_slabs(logits, properties, consume)
    assert held.peak <= DEFAULT_RESTORE_VALUES and held.peak * 4 <= 2**30
    assert len(slabs) == -(-300 // RestoreSlabs(logits, properties).rows) and slabs[-1].stop == 300


def test_out_of_memory_on_the_device_finishes_the_restore_on_the_cpu(capsys, monkeypatch):
    plan = tiny_plan()
    properties = GEOMETRIES["separate axis 0"]
    logits = torch.randn(plan.num_outputs, *properties["shape_after_resample"])
    expected = labels_on_original_grid(logits, plan, properties, with_probabilities=True, max_values=4000)
    monkeypatch.setattr(RestoreSlabs, "device", property(lambda self: torch.device("cuda")))  # as if on a GPU
    calls = []
    original_restore = RestoreSlabs.restore

    def restore(self, rows):
        calls.append((rows.start, self.outputs.device.type))
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original_restore(self, rows)

    monkeypatch.setattr(RestoreSlabs, "restore", restore)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    labels, probabilities = labels_on_original_grid(logits, plan, properties, with_probabilities=True, max_values=4000)
    assert calls[1][0] == calls[2][0] and len(calls) == len(RestoreSlabs(logits, properties, 4000).slabs()) + 1
    assert np.array_equal(labels, expected[0]) and np.array_equal(probabilities, expected[1])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case 'c': out of GPU memory restoring the prediction" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_restore_in_slabs_matches_the_cpu():
    plan = tiny_plan()
    properties = GEOMETRIES["separate axis 0"]
    logits = torch.randn(plan.num_outputs, *properties["shape_after_resample"]) * 3
    labels_cpu, probabilities_cpu = labels_on_original_grid(logits, plan, properties, True, max_values=4000)
    labels_gpu, probabilities_gpu = labels_on_original_grid(logits.cuda(), plan, properties, True, max_values=4000)
    np.testing.assert_allclose(probabilities_gpu, probabilities_cpu, rtol=0, atol=1e-5)
    assert (labels_gpu != labels_cpu).mean() < 1e-3  # only a near-tie may go the other way
