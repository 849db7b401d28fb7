"""A model folder's networks, loaded for prediction as an `InferConfig` asks: a voxseg work directory's folds
(torch), ONNX files (onnxruntime) or an nnU-Net v2 model folder's folds (`voxseg.infer.nnunet`, whatever the
backend asked for).

    loaded = load_models(Path("work/synth"), InferConfig(folds=[0, 1], device="cpu"))
    loaded.plan, loaded.models, loaded.device, loaded.folds      # -> the Predictor
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxseg.devices import resolve_amp, resolve_device
from voxseg.distributed import local_device
from voxseg.errors import CheckpointError
from voxseg.infer.archive import check_same_plan, load_fold_network, resolve_folds
from voxseg.infer.config import InferConfig
from voxseg.infer.cpu_forward import cpu_candidates, prepare_cpu_networks
from voxseg.infer.nnunet import load_nnunet_fold
from voxseg.infer.nnunet_folder import NNUNET_FOLD_PREFIX, is_nnunet_model_folder, nnunet_folds
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


@dataclass
class LoadedModels:
    """The networks of the chosen folds (or ONNX files) on their device, with the plan they share."""

    plan: Plan
    models: list[Any]
    """Networks in eval mode on `device`, or callables (B, C, *P) -> (B, K, *P) logits (ONNX)."""
    device: torch.device
    folds: tuple[int | str, ...]
    """Fold numbers, or "all" for fold_all; empty for ONNX files given by name."""
    backend: str
    """torch, onnxruntime or nnunet (an nnU-Net v2 model folder)."""


def load_models(workdir: Path, config: InferConfig) -> LoadedModels:
    """The folds `config.folds` of checkpoint `config.checkpoint` of the model folder `workdir`, on
    `config.device` (under torchrun: cuda:LOCAL_RANK); onnxruntime always runs on the CPU."""
    if not workdir.is_dir():
        raise CheckpointError(f"model folder {workdir} not found; give the work directory of 'voxseg train'")
    if is_nnunet_model_folder(workdir):  # nnU-Net v2 <Trainer>__<Plans>__<configuration> folder
        return _nnunet_models(workdir, config)
    if config.resolved_backend() == "onnxruntime":
        return _onnx_models(workdir, config)
    device = local_device(resolve_device(config.device))
    folds = resolve_folds(workdir, config.folds, config.checkpoint)
    loaded = [load_fold_network(workdir, fold, config.checkpoint, device) for fold in folds]
    check_same_plan([plan for _, plan in loaded], folds)
    plan = loaded[0][1]
    return LoadedModels(plan, _ready([net for net, _ in loaded], plan, config, device), device, tuple(folds), "torch")


def _onnx_models(workdir: Path, config: InferConfig) -> LoadedModels:
    from voxseg.infer.export import load_onnx_models  # onnxruntime: imported only when it runs

    folds = resolve_folds(workdir, config.folds, config.checkpoint) if config.onnx_files is None else []
    models = load_onnx_models(workdir, folds, config.onnx_files, config.checkpoint)
    plan = next((m.plan for m in models if m.plan is not None), None) or Plan.load(WorkDir(workdir).plans)
    return LoadedModels(plan, models, torch.device("cpu"), tuple(folds), "onnxruntime")


def _nnunet_models(workdir: Path, config: InferConfig) -> LoadedModels:
    device = local_device(resolve_device(config.device))
    paths = nnunet_folds(workdir, config.folds, config.checkpoint)
    loaded = [load_nnunet_fold(workdir, path, device) for path in paths]
    check_same_plan([plan for _, plan, _ in loaded], [path.parent.name for path in paths])
    plan = loaded[0][1]
    # "all" mirrors along the axes the checkpoint was trained to be mirror-invariant along, as nnU-Net does
    plan.inference_mirror_axes = list(loaded[0][2])
    names = [p.parent.name[len(NNUNET_FOLD_PREFIX):] for p in paths]  # fold_F/checkpoint_*.pth -> F
    folds = tuple(int(name) if name.isdigit() else name for name in names)
    return LoadedModels(plan, _ready([net for net, _, _ in loaded], plan, config, device), device, folds, "nnunet")


def _ready(networks: list[torch.nn.Module], plan: Plan, config: InferConfig, device: torch.device) -> list[Any]:
    """The networks as they run: on a CPU in the fastest measured variant (`voxseg.infer.cpu_forward`), then
    compiled when asked."""
    runners: list[Any] = networks
    if device.type == "cpu":
        candidates = cpu_candidates(resolve_amp(config.amp, device, "amp"), config.cpu_forward)
        runners = prepare_cpu_networks(networks, (plan.network_in_channels, *plan.patch_size), candidates)
    return [torch.compile(net) for net in runners] if config.compile else runners
