"""nnU-Net v2 model folders: safe checkpoint loading, plans.json translation, weights by structure, prediction."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from voxseg.data.io import Geometry
from voxseg.data.preprocess import preprocess_case
from voxseg.errors import CheckpointError
from voxseg.infer.nnunet import load_nnunet_fold, plan_from_nnunet
from voxseg.infer.nnunet_folder import is_nnunet_model_folder, load_nnunet_checkpoint, nnunet_folds
from voxseg.infer.nnunet_weights import map_nnunet_weights, nnunet_names
from voxseg.infer.predictor import Predictor
from voxseg.models import build_network

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
PLANS = {
    "dataset_name": "Dataset001_Tiny", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "configurations": {
        "3d_fullres": {"batch_size": 2, "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
                       "median_image_size_in_voxels": [16, 16, 16], "normalization_schemes": ["ZScoreNormalization"],
                       "use_mask_for_norm": [False], "architecture": ARCH},
        "3d_bs4": {"inherits_from": "3d_fullres", "batch_size": 4},
    },
    "foreground_intensity_properties_per_channel": {
        "0": {"mean": 10.0, "std": 5.0, "percentile_00_5": -50.0, "percentile_99_5": 200.0}},
}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
           "file_ending": ".nii.gz", "numTraining": 2}


def nnunet_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A voxseg UNet's weights under nnU-Net's names, with the aliases nnU-Net's state dicts also carry."""
    own = network.state_dict()
    weights = {}
    for ours, theirs in nnunet_names(network).items():
        weights[theirs] = own[ours].clone()
        layer = {".conv.": ".all_modules.0.", ".norm.": ".all_modules.1."}
        for part, alias in layer.items():
            if part in theirs:
                weights[theirs.replace(part, alias)] = own[ours].clone()
        if theirs.startswith("encoder."):
            weights["decoder." + theirs] = own[ours].clone()
    return weights


def write_model_folder(root: Path, plans: dict = PLANS, dataset: dict = DATASET, seed: int = 0,
                       configuration: str = "3d_fullres") -> tuple[Path, torch.nn.Module]:
    folder = root / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    # the network nnU-Net runs: on the case transposed by transpose_forward (its own axes)
    plan, options = plan_from_nnunet(dict(plans, transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2]),
                                     dataset, configuration)
    torch.manual_seed(seed)
    network = build_network(plan, deep_supervision=False, **options)
    for param in network.parameters():  # norms and biases away from their identity/zero init
        param.data.add_(0.1 * torch.randn_like(param))
    torch.save({"network_weights": nnunet_state_dict(network), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"ema_fg_dice": [np.float64(0.7)], "dice_per_class_or_region": [[np.float64(0.6)]]},
                "_best_ema": np.float64(0.7), "current_epoch": 1000, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 2) if network.ndim == 3 else (0,)},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder, network.eval()


def test_model_folder_predicts_with_the_networks_logits(tmp_path):
    folder, network = write_model_folder(tmp_path)
    assert is_nnunet_model_folder(folder) and not is_nnunet_model_folder(tmp_path)
    predictor = Predictor.from_workdir(folder, folds=0, device="cpu")
    assert predictor.mirror_axes == (0, 2)  # from the checkpoint, not every axis
    assert predictor.plan.network.conv_per_stage == 2 and predictor.models[0].network.decoder[0][0][0].in_channels == 16
    predictor.mirror_axes = ()
    image = np.random.default_rng(0).normal(50.0, 10.0, (1, 16, 16, 16)).astype(np.float32)
    image_pp, _, _ = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), predictor.plan)
    with torch.no_grad():
        expected = network(torch.as_tensor(image_pp, dtype=torch.float32)[None])[0]
    logits = predictor.predict_logits(image_pp)
    assert torch.allclose(logits, expected, atol=1e-5)
    labels = predictor.predict_array(image, (1.0, 1.0, 1.0))
    assert np.array_equal(labels, expected.argmax(0).numpy().astype(np.uint8))


