"""Run nnU-Net v2 trained models: plans.json -> voxseg Plan, a fold's weights into a voxseg UNet.

The model folder itself (its layout, folds and safe checkpoint loading) is `voxseg.infer.nnunet_folder`.

Only what voxseg can represent exactly is accepted: 2D and 3D configurations of PlainConvUNet or ResidualEncoderUNet
(BasicBlockD blocks, run as voxseg's residual UNet with `pooled_skip`) with instance norm,
LeakyReLU, no dropout, conv -> norm -> nonlin, the same convolution count in every encoder stage (and in every
decoder level), and z-score / CT normalisation. Anything else is a CheckpointError that
names it. Preprocessing is voxseg's, with nnU-Net's resampling rule (`voxseg.data.resample`: images with
third-order splines, a coarse axis decided per case, logits back linearly before the softmax), so only the
default resampling kwargs of nnU-Net's plans are accepted; other orders or a forced separate axis are refused.

Axis transposition (`transpose_forward`, nnU-Net's planner puts the coarsest axis first) is translated away: nnU-Net
runs its network on the case transposed, so every per-axis value of the configuration (spacing, patch, kernels,
strides, median shapes), the spatial dimensions of every convolution weight and the mirror axes are permuted back
to the case's own axes. A convolution, a transposed convolution and an instance norm of the permuted input with the
permuted weights is the permuted output, so voxseg runs the same function on the untransposed case and nothing
downstream knows of the transposition. A 2d configuration is a voxseg 2D plan slicing along the case axis
transpose_forward[0] (`slice_axis`), which keeps each case's own spacing as nnU-Net's 2d preprocessing does
(`keep_slice_spacing`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from voxseg.data.dataset import check_nnunet_fields
from voxseg.errors import CheckpointError
from voxseg.infer.nnunet_folder import (
    NNUNET_DATASET,
    NNUNET_PLANS,
    configuration_name,
    load_nnunet_checkpoint,
    read_model_json,
)
from voxseg.infer.nnunet_weights import map_nnunet_weights, untranspose_weights
from voxseg.models.factory import build_network
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan

SUPPORTED_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """plans["configurations"][name] with its "inherits_from" chain applied (the child's keys win)."""
    configurations, seen, chain = plans.get("configurations", {}), [], []
    while name is not None:
        if name not in configurations:
            raise CheckpointError(f"plans.json has no configuration '{name}'; it has {', '.join(configurations)}")
        if name in seen:
            raise CheckpointError(f"plans.json: configurations inherit in a circle ({' -> '.join(seen + [name])})")
        seen.append(name)
        chain.append(configurations[name])
        name = configurations[name].get("inherits_from")
    resolved: dict[str, Any] = {}
    for entry in reversed(chain):
        resolved.update(entry)
    return resolved


# ----- plans.json -> Plan ---------------------------------------------------------------------------------------
# nnU-Net's default resampling (resample_data_or_seg_to_shape), the rule voxseg.data.resample implements
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
_RESAMPLING_DEFAULTS = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": False,
                        "separate_z_anisotropy_threshold": 3}  # the function's own defaults
_RESAMPLING_EXPECTED = {"data": {"order": 3, "order_z": 0, "force_separate_z": None},
                        "seg": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                        "probabilities": {"order": 1, "order_z": 0, "force_separate_z": None}}


