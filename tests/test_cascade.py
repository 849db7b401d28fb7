"""The 3d_lowres -> 3d_cascade_fullres cascade: training inputs from the first stage's cross-validation, end-to-end
training and prediction (the first stage runs first), refusals."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_configs import _main, _write_dataset
from test_predictor import REGIONS, tiny_plan
from voxseg.augment import AugmentConfig, augment_batch
from voxseg.data.io import read_image
from voxseg.data.plan import plan_dataset
from voxseg.data.resample import resample, separate_axis
from voxseg.data.restore import RestoreSlabs, StreamingRestore
from voxseg.data.splits import load_splits
from voxseg.data.store import load_case
from voxseg.errors import ConfigError
from voxseg.infer.archive import export_archive, load_fold_network
from voxseg.infer.cascade import (
    NextStageLabels,
    labels_for_next_stage,
    next_stage_grid,
    onehot_previous,
    stored_previous,
    with_first_stage,
)
from voxseg.infer.postprocess import activate, probabilities_to_labels
from voxseg.infer.predictor import Predictor
from voxseg.infer.sliding_window import sliding_window_inference
from voxseg.plans import Plan
from voxseg.train.cache import CaseCache
from voxseg.workdir import WorkDir

TRAIN_3D = ["--epochs", "1", "--iterations", "2", "--device", "cpu", "--set", "logging.tensorboard=false",
            "--set", "logging.progress_png=false", "--set", "logging.progress_bar=false",
            "--set", "loop.val_iterations=1", "--set", "data.num_threads=1", "--set", "plan.batch_size=2",
            "--set", "plan.network.features=[4,8]", "--set", "plan.network.strides=[[1,1,1],[2,2,2]]",
            "--set", "plan.network.kernel_sizes=[[3,3,3],[3,3,3]]", "--set", "plan.patch_size=8,8,4"]


def _cascade_workdir(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny dataset with a 3d_lowres stage (twice the target spacing) and a cascade on top of it, stored as
    `voxseg plan` stores them for large images."""
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)  # four 20x20x12 training cases at 1x1x3 mm, one test case
    plan_dataset(raw, work, num_folds=2)
    base = Plan.load(work / "plans.json")
    index = json.loads(WorkDir(work).configurations.read_text())
    for name, previous, factor in (("3d_lowres", None, 2.0), ("3d_cascade_fullres", "3d_lowres", 1.0)):
        folder = work / "configs" / name
        folder.mkdir(parents=True)
        plan = copy.deepcopy(base)
        plan.configuration, plan.previous_stage = name, previous
        plan.target_spacing = [s * factor for s in base.target_spacing]
        plan.save(folder / "plans.json")
        for meta in ("dataset.json", "fingerprint.json"):
            shutil.copy(work / meta, folder / meta)
        index["configurations"][name] = {"path": f"configs/{name}"}
    index["configurations"]["3d_lowres"]["next_stage"] = "3d_cascade_fullres"
    index["configurations"]["3d_cascade_fullres"]["previous_stage"] = "3d_lowres"
    WorkDir(work).configurations.write_text(json.dumps(index))
    return raw, work


