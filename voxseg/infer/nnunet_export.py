"""Export a voxseg work directory as an nnU-Net v2 model folder (`voxseg export WORKDIR --format nnunet OUT`).

```
OUT/nnUNetTrainer__voxsegPlans__3d_fullres/     (OUT itself when its name is <Trainer>__<Plans>__<configuration>)
  plans.json  dataset.json  fold_F/checkpoint_{final,best}.pth  [voxseg_postprocessing.json]
```
The inverse of `voxseg import nnunet`: plans.json holds one 3D configuration whose "architecture" is the
PlainConvUNet or ResidualEncoderUNet that voxseg's UNet is structurally (same layers, same order), the
checkpoint holds the weights under nnU-Net's names (with the aliases nnU-Net's state dicts carry, so its
strict `load_state_dict` accepts them), the mirror axes and the trainer name nnU-Net builds the network with.
Reading it back with `voxseg predict -m` gives voxseg's logits exactly; nnU-Net's own predictor runs the same
network, with its own preprocessing (third-order spline resampling), so its labels may differ near borders.

The postprocessing decision (WORKDIR/postprocessing.json, from `voxseg evaluate --crossval`) travels as
voxseg_postprocessing.json, which `voxseg import nnunet` restores as the work directory's postprocessing.json and
`voxseg predict -m OUT/...` applies, so default predictions stay the same voxel for voxel. No postprocessing.pkl
is written, for two reasons: nnU-Net's pickle holds references to its own functions (a pickle that imports
code when loaded; voxseg writes and reads only plain data), and nnU-Net's largest-component function labels
components with full (26-) connectivity and keeps every component tied for largest, where voxseg uses face
(6-) connectivity, so the same decision applied by nnU-Net would change other voxels. With nnU-Net, apply the
JSON's classes (label values; a list is a region) by hand if you need them.

Exported only what nnU-Net's networks represent: 3D plans, plain UNets, residual ones with pooled skips
(nnU-Net's BasicBlockD; voxseg's default strided-projection skip has no nnU-Net counterpart), no transposition.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from voxseg.atomicio import staging_folder, sweep_stale_staging
from voxseg.checkpoint import save_checkpoint
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.archive import load_fold_model, resolve_folds
from voxseg.infer.install import swap_in_folder
from voxseg.infer.nnunet_folder import CHECKPOINT_FILES, NNUNET_DATASET, NNUNET_PLANS, nnunet_fold_dir
from voxseg.infer.nnunet_weights import nnunet_names
from voxseg.infer.postprocess import EXPORTED_POSTPROCESSING_FILE, model_postprocessing
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.network_plan import default_blocks_per_stage
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

DEFAULT_FOLDER = "nnUNetTrainer__voxsegPlans__3d_fullres"
_NORMALIZATION = {"zscore": "ZScoreNormalization", "ct": "CTNormalization", "none": "NoNormalization"}
_DATA_RESAMPLING = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}


def _check_exportable(plan: Plan, fold: int | str) -> None:
    network = plan.network
    problems = []
    if network.name != "unet":
        problems.append(f"network '{network.name}' (nnU-Net runs voxseg's 'unet' only)")
    if network.ndim != 3:
        problems.append("a 2D plan (the export writes a 3d_fullres configuration)")
    if network.residual and not network.pooled_skip:
        problems.append("residual skips by strided 1x1 projection (nnU-Net's BasicBlockD pools first: plan with "
                        "network.pooled_skip=true)")
    unknown = [n.scheme for n in plan.normalization if n.scheme not in _NORMALIZATION]
    if unknown:
        problems.append(f"normalisation scheme(s) {unknown} (nnU-Net has {', '.join(_NORMALIZATION)})")
    if problems:
        raise CheckpointError(f"fold {fold}: nnU-Net v2 cannot represent this model: " + "; ".join(problems))


def _architecture(plan: Plan) -> dict[str, Any]:
    """The configuration's "architecture" entry, as nnU-Net's planners write it."""
    net, stages = plan.network, plan.network.n_stages
    kwargs: dict[str, Any] = {
        "n_stages": stages, "features_per_stage": list(net.features), "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in net.kernel_sizes], "strides": [list(s) for s in net.strides],
        "n_conv_per_stage_decoder": [net.decoder_conv_per_stage or net.conv_per_stage] * (stages - 1),
        "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": net.norm_eps, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"negative_slope": net.negative_slope, "inplace": True},
    }
    if net.residual:
        kwargs["n_blocks_per_stage"] = list(net.blocks_per_stage or default_blocks_per_stage(stages))
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        kwargs["n_conv_per_stage"] = [net.conv_per_stage] * stages
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    return {"network_class_name": name, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def nnunet_plans(plan: Plan, configuration: str = "3d_fullres", plans_name: str = "voxsegPlans") -> dict[str, Any]:
    """nnU-Net v2's plans.json for `plan`: one configuration, no transposition, the CT channels' statistics
    (the other channels' entries are empty: z-score normalisation reads none)."""
    resample = "resample_data_or_seg_to_shape"  # looked up by name in nnunetv2.preprocessing.resampling
    config = {
        "data_identifier": f"{plans_name}_{configuration}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": plan.batch_size, "patch_size": list(plan.patch_size),
        "median_image_size_in_voxels": list(plan.median_shape_after_resample or plan.patch_size),
        "spacing": list(plan.target_spacing),
        "normalization_schemes": [_NORMALIZATION[n.scheme] for n in plan.normalization],
        "use_mask_for_norm": [bool(n.use_nonzero_mask) for n in plan.normalization],
        "resampling_fn_data": resample, "resampling_fn_data_kwargs": dict(_DATA_RESAMPLING),
        "resampling_fn_seg": resample, "resampling_fn_seg_kwargs": {**_DATA_RESAMPLING, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": resample, "resampling_fn_probabilities_kwargs": {**_DATA_RESAMPLING, "order": 1},
        "architecture": _architecture(plan), "batch_dice": True,
    }
    # nnU-Net looks up every channel's entry; only CTNormalization reads it (voxseg keeps no others)
    intensity = {str(c): {"mean": n.mean, "std": n.std, "percentile_00_5": n.clip_low, "percentile_99_5": n.clip_high}
                 if n.scheme == "ct" else {} for c, n in enumerate(plan.normalization)}
    return {
        "dataset_name": plan.dataset_name, "plans_name": plans_name,
        "original_median_spacing_after_transp": list(plan.original_median_spacing or plan.target_spacing),
        "original_median_shape_after_transp": list(plan.original_median_shape or plan.patch_size),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config}, "experiment_planner_used": "voxseg",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": intensity,
    }


def nnunet_weights(network: nn.Module) -> dict[str, torch.Tensor]:
    """`network`'s tensors under nnU-Net's names, plus the second names nnU-Net's modules register them under
    (every conv/norm also as `all_modules.i`, the encoder also as `decoder.encoder`)."""
    own = network.state_dict()
    weights: dict[str, torch.Tensor] = {}
    for ours, theirs in nnunet_names(network).items():
        if ".skip." in theirs and theirs.endswith(".conv.bias"):
            continue  # nnU-Net's skip projection has no bias; before an instance norm a bias changes nothing
        tensor = own[ours].detach().cpu().clone()
        names = [theirs]
        for part, alias in ((".conv.", ".all_modules.0."), (".norm.", ".all_modules.1.")):
            if part in theirs:
                names.append(theirs.replace(part, alias))
        names += [f"decoder.{name}" for name in names if name.startswith("encoder.")]
        weights.update({name: tensor for name in names})
    return weights


def _dataset_json(workdir: Path, plan: Plan) -> dict[str, Any]:
    copy = WorkDir(workdir).dataset_json
    meta = read_json(copy, ConfigError) if copy.is_file() else {}
    meta = {**meta, "channel_names": dict(plan.channel_names), "labels": dict(plan.labels),
            "file_ending": plan.file_ending}
    if plan.regions_class_order:
        meta["regions_class_order"] = list(plan.regions_class_order)
    meta.setdefault("numTraining", 0)
    return meta


def _exported_postprocessing(spec: dict[str, Any]) -> dict[str, Any]:
    """voxseg_postprocessing.json: the decision, and what it means for a reader without voxseg."""
    return {**spec, "format": "voxseg-postprocessing",
            "meaning": "largest_component: for each entry in order (a label value, or a list of values: a region), "
                       "keep the largest face-connected (6-neighbour) component of its voxels and set its other "
                       "voxels to 0. Decided by 'voxseg evaluate --crossval'; 'voxseg import nnunet' restores it"}


def export_nnunet(workdir: str | Path, out: str | Path, folds: int | str | Sequence[int | str] | None = (0,),
                  checkpoint: str = "final", force: bool = False) -> Path:
    """Write the folds of a voxseg work directory as an nnU-Net v2 model folder; returns its path.

    Raises:
        CheckpointError: a fold that is not trained, a model nnU-Net cannot represent (named), folds of
            different plans, or an existing model folder without `force`.
    """
    if checkpoint not in ("final", "best"):
        raise ConfigError(f"checkpoint '{checkpoint}': nnU-Net model folders hold final or best checkpoints")
    workdir, out = Path(workdir), Path(out)
    target = out if len(out.name.split("__")) == 3 else out / DEFAULT_FOLDER
    if target.exists() and any(target.iterdir()) and not force:
        raise CheckpointError(f"{target} is not empty; export into a new folder, or replace it with --force")
    fold_list = resolve_folds(workdir, folds, checkpoint)
    loaded = []
    for fold in fold_list:
        model = load_fold_model(workdir, fold, checkpoint)
        model.plan.check_runnable("exporting to nnU-Net")
        _check_exportable(model.plan, fold)
        loaded.append((fold, model.network, model.plan, model.epoch))
    plan = loaded[0][2]
    _, plans_name, configuration = target.name.split("__")
    plans = nnunet_plans(plan, configuration, plans_name)
    for fold, _, other, _ in loaded[1:]:
        if nnunet_plans(other, configuration, plans_name) != plans:
            raise CheckpointError(f"fold {fold} was trained with another plan than fold {loaded[0][0]}; an nnU-Net "
                                  "model folder has one plans.json: export the folds separately")
    dataset = _dataset_json(workdir, plan)
    postprocessing = model_postprocessing(workdir, plan.regions)  # checked before anything is written
    axes = plan.inference_mirror_axes if plan.inference_mirror_axes is not None else list(range(plan.network.ndim))
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(target)  # left by a run that was killed
    staging = staging_folder(target, "export")
    try:
        write_json_atomic(staging / NNUNET_PLANS, plans)
        write_json_atomic(staging / NNUNET_DATASET, dataset)
        if postprocessing is not None:
            write_json_atomic(staging / EXPORTED_POSTPROCESSING_FILE, _exported_postprocessing(postprocessing))
        for fold, network, _, epoch in loaded:
            nnunet_fold_dir(staging, fold).mkdir()
            save_checkpoint(nnunet_fold_dir(staging, fold) / CHECKPOINT_FILES[checkpoint], {
                "network_weights": nnunet_weights(network), "trainer_name": "nnUNetTrainer", "current_epoch": epoch,
                "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                              "dataset_json": dataset},
                "inference_allowed_mirroring_axes": tuple(int(a) for a in axes)})
        swap_in_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