def _check_resampling(config: dict[str, Any], configuration: str) -> None:
    """Refuse resampling settings other than nnU-Net's defaults (voxseg implements those exactly)."""
    for what, expected in _RESAMPLING_EXPECTED.items():
        fn, kwargs = config.get(f"resampling_fn_{what}"), config.get(f"resampling_fn_{what}_kwargs")
        if fn is None and kwargs is None:
            continue  # plans without the entry: the defaults
        if fn is not None and str(fn).rsplit(".", 1)[-1] != _RESAMPLING_FN:
            raise CheckpointError(f"plans.json: configuration '{configuration}' resamples {what} with {fn}; voxseg "
                                  f"implements only nnU-Net's default {_RESAMPLING_FN}")
        effective = {**_RESAMPLING_DEFAULTS, **(kwargs or {})}
        wanted = {**_RESAMPLING_DEFAULTS, **expected}
        differ = [f"{k}={effective.get(k)!r}" for k in sorted(set(effective) | set(wanted))
                  if effective.get(k) != wanted.get(k)]
        if differ:
            raise CheckpointError(f"plans.json: configuration '{configuration}' resampling_fn_{what}_kwargs has "
                                  f"{', '.join(differ)}; voxseg implements only nnU-Net's default resampling "
                                  f"({', '.join(f'{k}={v!r}' for k, v in expected.items())})")


def _require_uniform(values: int | Sequence[int], what: str) -> int:
    values = [values] if isinstance(values, int) else list(values)
    if len(set(values)) != 1:
        raise CheckpointError(f"plans.json: {what} {values} differ between stages; voxseg's UNet uses one count "
                              "for every stage")
    return int(values[0])


def _check_layers(arch: dict[str, Any], ndim: int) -> None:
    """Refuse layer settings voxseg's UNet does not have (it is conv(bias) -> instance norm -> LeakyReLU)."""
    kwargs = arch["arch_kwargs"]
    norm, nonlin = str(kwargs.get("norm_op")), str(kwargs.get("nonlin"))
    problems = []
    if not norm.endswith(f"InstanceNorm{ndim}d"):
        problems.append(f"norm_op {norm} (voxseg runs nnU-Net's InstanceNorm{ndim}d in a {ndim}D configuration)")
    elif not (kwargs.get("norm_op_kwargs") or {}).get("affine", False):
        problems.append("a non-affine instance norm")
    if nonlin != "torch.nn.LeakyReLU":
        problems.append(f"nonlin {nonlin} (voxseg runs torch.nn.LeakyReLU)")
    if kwargs.get("dropout_op") is not None:
        problems.append(f"dropout_op {kwargs['dropout_op']}")
    if kwargs.get("nonlin_first"):
        problems.append("nonlin_first (conv -> nonlin -> norm)")
    if not str(kwargs.get("conv_op")).endswith(f"Conv{ndim}d"):
        problems.append(f"conv_op {kwargs.get('conv_op')} (a {ndim}D configuration runs Conv{ndim}d)")
    if problems:
        raise CheckpointError("plans.json: voxseg cannot represent this nnU-Net network exactly: "
                              + "; ".join(problems))


def _check_residual(kwargs: dict[str, Any], features: list[int]) -> None:
    """ResidualEncoderUNet options voxseg's residual UNet has: BasicBlockD blocks, a stem of features[0]."""
    block = str(kwargs.get("block") or "BasicBlockD")
    if not block.endswith("BasicBlockD"):
        raise CheckpointError(f"plans.json: residual block {block} is not supported; voxseg runs BasicBlockD")
    stem = kwargs.get("stem_channels")
    if stem is not None and int(stem) != features[0]:
        raise CheckpointError(f"plans.json: stem_channels {stem} differs from features_per_stage[0] "
                              f"{features[0]}; voxseg's stem has the first stage's features")


def nnunet_transpose(plans: dict[str, Any]) -> list[int]:
    """plans.json's transpose_forward (the case axis each of nnU-Net's axes is), checked against transpose_backward."""
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    if sorted(forward) != [0, 1, 2]:
        raise CheckpointError(f"plans.json: transpose_forward {forward} is not an order of the axes 0, 1, 2")
    backward = plans.get("transpose_backward")
    if backward is not None and [int(a) for a in backward] != [forward.index(a) for a in range(3)]:
        raise CheckpointError(f"plans.json: transpose_backward {list(backward)} does not undo transpose_forward "
                              f"{forward}")
    return forward