def test_cascade_trains_on_lowres_crossval_and_predicts_lowres_first(tmp_path, capsys):
    raw, work = _cascade_workdir(tmp_path)
    lowres, cascade = work / "configs" / "3d_lowres", work / "configs" / "3d_cascade_fullres"
    for name in ("3d_lowres", "3d_cascade_fullres"):
        assert _main("preprocess", work, "--configuration", name, "--quiet") == 0
    capsys.readouterr()
    # before the first stage's cross-validation there is nothing to train on: refused, naming cases and folds
    assert _main("train", work, "--configuration", "3d_cascade_fullres", "--fold", 0, *TRAIN_3D) != 0
    err = capsys.readouterr().err
    assert "case(s) case0, case1, case2, case3" in err and "fold(s) 0, 1" in err and "Traceback" not in err
    assert not (cascade / "training").exists()

    for fold in (0, 1):
        assert _main("train", work, "--configuration", "3d_lowres", "--fold", fold, *TRAIN_3D) == 0
    stored = WorkDir(lowres).next_stage_predictions("3d_cascade_fullres")
    low_plan, cascade_plan = Plan.load(lowres / "plans.json"), Plan.load(cascade / "plans.json")
    for fold, split in enumerate(load_splits(work)):
        network, _ = load_fold_network(lowres, fold, "final", "cpu")
        for case in split["val"]:  # each case predicted by the fold that did not train on it
            image, _, properties = load_case(lowres / "preprocessed", case)
            logits = sliding_window_inference(network, torch.from_numpy(np.array(image, np.float32))[None],
                                              [8, 8, 4], low_plan.num_outputs)
            expected = labels_for_next_stage(logits, low_plan, properties, cascade_plan)
            full_image, _, _ = load_case(cascade / "preprocessed", case)
            assert expected.shape == full_image.shape[1:] == (20, 20, 12)  # the cascade's grid, not lowres' 10x10x6
            np.testing.assert_array_equal(np.load(stored / f"{case}.npy"), expected)

    # the cascade's inputs: image channel + one-hot of the stored prediction, no intensity change
    cache = CaseCache(cascade / "preprocessed", ["case0", "case3"], previous=stored_previous(cascade, cascade_plan))
    assert cache.extra_channels == 1 and cache.num_channels == 2
    for held, case in zip(cache.images, ["case0", "case3"]):
        image, _, _ = load_case(cascade / "preprocessed", case)
        np.testing.assert_array_equal(np.asarray(held)[0], image[0])
        np.testing.assert_array_equal(np.asarray(held)[1], (np.load(stored / f"{case}.npy") == 1).astype(np.float16))

    assert _main("train", work, "--configuration", "3d_cascade_fullres", "--fold", 0, *TRAIN_3D) == 0
    trained = Plan.load(cascade / "training" / "fold_0" / "plans.json")
    assert trained.previous_stage == "3d_lowres" and trained.network_in_channels == 2
    assert json.loads((cascade / "training" / "fold_0" / "validation" / "summary.json").read_text())["per_case"]

    # benchmark and estimate time the cascade's real data path (image + first-stage channels) and its predictor
    assert _main("benchmark", work, "--configuration", "3d_cascade_fullres", "--device", "cpu", "--iterations", 2,
                 "--warmup", 1, "--repeats", 1, "--threads", 1) == 0
    timed = json.loads((cascade / "benchmark.json").read_text())
    assert timed["training"]["end_to_end_step_s"] > 0 and timed["inference"]
    assert _main("estimate", work, "--configuration", "3d_cascade_fullres", "--device", "cpu", "--iterations", 2,
                 "--epochs", 2, "--warmup", 1, "--rounds", 2) == 0
    assert json.loads((cascade / "estimate.json").read_text())["rows"][0]["step_ms"] > 0

    preds = tmp_path / "preds"
    assert _main("predict", "-m", work, "--configuration", "3d_cascade_fullres", "-i", raw / "imagesTs",
                 "-o", preds, "--device", "cpu", "--no-mirror", "--folds", 0) == 0
    labels, _ = read_image(preds / "case4.nii.gz")
    assert labels.shape == (20, 20, 12) and set(np.unique(labels)) <= {0, 1}

    # the first stage runs first and its segmentation becomes the extra channel
    predictor = Predictor.from_workdir(cascade, folds=[0], device="cpu", mirror_axes=None)
    assert predictor.previous is not None and predictor.previous.plan.configuration == "3d_lowres"
    image, geometry = read_image(raw / "imagesTs" / "case4_0000.nii.gz")
    for foreground in (True, False):
        def fixed(image_pp, name="", consume=None, foreground=foreground):
            logits = torch.zeros((2, *image_pp.shape[1:]))
            logits[1 if foreground else 0] = 5.0
            consume(slice(0, logits.shape[1]), logits)  # the first stage's rows go on as they are finished
        predictor.previous.predict_logits = fixed
        network_input, properties = predictor.preprocess(image[None].astype(np.float32), geometry, "case4")
        assert network_input.shape == (2, *properties["shape_after_resample"])
        assert isinstance(network_input, torch.Tensor)  # the network's input stays on the compute device
        assert bool((network_input[1] == (1.0 if foreground else 0.0)).all())


def test_augmentation_keeps_extra_channels_binary_and_without_intensity_changes():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 12, 12, 8, generator=generator)
    masks = torch.zeros(2, 1, 12, 12, 8)
    masks[:, :, 3:9, 2:8, 2:6] = 1.0
    seg = masks.to(torch.int8)  # the labels and the one-hot channel hold the same mask
    config = AugmentConfig()
    config.rotation_p = config.scale_p = 1.0  # every sample resampled
    config.noise_p = config.brightness_p = config.gamma_p = 1.0  # and every intensity change drawn
    out, out_seg = augment_batch(torch.cat([image, masks], 1), seg, config, np.random.default_rng(1), [8, 8, 4],
                                 extra_channels=1)
    assert out.shape == (2, 2, 8, 8, 4)
    assert set(torch.unique(out[:, 1]).tolist()) <= {0.0, 1.0}
    inside = out_seg[:, 0] >= 0
    agree = (out[:, 1][inside] == out_seg[:, 0][inside].float()).float().mean()
    assert agree > 0.95  # transformed like the labels (linear then 0.5, against nearest): borders may differ
    plain, _ = augment_batch(torch.cat([image, masks], 1), seg, config, np.random.default_rng(1), [8, 8, 4])
    assert set(torch.unique(plain[:, 1]).tolist()) - {0.0, 1.0}  # without extra_channels the masks get noise
    with pytest.raises(Exception, match="extra_channels"):
        augment_batch(masks, seg, config, np.random.default_rng(1), [8, 8, 4], extra_channels=1)