def test_best_checkpoint_and_missing_fold(tmp_path):
    folder, _ = write_model_folder(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint_best.pth"):
        nnunet_folds(folder, 0, "best")
    os.rename(folder / "fold_0" / "checkpoint_final.pth", folder / "fold_0" / "checkpoint_best.pth")
    assert nnunet_folds(folder, None, "best") == [folder / "fold_0" / "checkpoint_best.pth"]
    with pytest.raises(CheckpointError, match="'latest'"):
        nnunet_folds(folder, 0, "latest")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    folder, _ = write_model_folder(tmp_path)
    marker = tmp_path / "pwned"
    path = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(path, weights_only=False)
    state["logging"]["evil"] = _RunsCode(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_nnunet_checkpoint(path)
    assert "weights_only=False" not in str(info.value) and "refuses to unpickle" in str(info.value)
    with pytest.raises(CheckpointError):
        Predictor.from_workdir(folder, folds=0, device="cpu")
    assert not marker.exists()


def _changed(path: list[str], value) -> dict:
    plans = copy.deepcopy(PLANS)
    node = plans
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return plans


@pytest.mark.parametrize("path, value, named", [
    (["configurations", "3d_fullres", "architecture", "network_class_name"], "my.nets.SwinUNETR", "my.nets.SwinUNETR"),
    (["transpose_forward"], [2, 0, 0], r"transpose_forward \[2, 0, 0\] is not an order"),
    (["transpose_backward"], [2, 0, 1], "does not undo"),
    (["configurations", "3d_fullres", "normalization_schemes"], ["RescaleTo01Normalization"],
     "RescaleTo01Normalization"),
    (["configurations", "3d_fullres", "architecture", "arch_kwargs", "norm_op"], "torch.nn.BatchNorm3d", "BatchNorm3d"),
    (["configurations", "3d_fullres", "architecture", "arch_kwargs", "n_conv_per_stage"], [1, 2, 2],
     "n_conv_per_stage"),
    (["configurations", "3d_fullres", "patch_size"], [16, 16], "Conv3d"),
    (["configurations", "3d_fullres", "patch_size"], [16, 16, 16, 16], "4-entry patch_size"),
])
def test_unsupported_models_are_refused_by_name(path, value, named):
    with pytest.raises(CheckpointError, match=named):
        plan_from_nnunet(_changed(path, value), DATASET, "3d_fullres")


def test_plan_translation_regions_ct_and_inheritance():
    plans = _changed(["configurations", "3d_fullres", "normalization_schemes"], ["CTNormalization"])
    dataset = dict(DATASET, labels={"background": [0], "whole": [1, 2], "tumour": 2}, regions_class_order=[1, 2])
    plan, options = plan_from_nnunet(plans, dataset, "3d_bs4")
    assert plan.batch_size == 4 and plan.patch_size == [16, 16, 16] and options["decoder_conv_per_stage"] == 1
    assert plan.is_region_based and plan.regions == [[1, 2], [2]] and plan.num_outputs == 2
    assert plan.label_scheme.class_order == [1, 2] and plan.labels["background"] == 0
    norm = plan.normalization[0]
    assert (norm.scheme, norm.clip_low, norm.clip_high, norm.mean, norm.std) == ("ct", -50.0, 200.0, 10.0, 5.0)
    masked = _changed(["configurations", "3d_fullres", "use_mask_for_norm"], [True])
    assert plan_from_nnunet(masked, DATASET, "3d_fullres")[0].normalization[0].use_nonzero_mask


def test_weight_shapes_are_checked_by_name(tmp_path):
    folder, network = write_model_folder(tmp_path)
    weights = nnunet_state_dict(network)
    weights["decoder.seg_layers.1.weight"] = torch.zeros(5, 4, 1, 1, 1)
    with pytest.raises(CheckpointError, match=r"decoder.seg_layers.1.weight has shape \(5, 4, 1, 1, 1\)"):
        map_nnunet_weights(weights, network, "ck.pth")
    weights = nnunet_state_dict(network)
    weights["encoder.stages.3.0.convs.0.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="encoder.stages.3.0.convs.0.conv.weight"):
        map_nnunet_weights(weights, network, "ck.pth")
    del weights["encoder.stages.3.0.convs.0.conv.weight"], weights["decoder.transpconvs.0.weight"]
    with pytest.raises(CheckpointError, match="decoder.transpconvs.0.weight is missing"):
        map_nnunet_weights(weights, network, "ck.pth")


def test_conv_without_bias_gets_zero_bias(tmp_path):
    folder, network = write_model_folder(tmp_path)
    weights = {k: v for k, v in nnunet_state_dict(network).items() if not (k.endswith("conv.bias") or
                                                                          "transpconvs" in k and k.endswith("bias"))}
    mapped = map_nnunet_weights(weights, network, "ck.pth")
    assert float(mapped["encoder.0.0.0.bias"].abs().sum()) == 0.0 and "heads.0.bias" in mapped
    net, _, axes = load_nnunet_fold(folder, folder / "fold_0" / "checkpoint_final.pth")
    assert axes == (0, 2)


def test_residual_encoder_unet_loads_with_pooled_skips(tmp_path):
    kwargs = {k: v for k, v in ARCH["arch_kwargs"].items() if k != "n_conv_per_stage"}
    arch = dict(ARCH, network_class_name="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                arch_kwargs=dict(kwargs, n_blocks_per_stage=[1, 2, 2]))
    plans = _changed(["configurations", "3d_fullres", "architecture"], arch)
    folder, network = write_model_folder(tmp_path, plans)
    names = nnunet_names(network)
    assert names["stem.0.weight"] == "encoder.stem.convs.0.conv.weight"
    assert names["encoder.1.0.skip.1.0.weight"] == "encoder.stages.1.blocks.0.skip.1.conv.weight"  # after the AvgPool
    assert isinstance(network.encoder[1][0].skip[0], torch.nn.AvgPool3d) and len(network.encoder[1]) == 2
    loaded, plan, _ = load_nnunet_fold(folder, folder / "fold_0" / "checkpoint_final.pth")
    assert plan.network.residual
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(image), network(image))
    with pytest.raises(CheckpointError, match="BottleneckD"):
        arch["arch_kwargs"]["block"] = "dynamic_network_architectures.building_blocks.residual.BottleneckD"
        plan_from_nnunet(_changed(["configurations", "3d_fullres", "architecture"], arch), DATASET, "3d_fullres")


TRANSPOSED_ARCH = copy.deepcopy(ARCH)
TRANSPOSED_ARCH["arch_kwargs"].update(kernel_sizes=[[1, 3, 3], [3, 1, 3], [3, 3, 1]],
                                      strides=[[1, 1, 1], [1, 2, 2], [2, 2, 1]])


def transposed_plans(forward: list[int]) -> dict:
    """PLANS planned with `forward` as transpose_forward: every per-axis value in nnU-Net's transposed order."""
    plans = copy.deepcopy(PLANS)
    plans.update(transpose_forward=forward, transpose_backward=[forward.index(a) for a in range(3)],
                 original_median_spacing_after_transp=[3.0, 1.0, 0.5])
    plans["configurations"]["3d_fullres"].update(patch_size=[8, 16, 12], spacing=[3.0, 1.0, 0.5],
                                                 median_image_size_in_voxels=[8, 16, 12], architecture=TRANSPOSED_ARCH)
    return plans


@pytest.mark.parametrize("forward", [[2, 0, 1], [1, 0, 2]])
def test_transposed_model_runs_on_the_untransposed_case(tmp_path, forward):
    plans = transposed_plans(forward)
    folder, network = write_model_folder(tmp_path, plans)  # `network` works in nnU-Net's transposed axes
    backward = plans["transpose_backward"]
    predictor = Predictor.from_workdir(folder, folds=0, device="cpu")
    plan = predictor.plan
    assert plan.target_spacing == [[3.0, 1.0, 0.5][backward[a]] for a in range(3)]
    assert plan.patch_size == [[8, 16, 12][backward[a]] for a in range(3)]
    assert plan.original_median_spacing == plan.target_spacing
    assert plan.network.strides[2] == [[2, 2, 1][backward[a]] for a in range(3)]
    assert predictor.mirror_axes == tuple(sorted(forward[a] for a in (0, 2)))  # nnU-Net's axes 0 and 2
    image = torch.randn(1, 1, *[[8, 16, 12][backward[a]] for a in range(3)])
    with torch.no_grad():
        expected = network(image.permute(0, 1, *[2 + a for a in forward])).permute(0, 1, *[2 + a for a in backward])
        logits = predictor.models[0](image)
    assert logits.shape == expected.shape and torch.allclose(logits, expected, atol=1e-5)
    assert float((logits - expected).abs().max()) < 1e-5 and float(expected.std()) > 1e-2
    # the sliding window, mirroring included, on a case larger than the patch: nnU-Net's result in the case's axes
    predictor.mirror_axes = (forward[0],)
    case = np.random.default_rng(0).normal(0.0, 1.0, (1, *[[10, 20, 14][backward[a]] for a in range(3)]))
    ours = predictor.predict_logits(case.astype(np.float32))
    plan_t, _ = plan_from_nnunet(dict(plans, transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2]), DATASET,
                                 "3d_fullres")
    reference = Predictor(plan_t, [network], predictor.config.replace(mirror_axes=(0,)), torch.device("cpu"))
    theirs = reference.predict_logits(np.ascontiguousarray(case.transpose(0, *[1 + a for a in forward])).astype(
        np.float32)).permute(0, *[1 + a for a in backward])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_transposed_model_predicts_in_the_input_geometry(tmp_path):
    folder, _ = write_model_folder(tmp_path / "results", transposed_plans([2, 0, 1]))
    _predict_keeps_geometry(folder, tmp_path, (18, 11, 9), (0.6, 1.1, 2.8))


def _predict_keeps_geometry(folder, tmp_path, shape, spacing) -> None:
    """`voxseg predict -m FOLDER` on one random case writes labels with the case's shape and affine."""
    from voxseg.cli import main
    from voxseg.data.io import read_image, write_image

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = np.random.default_rng(2).normal(50.0, 10.0, shape).astype(np.float32)
    geometry = Geometry.from_spacing(spacing)
    write_image(inputs / "case_0000.nii.gz", image, geometry)
    assert main(["predict", "-m", str(folder), "-i", str(inputs), "-o", str(tmp_path / "out"), "--folds", "0",
                 "--device", "cpu"]) == 0
    labels, written = read_image(tmp_path / "out" / "case.nii.gz")
    assert labels.shape == image.shape and np.allclose(written.to_list(), geometry.to_list())


ARCH_2D = copy.deepcopy(ARCH)
ARCH_2D["arch_kwargs"].update(conv_op="torch.nn.modules.conv.Conv2d",
                              norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                              kernel_sizes=[[1, 3], [3, 3], [3, 1]], strides=[[1, 1], [2, 1], [2, 2]])


def plans_2d(forward: list[int], arch: dict = ARCH_2D) -> dict:
    """A 2d configuration planned with `forward` (nnU-Net slices along its axis 0, the case axis forward[0])."""
    plans = copy.deepcopy(PLANS)
    plans.update(transpose_forward=forward, transpose_backward=[forward.index(a) for a in range(3)],
                 original_median_spacing_after_transp=[3.0, 1.0, 0.5], original_median_shape_after_transp=[6, 16, 8])
    plans["configurations"]["2d"] = {"batch_size": 8, "patch_size": [16, 8], "spacing": [1.0, 0.5],
                                     "median_image_size_in_voxels": [16, 8],
                                     "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                                     "architecture": arch}
    return plans


def _nnunet_2d_logits(network: torch.nn.Module, case: np.ndarray, forward: list[int]) -> torch.Tensor:
    """What nnU-Net's 2d model computes: the case transposed, each slice along axis 0 through the network, and the
    stacked logits transposed back."""
    transposed = torch.as_tensor(case).permute(0, *[1 + a for a in forward])
    with torch.no_grad():
        logits = torch.stack([network(transposed[None, :, k])[0] for k in range(transposed.shape[1])], dim=1)
    return logits.permute(0, *[1 + forward.index(a) for a in range(3)])


@pytest.mark.parametrize("forward", [[0, 1, 2], [1, 2, 0]])
def test_2d_model_slices_along_the_coarse_axis(tmp_path, forward):
    plans = plans_2d(forward)
    folder, network = write_model_folder(tmp_path, plans, configuration="2d")
    predictor = Predictor.from_workdir(folder, folds=0, device="cpu")
    plan, backward = predictor.plan, plans["transpose_backward"]
    plane = forward[1:]  # the case axes of nnU-Net's network axes 0 and 1
    assert plan.network.ndim == 2 and plan.slice_axis == forward[0] and plan.keep_slice_spacing
    assert plan.patch_size == ([16, 8] if plane == sorted(plane) else [8, 16])
    assert plan.target_spacing == [[3.0, 1.0, 0.5][backward[a]] for a in range(3)]
    assert plan.median_shape_after_resample == [[6, 16, 8][backward[a]] for a in range(3)]
    assert predictor.mirror_axes == ((0,) if plane == sorted(plane) else (1,))  # nnU-Net's network axis 0 of (0, 2)
    predictor.mirror_axes = ()
    shape = [[5, 16, 8][backward[a]] for a in range(3)]  # a plane of the patch's size: one tile per slice
    case = np.random.default_rng(0).normal(0.0, 1.0, (1, *shape)).astype(np.float32)
    expected = _nnunet_2d_logits(network, case, forward)
    logits = predictor.predict_logits(case)
    assert logits.shape == expected.shape and float(expected.std()) > 1e-2
    assert float((logits - expected).abs().max()) < 1e-5
    # preprocessing resamples the plane only: the slice axis keeps the case's spacing
    spacing = [[2.2, 1.0, 0.5][backward[a]] for a in range(3)]
    image_pp, _, properties = preprocess_case(case, Geometry.from_spacing(tuple(spacing)), plan)
    assert list(image_pp.shape[1:]) == shape and properties["target_spacing"] == spacing


def test_2d_residual_encoder_unet(tmp_path):
    kwargs = {k: v for k, v in ARCH_2D["arch_kwargs"].items() if k != "n_conv_per_stage"}
    arch = dict(ARCH_2D, network_class_name="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                arch_kwargs=dict(kwargs, n_blocks_per_stage=[1, 2, 2]))
    forward = [2, 1, 0]
    folder, network = write_model_folder(tmp_path, plans_2d(forward, arch), configuration="2d")
    assert isinstance(network.encoder[1][0].skip[0], torch.nn.AvgPool2d)
    predictor = Predictor.from_workdir(folder, folds=0, device="cpu", mirror_axes=None)
    assert predictor.plan.network.residual and predictor.plan.slice_axis == 2
    case = np.random.default_rng(1).normal(0.0, 1.0, (1, 8, 16, 3)).astype(np.float32)
    expected = _nnunet_2d_logits(network, case, forward)
    assert float((predictor.predict_logits(case) - expected).abs().max()) < 1e-5


def test_2d_model_predicts_in_the_input_geometry(tmp_path):
    folder, _ = write_model_folder(tmp_path / "results", plans_2d([1, 2, 0]), configuration="2d")
    _predict_keeps_geometry(folder, tmp_path, (13, 4, 11), (0.7, 2.5, 1.2))


def test_keep_slice_spacing_is_for_2d_plans_only():
    from voxseg.errors import ConfigError
    from voxseg.plans import Plan

    plan, _ = plan_from_nnunet(PLANS, DATASET, "3d_fullres")
    assert not plan.keep_slice_spacing and plan.case_target_spacing([2.0, 3.0, 4.0]) == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="keep_slice_spacing applies to 2D plans only"):
        Plan.from_dict(dict(plan.to_dict(), keep_slice_spacing=True))


def test_a_cascade_stage_model_folder_is_refused_by_name(tmp_path):
    plans = copy.deepcopy(PLANS)
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    with pytest.raises(CheckpointError, match="'3d_cascade_fullres' is an nnU-Net cascade stage.*'3d_lowres'"):
        plan_from_nnunet(plans, DATASET, "3d_cascade_fullres")
