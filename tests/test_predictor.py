"""Predictor: model loading, fold ensembles, regions, file prediction with geometry, bad inputs, postprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from voxseg.data.io import Geometry, read_image, write_image
from voxseg.errors import CheckpointError, InputError
from voxseg.infer.config import InferConfig
from voxseg.infer.postprocess import (
    apply_postprocessing,
    decide_postprocessing,
    keep_largest_component,
    largest_component,
    logits_to_labels,
    regions_to_labels,
)
from voxseg.infer.predictor import Predictor, find_input_cases, resolve_folds
from voxseg.labels import LabelScheme
from voxseg.models import build_network
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan

LABELS = {"background": 0, "edema": 1, "core": 2}
REGIONS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}


def tiny_plan(labels=LABELS, channels=2, regions_class_order=None) -> Plan:
    return Plan(
        dataset_name="Tiny", raw_dataset="/nonexistent", channel_names={str(c): f"ch{c}" for c in range(channels)},
        labels=dict(labels), regions_class_order=regions_class_order, file_ending=".nii.gz",
        target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], batch_size=2,
        network=NetworkPlan(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]]),
        normalization=[ChannelNormalization() for _ in range(channels)],
    )


def make_workdir(root, plan: Plan, folds=(0,), seed=0):
    plan.save(root / "plans.json")
    (root / "dataset.json").write_text(json.dumps({"labels": plan.labels, "file_ending": plan.file_ending}))
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = build_network(plan, deep_supervision=True)
        (root / "training" / f"fold_{fold}").mkdir(parents=True)
        torch.save({"model": net.state_dict(), "plan": plan.to_dict(), "config": {}, "epoch": 0},
                   root / "training" / f"fold_{fold}" / "checkpoint_final.pt")
    return root


def rotated_geometry(spacing=(2.0, 1.0, 1.5)) -> Geometry:
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-12.5, 40.0, 7.25]
    return Geometry(affine)


def write_case(folder, name, image, geometry, ending=".nii.gz"):
    for c in range(image.shape[0]):
        write_image(folder / f"{name}_{c:04d}{ending}", image[c], geometry)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("work"), tiny_plan(), folds=(0, 1))


def test_predict_array_shape_dtype_and_probabilities(workdir):
    predictor = Predictor.from_workdir(workdir, folds=0, device="cpu")
    assert predictor.mirror_axes == (0, 1, 2) and predictor.device.type == "cpu"
    image = np.random.default_rng(0).normal(size=(2, 19, 22, 17)).astype(np.float32)
    labels, probabilities = predictor.predict_array(image, (1.0, 1.0, 1.0), return_probabilities=True)
    assert labels.shape == (19, 22, 17) and labels.dtype == np.uint8
    assert probabilities.shape == (3, 19, 22, 17)
    assert np.allclose(probabilities.sum(0), 1.0, atol=1e-4)
    # at the target spacing nothing is resampled, so the labels are the argmax of the probabilities
    assert np.array_equal(labels, probabilities.argmax(0))
    anisotropic = predictor.predict_array(image, (2.5, 1.0, 0.8))
    assert anisotropic.shape == (19, 22, 17)


def test_fold_ensemble_is_the_mean_of_the_folds_logits(workdir):
    image = np.random.default_rng(1).normal(size=(2, 24, 20, 18)).astype(np.float32)
    both = Predictor.from_workdir(workdir, folds=[0, 1], device="cpu", mirror_axes=None)
    assert len(both.models) == 2
    logits = [Predictor.from_workdir(workdir, folds=[f], device="cpu", mirror_axes=None).predict_logits(image)
              for f in (0, 1)]
    assert torch.allclose(both.predict_logits(image), (logits[0] + logits[1]) / 2, atol=1e-5)
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the two folds really differ


def _count_host_copies(monkeypatch) -> dict[str, int]:
    """Counts calls of Tensor.cpu and Tensor.numpy (the ways a tensor goes back to host memory) from now on."""
    counts = {"cpu": 0, "numpy": 0}
    for method in counts:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            counts[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return counts


def test_the_case_goes_from_the_image_to_the_network_without_a_trip_back_to_the_host(workdir, monkeypatch):
    from voxseg.data.preprocess import preprocess_case

    predictor = Predictor.from_workdir(workdir, folds=0, device="cpu", mirror_axes=None)
    image = np.random.default_rng(4).normal(size=(2, 21, 18, 20)).astype(np.float32)
    geometry = Geometry.from_spacing((1.3, 1.0, 0.9))
    counts = _count_host_copies(monkeypatch)
    image_pp, properties = predictor.preprocess(image, geometry, "c")
    logits = predictor.predict_logits(image_pp, "c")
    assert counts == {"cpu": 0, "numpy": 0}  # normalised, resampled and predicted where it was put once
    monkeypatch.undo()
    assert isinstance(image_pp, torch.Tensor) and image_pp.device == predictor.device == logits.device
    stored, _, stored_properties = preprocess_case(image, geometry, predictor.plan, name="c")  # training's path
    assert np.array_equal(image_pp.numpy(), stored) and properties == stored_properties


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prediction_keeps_the_case_on_the_device_and_matches_the_cpu(workdir, monkeypatch):
    from tests.test_sliding_window import full_float32_precision

    on_cpu = Predictor.from_workdir(workdir, folds=0, device="cpu", mirror_axes=None)
    on_gpu = Predictor.from_workdir(workdir, folds=0, device="cuda", mirror_axes=None, amp=False)
    image = np.random.default_rng(5).normal(size=(2, 33, 30, 28)).astype(np.float32)
    geometry = Geometry.from_spacing((1.3, 1.0, 0.9))
    counts = _count_host_copies(monkeypatch)
    image_pp, _ = on_gpu.preprocess(image, geometry, "c")
    logits = on_gpu.predict_logits(image_pp, "c")
    torch.cuda.synchronize()
    assert counts == {"cpu": 0, "numpy": 0}
    monkeypatch.undo()
    assert image_pp.device.type == "cuda" and logits.device.type == "cuda"
    with full_float32_precision():
        labels_gpu, probabilities_gpu = on_gpu.predict_array(image, geometry, return_probabilities=True)
    labels_cpu, probabilities_cpu = on_cpu.predict_array(image, geometry, return_probabilities=True)
    assert np.abs(probabilities_gpu - probabilities_cpu).max() < 1e-4 and (labels_gpu != labels_cpu).mean() < 1e-3


def test_fold_selection_and_missing_checkpoint(workdir, tmp_path):
    assert resolve_folds(workdir, None) == [0, 1]
    assert resolve_folds(workdir, "all") == [0, 1]  # no fold_all trained: every trained fold
    assert resolve_folds(workdir, "0") == [0]
    with pytest.raises(CheckpointError, match=r"fold_3.* not found; this model's trained folds are: 0, 1"):
        Predictor.from_workdir(workdir, folds=[3], device="cpu")
    with pytest.raises(CheckpointError, match="checkpoint_best.pt"):
        Predictor.from_workdir(workdir, folds=[0], checkpoint="best", device="cpu")
    other = make_workdir(tmp_path, tiny_plan(), folds=("all",))
    assert resolve_folds(other, "all") == ["all"]
    assert resolve_folds(other, None) == ["all"]  # the default when fold_all is the only trained model


def test_every_trained_fold_is_the_default(workdir, tmp_path):
    from voxseg.cli.infer import _folds_line
    from voxseg.infer.nnunet_folder import nnunet_folds

    predictor = Predictor.from_workdir(workdir, device="cpu", mirror_axes=None)
    assert predictor.folds == (0, 1) and len(predictor.models) == 2  # as nnU-Net: the ensemble of the folds
    assert _folds_line(predictor, None) == "using folds 0,1 (every trained fold; --folds to choose)"
    assert _folds_line(Predictor.from_workdir(workdir, folds=[1], device="cpu"), [1]) == "using fold 1"
    only_all = Predictor.from_workdir(make_workdir(tmp_path / "w", tiny_plan(), folds=("all",)), device="cpu")
    assert only_all.folds == ("all",)
    assert _folds_line(only_all, None) == "using fold all (the only trained model, fold_all; --folds to choose)"
    for fold in ("all", "0", "2"):  # an nnU-Net model folder: its numbered folds, else fold_all
        (tmp_path / "nnunet" / f"fold_{fold}").mkdir(parents=True)
        (tmp_path / "nnunet" / f"fold_{fold}" / "checkpoint_final.pth").touch()
    assert [p.parent.name for p in nnunet_folds(tmp_path / "nnunet", None, "final")] == ["fold_0", "fold_2"]
    assert [p.parent.name for p in nnunet_folds(tmp_path / "nnunet", "all", "final")] == ["fold_all"]
    for fold in ("0", "2"):
        (tmp_path / "nnunet" / f"fold_{fold}" / "checkpoint_final.pth").unlink()
    assert [p.parent.name for p in nnunet_folds(tmp_path / "nnunet", None, "final")] == ["fold_all"]


def test_regions_to_labels_and_default_order():
    assert LabelScheme({"background": 0, "a": [1, 2, 3], "b": [2, 3], "c": [3]}).class_order == [1, 2, 3]
    probabilities = torch.tensor([[0.9, 0.9, 0.4, 0.1, 0.9],   # whole tumour
                                  [0.9, 0.2, 0.9, 0.1, 0.6],   # core
                                  [0.1, 0.7, 0.9, 0.1, 0.5]])  # enhancing (0.5 is not > 0.5)
    labels = regions_to_labels(probabilities.reshape(3, 5, 1, 1), [1, 2, 3]).flatten().tolist()
    assert labels == [2, 3, 3, 0, 2]


def test_region_based_predictor_outputs_region_labels(tmp_path):
    plan = tiny_plan(REGIONS, channels=1, regions_class_order=[1, 2, 3])
    predictor = Predictor.from_workdir(make_workdir(tmp_path, plan), device="cpu", mirror_axes=None)
    image = np.random.default_rng(2).normal(size=(1, 16, 18, 16)).astype(np.float32)
    labels, probabilities = predictor.predict_array(image, (1.0, 1.0, 1.0), return_probabilities=True)
    assert probabilities.shape == (3, 16, 18, 16) and predictor.class_names == ["whole", "core", "enhancing"]
    expected = regions_to_labels(torch.from_numpy(probabilities), [1, 2, 3]).numpy()
    assert np.array_equal(labels, expected)


def test_predict_files_keeps_the_input_geometry(workdir, tmp_path):
    geometry = rotated_geometry()
    rng = np.random.default_rng(3)
    images = {f"case{i}": rng.normal(size=(2, 12, 21, 15)).astype(np.float32) for i in range(3)}
    for name, image in images.items():
        write_case(tmp_path / "in", name, image, geometry)
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu", mirror_axes=(0,))
    cases = find_input_cases(tmp_path / "in", 2, ".nii.gz")
    assert [c[0] for c in cases] == ["case0", "case1", "case2"]
    result = predictor.predict_files(cases, tmp_path / "out", save_probabilities=True)
    assert result["written"] == 3
    for name, image in images.items():
        labels, out_geometry = read_image(tmp_path / "out" / f"{name}.nii.gz")
        assert labels.shape == image.shape[1:]
        assert out_geometry.allclose(geometry)
        assert np.array_equal(labels, predictor.predict_array(image, geometry))
        saved = np.load(tmp_path / "out" / f"{name}.npz")
        assert saved["probabilities"].dtype == np.float16 and saved["probabilities"].shape == (3, *image.shape[1:])
        assert list(saved["class_names"]) == ["background", "edema", "core"]


def test_predict_files_reports_bad_cases_and_writes_the_others(workdir, tmp_path):
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    image = np.random.default_rng(4).normal(size=(2, 16, 16, 16)).astype(np.float32)
    folder = tmp_path / "in"
    write_case(folder, "good", image, geometry)
    write_case(folder, "missing", image[:1], geometry)                      # no _0001 file
    write_case(folder, "extra", np.concatenate([image, image[:1]]), geometry)  # three channels
    write_case(folder, "broken", image, geometry)
    (folder / "broken_0001.nii.gz").write_bytes(b"\x1f\x8b not really a nifti")
    write_case(folder, "zgood", image, geometry)
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu", mirror_axes=None)
    with pytest.raises(InputError) as info:
        predictor.predict_files(find_input_cases(folder, 2, ".nii.gz"), tmp_path / "out")
    message = str(info.value)
    assert "3 of 5 case(s) failed" in message
    assert "missing: missing channel file(s)" in message and "missing_0001.nii.gz" in message
    assert "extra: 3 channel file(s) found, the model expects 2" in message
    assert "broken: " in message and "broken_0001.nii.gz: cannot be read" in message
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["good.nii.gz", "zgood.nii.gz"]


def test_continue_run_skips_existing_outputs(workdir, tmp_path):
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    image = np.random.default_rng(5).normal(size=(2, 16, 16, 16)).astype(np.float32)
    write_case(tmp_path / "in", "a", image, geometry)
    write_case(tmp_path / "in", "b", image, geometry)
    sentinel = np.full((16, 16, 16), 7, dtype=np.uint8)
    write_image(tmp_path / "out" / "a.nii.gz", sentinel, geometry)
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu", mirror_axes=None)
    result = predictor.predict_files(find_input_cases(tmp_path / "in", 2, ".nii.gz"), tmp_path / "out",
                                     continue_run=True)
    assert result == {"written": 1, "skipped": 1, "out_dir": str(tmp_path / "out")}
    assert np.array_equal(read_image(tmp_path / "out" / "a.nii.gz")[0], sentinel)
    assert read_image(tmp_path / "out" / "b.nii.gz")[0].max() < 3


def test_find_input_cases_layouts(tmp_path):
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    volume = np.zeros((4, 4, 4), dtype=np.float32)
    brats = tmp_path / "brats"
    for case in ("BraTS2021_00001", "BraTS2021_00000"):
        for modality in ("flair", "t1ce", "seg", "t2", "t1"):
            write_image(brats / case / f"{case}_{modality}.nii.gz", volume, geometry)
    cases = find_input_cases([str(brats)], 4, ".nii.gz")
    assert [name for name, _ in cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert [f.name for f in cases[0][1]] == [f"BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    files = [brats / "BraTS2021_00000" / f"BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce")]
    assert find_input_cases(files, 2, ".nii.gz") == [("BraTS2021_00000", files)]
    write_image(tmp_path / "single" / "liver_7_0000.mha", volume, geometry)
    assert find_input_cases(tmp_path / "single" / "liver_7_0000.mha", 1, ".mha")[0][0] == "liver_7"
    with pytest.raises(InputError, match="no cases found"):
        find_input_cases(tmp_path / "single", 1, ".nii.gz")
    with pytest.raises(InputError, match="not found"):
        find_input_cases([tmp_path / "nope_0000.nii.gz"], 1, ".nii.gz")


# ----- postprocessing -------------------------------------------------------------------------------------------
def test_largest_component_and_apply():
    seg = np.zeros((10, 10, 10), dtype=np.uint8)
    seg[1:5, 1:5, 1:5] = 1      # 64 voxels
    seg[7:9, 7:9, 7:9] = 1      # 8 voxels, separate
    seg[1:3, 7:9, 1:3] = 2
    assert largest_component(seg == 1).sum() == 64
    assert largest_component(np.zeros((3, 3, 3), bool)).sum() == 0
    out = apply_postprocessing(seg, {"largest_component": [[1]]})
    assert (out == 1).sum() == 64 and (out == 2).sum() == 8 and (out[7:9, 7:9, 7:9] == 0).all()
    # a region (1 and 2 together) keeps the largest joint blob; everything else in it becomes background
    joint = keep_largest_component(seg, [1, 2])
    assert (joint == 2).sum() == 0 and (joint == 1).sum() == 64
    assert apply_postprocessing(seg, None) is seg


def test_decide_postprocessing_keeps_only_what_helps(tmp_path):
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    for i in range(2):
        ref = np.zeros((20, 20, 20), dtype=np.uint8)
        ref[2:10, 2:10, 2:10] = 1           # class 1: one blob
        ref[14:18, 2:6, 2:6] = 2            # class 2: legitimately two blobs
        ref[14:18, 14:18, 14:18] = 2
        pred = ref.copy()
        pred[15 + i:17 + i, 10:12, 16:18] = 1   # a spurious class-1 blob
        write_image(tmp_path / "ref" / f"c{i}.nii.gz", ref, geometry)
        write_image(tmp_path / "pred" / f"c{i}.nii.gz", pred, geometry)
    spec = decide_postprocessing(tmp_path / "pred", tmp_path / "ref", [1, 2], out_file=tmp_path / "pp.json")
    assert spec["largest_component"] == [[1]]
    assert spec["mean_dice_foreground_candidate"] < spec["mean_dice_before"] < 1.0
    assert json.loads((tmp_path / "pp.json").read_text())["largest_component"] == [[1]]
    fixed = apply_postprocessing(read_image(tmp_path / "pred" / "c0.nii.gz")[0], spec)
    assert np.array_equal(fixed, read_image(tmp_path / "ref" / "c0.nii.gz")[0])


def test_predict_files_reports_progress_only_when_asked(workdir, tmp_path, capsys):
    rng = np.random.default_rng(6)
    for name in ("a", "b"):
        write_case(tmp_path / "in", name, rng.normal(size=(2, 12, 13, 11)).astype(np.float32), rotated_geometry())
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu", mirror_axes=None)
    cases = find_input_cases(tmp_path / "in", 2, ".nii.gz")
    assert predictor.predict_files(cases, tmp_path / "quiet")["written"] == 2
    assert capsys.readouterr().err == ""  # the Python API is quiet by default
    assert predictor.predict_files(cases, tmp_path / "loud", progress=True)["written"] == 2
    lines = capsys.readouterr().err.splitlines()  # captured: no terminal, so a plain line per case
    assert [line.split(":")[0] for line in lines[:2]] == ["a", "b"] and lines[1].endswith(" s (2/2)")
    assert lines[2].startswith("predicted 2 case(s) in ") and len(lines) == 3


def test_predict_files_postprocessing_options(workdir, tmp_path):
    predictor = Predictor.from_workdir(workdir, folds=[0], device="cpu")
    assert predictor.postprocessing is None
    assert predictor._postprocessing_spec("force") == {"largest_component": [[1], [2]]}
    assert predictor._postprocessing_spec(False) is None
    (tmp_path / "pp.json").write_text(json.dumps({"largest_component": [2]}))
    assert predictor._postprocessing_spec(tmp_path / "pp.json")["largest_component"] == [[2]]


def test_labels_are_decided_after_the_probabilities_are_restored():
    from voxseg.data.preprocess import restore_to_original
    from voxseg.infer.postprocess import labels_on_original_grid

    plan = tiny_plan()
    logits = torch.randn(plan.num_outputs, 5, 6, 5, generator=torch.Generator().manual_seed(3)) * 3
    properties = {"name": "c", "original_shape": [12, 14, 11], "crop_bbox": [[1, 11], [1, 13], [0, 10]],
                  "shape_after_crop": [10, 12, 10], "shape_after_resample": [5, 6, 5],
                  "original_spacing": [1.0, 1.0, 1.0], "target_spacing": [2.0, 2.0, 2.0]}
    labels, probabilities = labels_on_original_grid(logits, plan, properties, with_probabilities=True)
    assert labels.shape == (12, 14, 11) and labels.dtype == np.uint8 and probabilities.shape == (3, 12, 14, 11)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)  # linear resampling keeps a distribution
    values = np.array([0] + plan.label_scheme.class_order, dtype=np.uint8)
    np.testing.assert_array_equal(labels, values[probabilities.argmax(0)])  # the decision is taken afterwards
    assert (labels[0] == 0).all() and (labels[:, :, 10] == 0).all()  # outside the crop box: background
    low_labels, _ = logits_to_labels(logits, plan)
    old_rule = restore_to_original(low_labels, properties, is_label=True)
    assert (labels != old_rule).any()  # resampling labels first gives another (blockier) map
    same_grid = {**properties, "shape_after_crop": [5, 6, 5], "crop_bbox": [[1, 6], [1, 7], [0, 5]]}
    np.testing.assert_array_equal(labels_on_original_grid(logits, plan, same_grid)[0],
                                  restore_to_original(low_labels, same_grid, is_label=True))  # no resampling: same


def test_forward_passes_fit_the_free_memory(monkeypatch):
    """On a CPU the predictor caps tiles x mirrored copies per forward pass by the case's memory budget (a pass
    too large is killed, not caught): with room for one tile beyond the rest of the case, calls of 2, and the
    labels of the uncapped run."""
    import voxseg.infer.budget as budget

    plan = tiny_plan()
    torch.manual_seed(0)
    network = build_network(plan, deep_supervision=False).eval()
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return network(x)

    image = np.random.default_rng(0).normal(size=(2, 30, 28, 20)).astype(np.float32)
    predictor = Predictor(plan, [model], InferConfig(mirror_axes=(0, 1, 2), tile_batch=4), device="cpu")
    reference = predictor.predict_array(image, (1.0, 1.0, 1.0))
    assert max(calls) == 32  # 4 tiles x 8 mirrored copies while memory is plentiful
    values = predictor.restore_slab_values()
    one_tile = budget.case_memory(plan, image.shape, (1.0, 1.0, 1.0), torch.device("cpu"), values, 1, "none")
    tile = one_tile.forward
    free = (one_tile.peak + 1.5 * tile) / budget.DEFAULT_BUDGET_SHARE  # the rest of the case and 2.5 tiles
    monkeypatch.setattr(budget, "available_memory_bytes", lambda device: free)
    calls.clear()
    assert np.array_equal(predictor.predict_array(image, (1.0, 1.0, 1.0)), reference)
    assert set(calls) == {2}  # 2 per pass (1 tile x 2 mirrored copies)
