"""`voxseg import nnunet MODEL WORKDIR`: an nnU-Net v2 model folder as a voxseg work directory.

The model folders are written by the tests themselves (tests/test_nnunet.py's helper), no nnU-Net install.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_nnunet import ARCH, DATASET, PLANS, _RunsCode, write_model_folder
from voxseg.cli import main
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.data.preprocess import preprocess_case
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.archive import export_archive, install_archive
from voxseg.infer.nnunet_import import import_nnunet
from voxseg.infer.predictor import Predictor
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


def add_fold(folder: Path, fold: int, seed: int) -> None:
    """Another fold_N with other weights of the same network."""
    other, _ = write_model_folder(folder.parent / f"seed{seed}", seed=seed)
    shutil.copytree(other / "fold_0", folder / f"fold_{fold}")
    state = torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)
    state["inference_allowed_mirroring_axes"] = (0, 2)
    torch.save(state, folder / f"fold_{fold}" / "checkpoint_final.pth")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_imported_workdir_predicts_exactly_like_the_model_folder(tmp_path):
    folder, _ = write_model_folder(tmp_path / "results")
    add_fold(folder, 1, seed=3)
    work = tmp_path / "work"
    code, out, _ = run_cli("import", "nnunet", folder, work)
    assert code == 0 and "folds 0,1" in out and f"voxseg predict -m {work}" in out
    assert "no fold_X/validation predictions" in out  # and so no postprocessing decision
    for fold in (0, 1):
        fold_dir = work / "training" / f"fold_{fold}"
        assert sorted(p.name for p in fold_dir.iterdir()) == ["checkpoint_final.pt", "config.json",
                                                              "model_final.safetensors", "plans.json"]
        state = torch.load(fold_dir / "checkpoint_final.pt", weights_only=True)  # a plain voxseg checkpoint
        assert state["format"] == 2 and state["progress"]["epoch"] == 1000 and state["config"]["loop"]["epochs"] == 1000
        assert Plan.load(fold_dir / "plans.json").to_dict() == state["plan"]
    assert Plan.load(work / "plans.json").inference_mirror_axes == [0, 2]

    source = json.loads(WorkDir(work).nnunet_source.read_text())
    assert (source["trainer"], source["plans_name"], source["configuration"]) == (
        "nnUNetTrainer", "nnUNetPlans", "3d_fullres")
    assert source["source"] == str(folder.resolve()) and source["checkpoint"] == "final"
    digest = hashlib.sha256((folder / "fold_1" / "checkpoint_final.pth").read_bytes()).hexdigest()
    assert source["folds"]["1"]["sha256"] == digest

    theirs = Predictor.from_workdir(folder, folds=None, device="cpu")
    ours = Predictor.from_workdir(work, folds=None, device="cpu")
    assert ours.mirror_axes == theirs.mirror_axes == (0, 2) and len(ours.models) == 2
    image = np.random.default_rng(1).normal(50.0, 10.0, (1, 20, 18, 16)).astype(np.float32)
    image_pp, _, _ = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), ours.plan)
    assert torch.equal(ours.predict_logits(image_pp), theirs.predict_logits(image_pp))

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_image(inputs / "case_0000.nii.gz", image[0], Geometry.from_spacing((1.2, 1.0, 0.9)))
    for model, out_dir in ((folder, "pred_nnunet"), (work, "pred_import")):
        assert run_cli("predict", "-m", model, "-i", inputs, "-o", tmp_path / out_dir, "--folds", "all",
                       "--device", "cpu")[0] == 0
    a, _ = read_image(tmp_path / "pred_nnunet" / "case.nii.gz")
    b, _ = read_image(tmp_path / "pred_import" / "case.nii.gz")
    assert np.array_equal(a, b) and len(np.unique(a)) > 1


def test_residual_encoder_import_needs_no_options_outside_the_plan(tmp_path):
    kwargs = {k: v for k, v in ARCH["arch_kwargs"].items() if k != "n_conv_per_stage"}
    kwargs.update(n_blocks_per_stage=[1, 2, 2], norm_op_kwargs={"eps": 1e-3, "affine": True},
                  nonlin_kwargs={"negative_slope": 0.05, "inplace": True})
    arch = dict(ARCH, network_class_name="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                arch_kwargs=kwargs)
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_fullres"]["architecture"] = arch
    folder, network = write_model_folder(tmp_path / "results", plans)
    work = tmp_path / "work"
    import_nnunet(folder, work)
    plan = Plan.load(work / "training" / "fold_0" / "plans.json")
    assert (plan.network.blocks_per_stage, plan.network.pooled_skip, plan.network.decoder_conv_per_stage) == (
        [1, 2, 2], True, 1)
    assert (plan.network.norm_eps, plan.network.negative_slope) == (1e-3, 0.05)
    runner = Predictor.from_workdir(work, folds=0, device="cpu").models[0]  # the network as the CPU runs it
    loaded = runner.network
    assert loaded.encoder[0][0].conv1[1].eps == 1e-3 and loaded.encoder[0][0].conv1[2].negative_slope == 0.05
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(runner(image), network(image), atol=1e-5, rtol=1e-5)


def test_refusals_write_nothing(tmp_path):
    folder, _ = write_model_folder(tmp_path / "results")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--force"):
        import_nnunet(folder, work)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]

    with pytest.raises(CheckpointError, match=r"fold_3/checkpoint_final.pth not found"):
        import_nnunet(folder, tmp_path / "w2", folds=[0, 3])
    with pytest.raises(CheckpointError, match="checkpoint_best.pth"):
        import_nnunet(folder, tmp_path / "w2", checkpoint="best")
    with pytest.raises(CheckpointError, match="lacks dataset.json"):
        os.rename(folder / "dataset.json", tmp_path / "dataset.json")
        import_nnunet(folder, tmp_path / "w2")
    os.rename(tmp_path / "dataset.json", folder / "dataset.json")
    with pytest.raises(CheckpointError, match="not an nnU-Net v2 model folder"):
        import_nnunet(tmp_path, tmp_path / "w2")
    assert not (tmp_path / "w2").exists()

    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my.nets.SwinUNETR"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="my.nets.SwinUNETR"):
        import_nnunet(folder, tmp_path / "w2")
    (folder / "plans.json").write_text(json.dumps(PLANS))
    dataset = dict(DATASET, overwrite_image_reader_writer="NibabelIOWithReorient")
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(CheckpointError, match="overwrite_image_reader_writer 'NibabelIOWithReorient'.*RAS"):
        import_nnunet(folder, tmp_path / "w2")
    (folder / "dataset.json").write_text(json.dumps(DATASET))

    marker = tmp_path / "pwned"
    path = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(path, weights_only=False)
    state["logging"]["evil"] = _RunsCode(marker)
    torch.save(state, path)
    code, _, err = run_cli("import", "nnunet", folder, tmp_path / "w2")
    assert code != 0 and "refuses to unpickle" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "w2").exists()
    assert not [p for p in tmp_path.iterdir() if ".import-" in p.name]  # no staging folder left behind


def test_force_replaces_the_workdir_as_a_whole(tmp_path):
    folder, _ = write_model_folder(tmp_path / "results")
    work = tmp_path / "work"
    work.mkdir()
    (work / "old.txt").write_text("old")
    import_nnunet(folder, work, force=True)
    assert not (work / "old.txt").exists() and (work / "training" / "fold_0" / "checkpoint_final.pt").is_file()
    os.rename(folder / "fold_0" / "checkpoint_final.pth", folder / "fold_0" / "checkpoint_best.pth")
    import_nnunet(folder, work, checkpoint="best", force=True)
    assert sorted(p.name for p in (work / "training" / "fold_0").glob("*.pt")) == ["checkpoint_best.pt"]
    assert json.loads(WorkDir(work).nnunet_source.read_text())["checkpoint"] == "best"
    assert len(Predictor.from_workdir(work, folds=0, checkpoint="best", device="cpu").models) == 1


def test_archive_round_trip_of_an_imported_workdir(tmp_path):
    folder, _ = write_model_folder(tmp_path / "results")
    work = tmp_path / "work"
    import_nnunet(folder, work)
    export_archive(work, tmp_path / "model.zip", folds=[0])
    installed = install_archive(tmp_path / "model.zip", tmp_path / "installed")
    image_pp = np.random.default_rng(2).normal(0.0, 1.0, (1, 16, 16, 16)).astype(np.float32)
    a = Predictor.from_workdir(installed, folds=0, device="cpu")
    b = Predictor.from_workdir(folder, folds=0, device="cpu")
    assert a.mirror_axes == (0, 2) and torch.equal(a.predict_logits(image_pp), b.predict_logits(image_pp))


def test_onnx_export_of_an_imported_workdir(tmp_path):
    pytest.importorskip("onnxruntime")
    from voxseg.infer.export import export_onnx

    folder, _ = write_model_folder(tmp_path / "results")
    import_nnunet(folder, tmp_path / "work")
    assert export_onnx(tmp_path / "work", 0, tmp_path / "model.onnx") < 1e-4


# ----- splits, validation predictions, postprocessing ----------------------------------------------------------
SYNTH_PLANS = copy.deepcopy(PLANS)
SYNTH_PLANS["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"] * 4,
                                                     use_mask_for_norm=[False] * 4)


@pytest.fixture(scope="module")
def crossval_model(tmp_path_factory):
    """A synthetic raw dataset and a 2-fold model folder whose validation predictions are each case's reference
    plus a far-away false positive, which largest-component postprocessing removes; and a postprocessing.pkl
    that would run code if it were ever unpickled."""
    from scipy import ndimage

    from voxseg.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("crossval")
    raw = make_synthetic_dataset(root / "Dataset001_Tiny", num_cases=4, shape=(24, 24, 24), seed=1)
    dataset = json.loads((raw / "dataset.json").read_text())
    folder, _ = write_model_folder(root / "results", SYNTH_PLANS, dataset)
    shutil.copytree(folder / "fold_0", folder / "fold_1")
    names = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").iterdir())
    splits = [{"train": names[2:], "val": names[:2]}, {"train": names[:2], "val": names[2:]}]
    (folder / "splits_final.json").write_text(json.dumps(splits))
    for fold, split in enumerate(splits):
        out = folder / f"fold_{fold}" / "validation"
        out.mkdir()
        (out / "summary.json").write_text("{}")
        for name in split["val"]:
            labels, geometry = read_image(raw / "labelsTr" / f"{name}.nii.gz")
            components, _ = ndimage.label(labels > 0)
            largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
            labels = np.where(components == largest, labels, 0)
            labels[:2, :2, :2] = 1
            write_image(out / f"{name}.nii.gz", labels.astype(np.uint8), geometry)
    marker = root / "pwned"
    with open(folder / "postprocessing.pkl", "wb") as handle:
        pickle.dump(_RunsCode(marker), handle)
    return raw, folder, splits, marker


def test_splits_and_validation_predictions_are_imported(crossval_model, tmp_path):
    raw, folder, splits, marker = crossval_model
    work = tmp_path / "work"
    code, out, _ = run_cli("import", "nnunet", folder, work)
    assert code == 0 and "postprocessing.pkl was not read" in out and "--dataset RAW" in out
    assert json.loads((work / "splits.json").read_text()) == splits
    for fold, split in enumerate(splits):
        copied = sorted(p.name for p in (work / "training" / f"fold_{fold}" / "validation").iterdir())
        assert copied == [f"{name}.nii.gz" for name in split["val"]]  # predictions only, not nnU-Net's summary
    assert json.loads(WorkDir(work).nnunet_source.read_text())["ignored"] == ["postprocessing.pkl"]
    assert not marker.exists()


def test_crossval_at_import_decides_voxsegs_postprocessing(crossval_model, tmp_path):
    raw, folder, _, marker = crossval_model
    work = tmp_path / "work"
    code, out, _ = run_cli("import", "nnunet", folder, work, "--dataset", raw, "--crossval")
    assert code == 0 and "postprocessing: keep the largest foreground component" in out and "postprocessing.pkl" in out
    decision = json.loads((work / "postprocessing.json").read_text())
    assert decision["num_cases"] == 4 and [1, 2, 3] in decision["largest_component"]
    assert decision["mean_dice_foreground_candidate"] > decision["mean_dice_before"]
    assert Plan.load(work / "plans.json").raw_dataset == str(raw.resolve())
    assert Predictor.from_workdir(work, folds=0, device="cpu").postprocessing == decision
    assert not marker.exists()
    # the same decision from the work directory afterwards
    assert run_cli("evaluate", "--crossval", work)[0] == 0
    assert json.loads((work / "postprocessing.json").read_text())["largest_component"] == decision["largest_component"]


def test_splits_and_raw_dataset_must_belong_to_the_model(crossval_model, tmp_path):
    raw, folder, splits, _ = crossval_model
    model = tmp_path / folder.name
    shutil.copytree(folder, model)
    swapped = [splits[1], splits[0]]
    (model / "splits_final.json").write_text(json.dumps(swapped))
    with pytest.raises(CheckpointError, match="does not put in fold 0's validation set"):
        import_nnunet(model, tmp_path / "w")
    (model / "splits_final.json").write_text(json.dumps(splits))
    other = tmp_path / "OtherRaw"
    shutil.copytree(raw, other)
    meta = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps(dict(meta, labels={"background": 0, "lesion": 1})))
    with pytest.raises(ConfigError, match="labels .* differs from the model's"):
        import_nnunet(model, tmp_path / "w", raw_dataset=other)
    code, _, err = run_cli("import", "nnunet", model, tmp_path / "w", "--crossval")
    assert code != 0 and "give it with --dataset RAW" in err
    assert not (tmp_path / "w").exists()


def test_preprocess_then_benchmark_tools_run_on_an_imported_workdir(crossval_model, tmp_path):
    from voxseg.bench.timing import config_for, time_training
    from voxseg.data.preprocess import preprocess_dataset

    raw, folder, _, _ = crossval_model
    work = tmp_path / "work"
    import_nnunet(folder, work, raw_dataset=raw)
    preprocess_dataset(work, progress=False)
    assert len(list((work / "preprocessed").glob("*_seg.npy"))) == 4
    timing = time_training(work, config_for("cpu", 1), iterations=1, warmup=1, repeats=1)
    assert timing.batch_size == 2 and timing.patch_size == [16, 16, 16] and timing.device_step_s > 0


# ----- the other way: a voxseg work directory as an nnU-Net v2 model folder -------------------------------------
def test_export_as_nnunet_model_folder_and_back(tmp_path):
    from tests.test_predictor import make_workdir, tiny_plan
    from voxseg.infer.nnunet_export import export_nnunet

    plan = tiny_plan()
    plan.inference_mirror_axes = [1, 2]
    work = make_workdir(tmp_path / "work", plan, folds=(0, 1))
    code, out, _ = run_cli("export", work, "--format", "nnunet", tmp_path / "results", "--folds", "all")
    folder = tmp_path / "results" / "nnUNetTrainer__voxsegPlans__3d_fullres"
    assert code == 0 and f"nnUNetv2_predict_from_modelfolder -m {folder}" in out
    state = torch.load(folder / "fold_1" / "checkpoint_final.pth", weights_only=True)
    assert state["trainer_name"] == "nnUNetTrainer" and state["inference_allowed_mirroring_axes"] == (1, 2)
    assert "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight" in state["network_weights"]  # nnU-Net's aliases
    ours = Predictor.from_workdir(work, folds="all", device="cpu")
    back = Predictor.from_workdir(folder, folds="all", device="cpu")
    assert back.mirror_axes == ours.mirror_axes == (1, 2) and len(back.models) == 2
    image_pp = np.random.default_rng(3).normal(0.0, 1.0, (2, 16, 16, 16)).astype(np.float32)
    assert torch.equal(back.predict_logits(image_pp), ours.predict_logits(image_pp))
    # and imported again: the same plan as the work directory it came from, up to what nnU-Net has no field for
    import_nnunet(folder, tmp_path / "again")
    again = Plan.load(tmp_path / "again" / "plans.json").to_dict()
    for key in ("channel_names", "labels", "target_spacing", "patch_size", "batch_size", "normalization", "network"):
        assert again[key] == {**plan.to_dict(), "network": {**plan.network.__dict__, "decoder_conv_per_stage": 2}}[key]

    with pytest.raises(CheckpointError, match="is not empty.*--force"):
        export_nnunet(work, tmp_path / "results", folds=[0])
    assert export_nnunet(work, tmp_path / "results", folds=[0], force=True) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "fold_0", "plans.json"]
    residual = tiny_plan()
    residual.network.residual = True
    strided = make_workdir(tmp_path / "strided", residual)
    with pytest.raises(CheckpointError, match="strided 1x1 projection.*pooled_skip=true"):
        export_nnunet(strided, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_residual_export_drops_the_skip_bias_nnunet_does_not_have(tmp_path):
    from tests.test_predictor import make_workdir, tiny_plan
    from voxseg.infer.nnunet_export import export_nnunet

    plan = tiny_plan(channels=1)
    plan.network.residual, plan.network.pooled_skip, plan.network.blocks_per_stage = True, True, [1, 2]
    work = make_workdir(tmp_path / "work", plan)
    path = work / "training" / "fold_0" / "checkpoint_final.pt"
    state = torch.load(path, weights_only=True)
    skip_biases = [k for k in state["model"] if ".skip.1.0." in k and k.endswith(".bias")]
    for key in skip_biases:  # a trained skip-projection bias, which the instance norm after it cancels
        state["model"][key].fill_(0.5)
    assert skip_biases == ["encoder.1.0.skip.1.0.bias"]
    torch.save(state, path)
    ours = Predictor.from_workdir(work, folds=0, device="cpu")
    folder = export_nnunet(work, tmp_path / "out" / "nnUNetTrainer__p__3d_fullres")
    assert folder == tmp_path / "out" / "nnUNetTrainer__p__3d_fullres"
    weights = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    assert "encoder.stages.1.blocks.0.skip.1.norm.weight" in weights
    assert not [k for k in weights if ".skip." in k and k.endswith("conv.bias")]
    plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert plans["arch_kwargs"]["n_blocks_per_stage"] == [1, 2] and "ResidualEncoderUNet" in plans["network_class_name"]
    back = Predictor.from_workdir(folder, folds=0, device="cpu")
    image_pp = np.random.default_rng(4).normal(0.0, 1.0, (1, 16, 16, 16)).astype(np.float32)
    assert torch.allclose(back.predict_logits(image_pp), ours.predict_logits(image_pp), atol=1e-5)


def test_transposed_model_imports_in_the_case_axes(tmp_path):
    from tests.test_nnunet import transposed_plans

    folder, _ = write_model_folder(tmp_path / "results", transposed_plans([2, 0, 1]))
    work = tmp_path / "work"
    import_nnunet(folder, work)
    plan = Plan.load(work / "plans.json")
    assert plan.target_spacing == [1.0, 0.5, 3.0] and plan.patch_size == [16, 12, 8]
    assert plan.inference_mirror_axes == [1, 2]  # nnU-Net's axes 0 and 2
    theirs = Predictor.from_workdir(folder, folds=0, device="cpu")
    ours = Predictor.from_workdir(work, folds=0, device="cpu")
    case = np.random.default_rng(4).normal(0.0, 1.0, (1, 18, 13, 9)).astype(np.float32)
    assert torch.equal(ours.predict_logits(case), theirs.predict_logits(case))


def test_2d_model_imports_as_a_2d_plan(tmp_path):
    from tests.test_nnunet import plans_2d

    folder, _ = write_model_folder(tmp_path / "results", plans_2d([1, 2, 0]), configuration="2d")
    work = tmp_path / "work"
    import_nnunet(folder, work)
    plan = Plan.load(work / "plans.json")
    assert (plan.network.ndim, plan.slice_axis, plan.keep_slice_spacing, plan.patch_size) == (2, 1, True, [8, 16])
    theirs = Predictor.from_workdir(folder, folds=0, device="cpu")
    ours = Predictor.from_workdir(work, folds=0, device="cpu")
    assert ours.mirror_axes == theirs.mirror_axes == (1,)
    case = np.random.default_rng(5).normal(0.0, 1.0, (1, 10, 4, 19)).astype(np.float32)
    assert torch.equal(ours.predict_logits(case), theirs.predict_logits(case))


def _predict_case(model: Path, inputs: Path, out: Path, *options: str) -> np.ndarray:
    code, _, err = run_cli("predict", "-m", model, "-i", inputs, "-o", out, "--folds", "0", "--device", "cpu", *options)
    assert code == 0, err
    return read_image(out / "case.nii.gz")[0]


def _balance_classes(work: Path, image: np.ndarray) -> None:
    """Shift the output biases of fold 0 so that every class wins about as often on `image`: a random network's
    labels are then scattered blobs, which largest-component postprocessing visibly thins out."""
    logits = Predictor.from_workdir(work, folds=0, device="cpu", mirror_axes=None).predict_logits(image)
    path = work / "training" / "fold_0" / "checkpoint_final.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["heads.0.bias"] -= logits.mean(dim=(1, 2, 3))
    torch.save(state, path)


def test_postprocessing_decision_survives_nnunet_export_and_import(tmp_path):
    from tests.test_predictor import make_workdir, tiny_plan

    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    (work / "postprocessing.json").write_text(json.dumps({"largest_component": [[1], [2]], "num_cases": 4}))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = np.random.default_rng(7).normal(0.0, 1.0, (2, 24, 22, 20)).astype(np.float32)
    _balance_classes(work, image)
    for channel in range(2):
        write_image(inputs / f"case_{channel:04d}.nii.gz", image[channel], Geometry.from_spacing((1.0, 1.0, 1.0)))
    original = _predict_case(work, inputs, tmp_path / "original")
    unprocessed = _predict_case(work, inputs, tmp_path / "unprocessed", "--no-postprocess")
    assert (original != unprocessed).sum() > 500  # the decision removes voxels of both classes
    assert all(((original == v) != (unprocessed == v)).any() for v in (1, 2))

    code, _, err = run_cli("export", work, "--format", "nnunet", tmp_path / "results", "--folds", "0")
    assert code == 0, err
    folder = tmp_path / "results" / "nnUNetTrainer__voxsegPlans__3d_fullres"
    exported = json.loads((folder / "voxseg_postprocessing.json").read_text())
    assert exported["largest_component"] == [[1], [2]] and not list(folder.glob("*.pkl"))
    assert np.array_equal(_predict_case(folder, inputs, tmp_path / "from_folder"), original)

    code, out, err = run_cli("import", "nnunet", folder, tmp_path / "again")
    assert code == 0, err
    assert "postprocessing: keep the largest component of classes edema, core (voxseg's cross-validation" in out
    assert "voxseg_postprocessing.json into" in out
    source = json.loads(WorkDir(tmp_path / "again").nnunet_source.read_text())
    assert source["postprocessing"] == "voxseg_postprocessing.json"
    assert json.loads((tmp_path / "again" / "postprocessing.json").read_text())["largest_component"] == [[1], [2]]
    assert np.array_equal(_predict_case(tmp_path / "again", inputs, tmp_path / "imported"), original)


@pytest.mark.parametrize("content, message", [
    ({"largest_component": [[1], [7]]}, r"label value\(s\) \[7\] are not labels of the model"),
    ({"largest_component": "import os"}, "expected {\"largest_component\""),
    ({"largest_component": [[True]]}, "expected {\"largest_component\""),
    ([1, 2], "expected {\"largest_component\""),
])
def test_exported_postprocessing_is_checked_as_untrusted_input(tmp_path, content, message):
    from tests.test_predictor import make_workdir, tiny_plan
    from voxseg.infer.nnunet_export import export_nnunet

    folder = export_nnunet(make_workdir(tmp_path / "work", tiny_plan()), tmp_path / "results")
    (folder / "voxseg_postprocessing.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        import_nnunet(folder, tmp_path / "again")
    assert not (tmp_path / "again").exists()
