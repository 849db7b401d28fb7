"""Prediction in bounded memory: the sliding window hands finished rows on as it moves down the image, the
restoration to the original grid takes them as they come, and probabilities go to disk slab by slab. Each is
checked against the whole-volume computation it replaces, and for what it holds at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_predictor import REGIONS, tiny_plan, write_case
from tests.test_restore import GEOMETRIES, LiveValues
from voxseg.data.io import Geometry, read_image
from voxseg.data.restore import RestoreSlabs, StreamingRestore, restore_in_slabs
from voxseg.infer.casefiles import ProbabilityFile, save_probabilities
from voxseg.infer.config import InferConfig, Tiling
from voxseg.infer.postprocess import OriginalGrid, labels_on_original_grid, probability_names
from voxseg.infer.predictor import Predictor, find_input_cases
from voxseg.infer.sliding_window import sliding_window_inference
from voxseg.models import build_network


def _conv_net(channels: int = 1, outputs: int = 3, ndim: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if ndim == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(channels, 4, 3, padding=1), torch.nn.ReLU(), conv(4, outputs, 3, padding=1)).eval()


class Rows:
    """A consumer that checks the order and copies what it is given (the values are a view of the band)."""

    def __init__(self) -> None:
        self.parts: list[tuple[slice, torch.Tensor]] = []

    def __call__(self, rows: slice, values: torch.Tensor) -> None:
        expected = self.parts[-1][0].stop if self.parts else 0
        assert rows.start == expected and values.shape[1] == rows.stop - rows.start
        self.parts.append((rows, values.clone()))

    def joined(self) -> torch.Tensor:
        return torch.cat([values for _, values in self.parts], 1)


@pytest.mark.parametrize("shape, patch, step", [
    ((37, 20, 18), (8, 8, 8), 0.5),     # several row groups, uneven starts
    ((30, 21, 19), (10, 8, 12), 0.33),  # overlaps of more than half a tile
    ((16, 16, 16), (16, 16, 16), 0.5),  # one tile
    ((5, 20, 9), (8, 8, 12), 0.5),      # shorter than the patch along two axes: padded
    ((24, 10, 10), (8, 8, 8), 1.0),     # tiles that only touch
])
def test_rows_handed_on_are_exactly_the_whole_volume_result(shape, patch, step):
    net = _conv_net()
    image = torch.randn(1, 1, *shape)
    tiling = Tiling.default(step=step, tile_batch=3, mirror_axes=(0, 2))
    whole = sliding_window_inference(net, image, patch, 3, tiling)
    rows = Rows()
    assert sliding_window_inference(net, image, patch, 3, tiling, consume=rows) is None
    assert rows.parts[-1][0].stop == shape[0] and len(rows.parts) > (1 if shape[0] > patch[0] else 0)
    assert torch.equal(rows.joined(), whole)  # the same sums in the same order: bit for bit


@pytest.mark.parametrize("slice_axis", [0, 1])
def test_a_2d_network_hands_on_rows_too(slice_axis):
    net = _conv_net(ndim=2)
    image = torch.randn(1, 1, 12, 14, 10)
    patch = (8, 8)
    whole = sliding_window_inference(net, image, patch, 3, Tiling.default(), slice_axis)
    rows = Rows()
    sliding_window_inference(net, image, patch, 3, Tiling.default(), slice_axis, consume=rows)
    assert torch.equal(rows.joined(), whole)


def test_the_band_holds_a_tile_depth_not_the_image():
    """Doubling the image's depth (48 -> 96 rows, tiles of 8) adds 48 rows of K values to what the whole result
    holds at once, and nothing to what handing rows on holds (a band of 8 rows)."""
    net = _conv_net(outputs=6)
    tiling = Tiling.default(tile_batch=1)
    peaks = {}
    for depth in (48, 96):
        image = torch.randn(1, 1, depth, 16, 16)
        with LiveValues() as whole:
            sliding_window_inference(net, image, (8, 8, 8), 6, tiling)
        with LiveValues() as streamed:
            sliding_window_inference(net, image, (8, 8, 8), 6, tiling, consume=lambda rows, values: None)
        peaks[depth] = whole.peak, streamed.peak
    band = 6 * 8 * 16 * 16
    assert peaks[96][0] - peaks[48][0] >= 6 * 48 * 16 * 16
    assert abs(peaks[96][1] - peaks[48][1]) < band / 2 and peaks[96][1] < peaks[96][0] / 3


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", ["labels", "regions"])
@pytest.mark.parametrize("chunks", [(1,), (3, 1, 2), (100,)])
def test_streamed_restore_equals_restoring_the_whole_outputs(geometry, kind, chunks):
    """Linear and nearest (separate axis) resampling, softmax and sigmoid regions, rows arriving in pieces of
    any size, slabs that do not divide the crop box: the same labels and probabilities as `restore_in_slabs`
    on the whole outputs (itself checked against F.interpolate on the whole grid in test_restore.py)."""
    plan = tiny_plan() if kind == "labels" else tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3])
    properties = GEOMETRIES[geometry]
    logits = torch.randn(plan.num_outputs, *properties["shape_after_resample"],
                         generator=torch.Generator().manual_seed(7)) * 3
    cap = RestoreSlabs(logits, properties).footprint(3)  # slabs of 3 rows: they do not divide the crop boxes
    expected = labels_on_original_grid(logits, plan, properties, with_probabilities=True, max_values=cap)
    grid = OriginalGrid(plan, properties, with_probabilities=True)
    restorer = StreamingRestore(properties, plan.num_outputs, grid, cap)
    start, index = 0, 0
    while start < logits.shape[1]:
        stop = min(start + chunks[index % len(chunks)], logits.shape[1])
        band = logits[:, start:stop].clone()
        restorer.feed(slice(start, stop), band)
        band.fill_(float("nan"))  # the caller reuses its buffer: nothing of it may be kept
        start, index = stop, index + 1
    restorer.finish()
    np.testing.assert_array_equal(grid.labels, expected[0])
    np.testing.assert_allclose(grid.probabilities, expected[1], rtol=0, atol=1e-6)


def test_a_restore_missing_rows_is_an_error():
    plan = tiny_plan()
    properties = GEOMETRIES["upsampled"]
    restorer = StreamingRestore(properties, plan.num_outputs, OriginalGrid(plan, properties))
    restorer.feed(slice(0, 2), torch.zeros(plan.num_outputs, 2, 6, 5))
    with pytest.raises(ValueError, match="in order"):
        restorer.feed(slice(3, 4), torch.zeros(plan.num_outputs, 1, 6, 5))
    with pytest.raises(RuntimeError, match="2 of 5 rows received"):
        restorer.finish()


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 1.5), (4.0, 1.0, 1.0), (1.0, 0.9, 4.2), (0.6, 0.7, 0.8)])
@pytest.mark.parametrize("kind", ["labels", "regions"])
def test_prediction_streams_to_the_same_labels_as_the_whole_logits(spacing, kind):
    """Predictor.predict_array (sliding window -> StreamingRestore -> labels) against the whole logits restored
    at once, for cases coarser, finer and anisotropic (a separate axis) against the plan's 1 mm."""
    plan = tiny_plan() if kind == "labels" else tiny_plan(REGIONS, channels=2, regions_class_order=[1, 2, 3])
    torch.manual_seed(3)
    predictor = Predictor(plan, [build_network(plan).eval()], InferConfig(mirror_axes="none", device="cpu"))
    predictor.restore_values = 5000  # slabs of a few rows
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 13, 22, 19)).astype(np.float32)
    image[:, :2] = 0  # a crop box smaller than the image
    geometry = Geometry.from_spacing(spacing)
    labels, probabilities = predictor.predict_array(image, geometry, return_probabilities=True, name="c")
    image_pp, properties = predictor.preprocess(image, geometry, "c")
    expected = labels_on_original_grid(predictor.predict_logits(image_pp, "c"), plan, properties, True, 5000)
    np.testing.assert_array_equal(labels, expected[0])
    np.testing.assert_allclose(probabilities, expected[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["labels", "regions"])
def test_probabilities_written_slab_by_slab_equal_the_in_memory_file(tmp_path, kind):
    plan = tiny_plan() if kind == "labels" else tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3])
    properties = GEOMETRIES["down_and_up, one axis kept"]
    logits = torch.randn(plan.num_outputs, *properties["shape_after_resample"]) * 2
    _, in_memory = labels_on_original_grid(logits, plan, properties, with_probabilities=True)
    save_probabilities(tmp_path / "memory.npz", in_memory, probability_names(plan))
    sink = ProbabilityFile(tmp_path / "disk.npz", plan.num_outputs, tuple(properties["original_shape"]),
                           probability_names(plan), background_channel=kind == "labels")
    grid = OriginalGrid(plan, properties, probability_sink=sink)
    restore_in_slabs(logits, properties, grid, RestoreSlabs(logits, properties).footprint(2))
    assert grid.probabilities is None
    sink.commit()
    with np.load(tmp_path / "memory.npz") as memory, np.load(tmp_path / "disk.npz") as disk:
        assert disk["probabilities"].dtype == np.float16
        np.testing.assert_array_equal(disk["probabilities"], memory["probabilities"])
        assert list(disk["class_names"]) == list(memory["class_names"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.npz", "memory.npz"]  # the raw file is gone


def test_a_discarded_probability_file_leaves_nothing(tmp_path):
    sink = ProbabilityFile(tmp_path / "case.npz", 3, (4, 5, 6), ["a", "b", "c"], background_channel=True)
    assert len(list(tmp_path.iterdir())) == 1
    sink.discard()
    assert list(tmp_path.iterdir()) == []


def test_label_values_above_255_are_written_as_uint16(tmp_path):
    labels = {"background": 0, "liver": 1, "vertebra_L1": 300, "vertebra_L2": 301}
    plan = tiny_plan(labels, channels=1)

    def model(x):  # channel 2 (vertebra_L1) wins left of the middle column, channel 3 (vertebra_L2) right of it
        right = torch.zeros_like(x[:, :1])
        right[..., x.shape[-1] // 2:] = 10.0
        return torch.cat([x[:, :1] * 0, x[:, :1] * 0 + 1, x[:, :1] * 0 + 5, right], 1)

    predictor = Predictor(plan, [model], InferConfig(mirror_axes="none", device="cpu", step=1.0))
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32) + 5
    out = predictor.predict_array(image, (1.0, 1.0, 1.0))
    assert out.dtype == np.uint16 and out[..., 0].max() == 300 and out[..., -1].min() == 301
    write_case(tmp_path / "in", "case", image, Geometry.from_spacing((1.0, 1.0, 1.0)))
    predictor.predict_files(find_input_cases(tmp_path / "in", 1, ".nii.gz"), tmp_path / "out")
    written, _ = read_image(tmp_path / "out" / "case.nii.gz")
    np.testing.assert_array_equal(written, out)