def untransposed(values: Sequence[Any], transpose: Sequence[int]) -> list[Any]:
    """Per-axis `values` in nnU-Net's transposed order, in the case's own axis order."""
    if len(values) != len(transpose):
        raise CheckpointError(f"plans.json: {list(values)} has {len(values)} entries; the transposition "
                              f"{list(transpose)} has {len(transpose)}")
    return [values[list(transpose).index(axis)] for axis in range(len(transpose))]


def untransposed_axes(axes: Sequence[int], transpose: Sequence[int]) -> list[int]:
    """nnU-Net's (transposed) axis numbers as the case's axis numbers, sorted."""
    if any(not 0 <= int(a) < len(transpose) for a in axes):
        raise CheckpointError(f"inference_allowed_mirroring_axes {list(axes)}: the network has {len(transpose)} "
                              "spatial axes; is the checkpoint of another configuration?")
    return sorted(int(transpose[int(a)]) for a in axes)


def network_order(transpose: Sequence[int], ndim: int) -> list[int]:
    """For each of the nnU-Net network's axes, the voxseg network's axis it is.

    3D: the case axis (`transpose` is plans.json's transpose_forward). 2D: nnU-Net slices its transposed case
    along axis 0 (case axis transpose[0], voxseg's slice_axis) and its network's axes are case axes transpose[1:];
    voxseg's 2D network has the other two case axes in increasing order.
    """
    if ndim == 3:
        return [int(a) for a in transpose]
    plane = [int(a) for a in transpose[1:]]
    return [sorted(plane).index(a) for a in plane]


def network_plan(arch: dict[str, Any], order: Sequence[int] = (0, 1, 2)) -> tuple[NetworkPlan, dict[str, Any]]:
    """The voxseg topology of a configuration's "architecture" in voxseg's axes (`order`: `network_order`),
    and the build_network options it needs."""
    class_name = str(arch.get("network_class_name", ""))
    if class_name.rsplit(".", 1)[-1] not in SUPPORTED_NETWORKS:
        raise CheckpointError(f"plans.json: network class {class_name} is not supported; voxseg runs "
                              f"{', '.join(SUPPORTED_NETWORKS)} models")
    _check_layers(arch, len(order))
    kwargs = arch["arch_kwargs"]
    stages = int(kwargs["n_stages"])
    features = kwargs["features_per_stage"]
    features = [int(features)] * stages if isinstance(features, int) else [int(f) for f in features]
    decoder = _require_uniform(kwargs["n_conv_per_stage_decoder"], "n_conv_per_stage_decoder")
    residual = class_name.endswith("ResidualEncoderUNet")
    options: dict[str, Any] = {"decoder_conv_per_stage": decoder}
    if residual:
        _check_residual(kwargs, features)
        blocks = kwargs["n_blocks_per_stage"]
        options.update(blocks_per_stage=[int(blocks)] * stages if isinstance(blocks, int) else [int(b) for b in blocks],
                       pooled_skip=True)
        encoder = decoder  # the residual encoder has no conv count of its own; the plan's serves the decoder
    else:
        encoder = _require_uniform(kwargs["n_conv_per_stage"], "n_conv_per_stage")
    norm_kwargs = {"eps": float((kwargs.get("norm_op_kwargs") or {}).get("eps", 1e-5)), "affine": True}
    slope = float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 1e-2))
    options.update(norm_kwargs=norm_kwargs, nonlin_kwargs={"negative_slope": slope, "inplace": True})
    # the plan carries every option too, so build_network(plan) alone builds this network (an imported work dir)
    network = NetworkPlan(name="unet", features=features,
                          kernel_sizes=[untransposed([int(v) for v in k], order) for k in kwargs["kernel_sizes"]],
                          strides=[untransposed([int(v) for v in s], order) for s in kwargs["strides"]],
                          conv_per_stage=encoder, residual=residual,
                          deep_supervision=True, blocks_per_stage=options.get("blocks_per_stage"),
                          decoder_conv_per_stage=decoder, pooled_skip=residual, norm_eps=norm_kwargs["eps"],
                          negative_slope=slope)
    return network, options