def _whole_volume_next_stage_labels(logits, plan, properties, next_plan) -> np.ndarray:
    """The first stage's labels on the next stage's grid as computed on the whole volume: every channel resampled
    at once (linear; the separate axis nearest), activated, then labels."""
    grid = next_stage_grid(plan, properties, next_plan)
    axis = separate_axis(plan.target_spacing, next_plan.target_spacing)
    resampled = resample(logits, grid["shape_after_crop"], is_label=False, anisotropy_axis=axis, order=1)
    return probabilities_to_labels(activate(resampled, plan), plan).numpy()


@pytest.mark.parametrize("kind", ["labels", "regions"])
@pytest.mark.parametrize("first_spacing, next_spacing", [
    ((2.0, 2.0, 2.0), (1.0, 1.0, 1.0)),   # linear along every axis
    ((6.0, 1.6, 1.6), (3.0, 0.8, 0.8)),   # a separate coarse first axis: nearest along it
    ((1.6, 1.6, 6.0), (0.8, 0.8, 3.0)),   # a separate coarse last axis
])
def test_first_stage_labels_streamed_in_slabs_equal_the_whole_volume(kind, first_spacing, next_spacing):
    """Whole logits in slabs, and rows arriving from a sliding window in pieces, both with slabs of 3 rows that do
    not divide the grid: the same labels as resampling all K channels of the whole volume at once."""
    plan = tiny_plan() if kind == "labels" else tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3])
    next_plan = copy.deepcopy(plan)
    plan.target_spacing, next_plan.target_spacing = list(first_spacing), list(next_spacing)
    shape = (11, 9, 7)
    crop = [round(n * s / o) for n, s, o in zip(shape, first_spacing, (1.0, 0.8, 0.8))]
    properties = {"name": "c", "shape_after_resample": list(shape), "shape_after_crop": crop,
                  "original_spacing": [1.0, 0.8, 0.8]}
    logits = torch.randn(plan.num_outputs, *shape, generator=torch.Generator().manual_seed(3)) * 3
    expected = _whole_volume_next_stage_labels(logits, plan, properties, next_plan)
    grid = next_stage_grid(plan, properties, next_plan)
    assert expected.shape == tuple(grid["shape_after_crop"]) and len(np.unique(expected)) > 2
    cap = RestoreSlabs(logits, grid).footprint(3)
    np.testing.assert_array_equal(labels_for_next_stage(logits, plan, properties, next_plan, max_values=cap), expected)
    sink = NextStageLabels(plan, grid["shape_after_crop"])
    restorer = StreamingRestore(grid, plan.num_outputs, sink, cap)
    for start in range(0, shape[0], 2):  # rows in pieces of 2, as a sliding window hands them on
        restorer.feed(slice(start, min(start + 2, shape[0])), logits[:, start : start + 2].clone())
    restorer.finish()
    np.testing.assert_array_equal(sink.labels, expected)


def test_the_cascade_input_is_the_image_then_the_onehot_of_the_first_stage():
    plan = tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3])
    image = torch.randn(2, 4, 5, 6)
    labels = np.random.default_rng(0).integers(0, 4, (4, 5, 6)).astype(np.uint8)
    made = with_first_stage(image, labels, plan, "c")
    expected = torch.cat([image, onehot_previous(torch.from_numpy(labels), plan)])
    assert made.dtype == torch.float32 and torch.equal(made, expected)
    with pytest.raises(Exception, match="case 'c'.*shape \\[4, 5, 5\\].*expected \\[4, 5, 6\\]"):
        with_first_stage(image, labels[:, :, :5], plan, "c")


def test_onehot_uses_label_values_for_regions():
    labels = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8)

    class Regions:  # the only field onehot_previous reads
        foreground_labels = [1, 2, 3]
    onehot = onehot_previous(labels, Regions())
    assert onehot.shape == (3, 2, 2) and onehot[:, 1, 1].tolist() == [0.0, 0.0, 1.0]


def test_cascade_export_refused_and_missing_first_stage_named(tmp_path):
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)
    plan_dataset(raw, work, num_folds=2)
    plan = Plan.load(work / "plans.json")
    plan.configuration, plan.previous_stage = "3d_cascade_fullres", "3d_lowres"
    with pytest.raises(ConfigError, match="unknown configuration '3d_lowres'"):
        stored_previous(work, plan)  # the first stage is not planned in this work directory
    plan.save(work / "plans.json")
    with pytest.raises(ConfigError, match="cascade stage.*exporting an archive.*not supported"):
        export_archive(work, tmp_path / "model.zip")