def _normalization(plans: dict[str, Any], config: dict[str, Any], channels: int) -> list[ChannelNormalization]:
    schemes, masks = config["normalization_schemes"], config.get("use_mask_for_norm", [False] * channels)
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for channel, (scheme, use_mask) in enumerate(zip(schemes, masks)):
        if scheme == "ZScoreNormalization":
            out.append(ChannelNormalization("zscore", use_nonzero_mask=bool(use_mask)))
        elif scheme == "CTNormalization":
            stats = properties.get(str(channel))
            if stats is None:
                raise CheckpointError(f"plans.json: channel {channel} uses CTNormalization but "
                                      "foreground_intensity_properties_per_channel has no entry for it")
            out.append(ChannelNormalization("ct", clip_low=float(stats["percentile_00_5"]),
                                            clip_high=float(stats["percentile_99_5"]), mean=float(stats["mean"]),
                                            std=float(stats["std"])))
        elif scheme == "NoNormalization":
            out.append(ChannelNormalization("none"))
        else:
            raise CheckpointError(f"plans.json: channel {channel} uses the normalisation scheme {scheme}, which voxseg "
                                  "does not have (it runs ZScoreNormalization, CTNormalization, NoNormalization)")
    return out


def _labels(dataset: dict[str, Any]) -> dict[str, Any]:
    """dataset.json labels as voxseg's: a region stays a list, a one-value list for background becomes 0."""
    labels = {}
    for name, value in dataset["labels"].items():
        if isinstance(value, (list, tuple)):
            value = [int(v) for v in value]
            if name == "background" and len(value) == 1:
                value = value[0]
        labels[name] = value if isinstance(value, list) else int(value)
    return labels


def plan_from_nnunet(plans: dict[str, Any], dataset: dict[str, Any], configuration: str,
                     source: str = "") -> tuple[Plan, dict[str, Any]]:
    """A voxseg Plan from nnU-Net's plans.json and dataset.json, and the network options it needs.

    Raises:
        CheckpointError: the configuration uses a network, layer, normalisation or
            resampling voxseg cannot represent exactly, or dataset.json names a file type or image reader voxseg
            reads differently, or a field nnU-Net writes is missing or of another type (the message names it).
    """
    where = Path(source) / NNUNET_PLANS if source else Path(NNUNET_PLANS)
    try:
        return _plan_from_nnunet(plans, dataset, configuration, source)
    except KeyError as exc:
        raise CheckpointError(f"{where}: field '{exc.args[0]}' is missing (configuration '{configuration}', or "
                              "dataset.json); the model folder's plans.json and dataset.json must be the ones nnU-Net "
                              "wrote with the model") from None
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{where}: a field of configuration '{configuration}' (or dataset.json) does not have "
                              f"the form nnU-Net writes ({type(exc).__name__}: {str(exc)[:160]}); use the files "
                              "nnU-Net wrote with the model") from None


def _plan_from_nnunet(plans: dict[str, Any], dataset: dict[str, Any], configuration: str,
                      source: str) -> tuple[Plan, dict[str, Any]]:
    check_nnunet_fields(dataset, Path(source) / NNUNET_DATASET if source else NNUNET_DATASET, CheckpointError)
    transpose = nnunet_transpose(plans)
    config = resolve_configuration(plans, configuration)
    if config.get("previous_stage"):
        raise CheckpointError(
            f"plans.json: configuration '{configuration}' is an nnU-Net cascade stage (its network also takes the "
            f"segmentation of '{config['previous_stage']}'); voxseg runs nnU-Net's single-stage configurations: "
            f"predict with the '{config['previous_stage']}' or '3d_fullres' model folder, or import the dataset "
            "and train voxseg's own cascade (docs/PLANNING.md)")
    ndim = len(config["patch_size"])
    if ndim not in (2, 3):
        raise CheckpointError(f"plans.json: configuration '{configuration}' has a {ndim}-entry patch_size; voxseg "
                              "runs 2D and 3D nnU-Net models")
    order = network_order(transpose, ndim)
    network, options = network_plan(config["architecture"], order)
    _check_resampling(config, configuration)
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not channels:
        raise CheckpointError("dataset.json has no channel_names")
    def per_axis(values: Sequence[Any], kind: type) -> list[Any]:
        return untransposed([kind(v) for v in values], transpose) if values else []

    median_spacing = per_axis(plans.get("original_median_spacing_after_transp", []), float)
    median_shape = per_axis(plans.get("original_median_shape_after_transp", []), int)
    spacing, median_after = [float(s) for s in config["spacing"]], config.get("median_image_size_in_voxels", [])
    if ndim == 2:  # nnU-Net's 2d spacing and shapes are of the plane; the slice axis keeps each case's spacing
        slice_axis = transpose[0]
        spacing = [median_spacing[slice_axis] if median_spacing else max(spacing)] + spacing
        median_after = [median_shape[slice_axis]] + list(median_after) if median_shape and median_after else []
    spacing = per_axis(spacing, float)

    plan = Plan(
        dataset_name=str(plans.get("dataset_name", dataset.get("name", ""))), raw_dataset=source,
        channel_names={str(k): str(v) for k, v in channels.items()}, labels=_labels(dataset),
        regions_class_order=[int(v) for v in dataset["regions_class_order"]] if dataset.get("regions_class_order")
        else None, file_ending=str(dataset.get("file_ending", ".nii.gz")), target_spacing=spacing,
        patch_size=untransposed([int(p) for p in config["patch_size"]], order),
        batch_size=int(config.get("batch_size", 2)),
        network=network, normalization=_normalization(plans, config, len(channels)),
        original_median_spacing=median_spacing, original_median_shape=median_shape,
        median_shape_after_resample=per_axis(median_after, int), anisotropy_axis=int(np.argmax(spacing)),
        image_dtype="float32", configuration="2d" if ndim == 2 else "3d_fullres",
        slice_axis=transpose[0] if ndim == 2 else 0,
        keep_slice_spacing=ndim == 2,
    )
    return plan, options


# ----- folds ----------------------------------------------------------------------------------------------------
def nnunet_fold_state(state: dict[str, Any], plans: dict[str, Any], configuration: str
                      ) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    """A checkpoint's nnU-Net weights and allowed mirror axes (None: not recorded) in voxseg's network axes."""
    order = network_order(nnunet_transpose(plans), len(resolve_configuration(plans, configuration)["patch_size"]))
    axes = state.get("inference_allowed_mirroring_axes")
    axes = untransposed_axes(axes, order) if axes is not None else None
    return untranspose_weights(state["network_weights"], order), axes


def load_nnunet_fold(folder: str | Path, checkpoint_file: str | Path, device: str | torch.device = "cpu"
                     ) -> tuple[nn.Module, Plan, tuple[int, ...]]:
    """The voxseg network of one nnU-Net fold in eval mode, its plan and the mirror axes it allows."""
    folder = Path(folder)
    plans, configuration = read_model_json(folder / NNUNET_PLANS), configuration_name(folder)
    plan, options = plan_from_nnunet(plans, read_model_json(folder / NNUNET_DATASET), configuration, str(folder))
    weights, axes = nnunet_fold_state(load_nnunet_checkpoint(checkpoint_file), plans, configuration)
    network = build_network(plan, deep_supervision=False, **options)
    network.load_state_dict(map_nnunet_weights(weights, network, str(checkpoint_file)))
    mirror_axes = tuple(axes) if axes is not None else ()
    return network.to(device).eval(), plan, mirror_axes
