"""nnU-Net v2 weights in a voxseg UNet: the tensor names of both networks, paired by walking their structure.

ResidualEncoderUNet has `encoder.stem.convs.0.{conv,norm}` and `encoder.stages.S.blocks.B.{conv1,conv2}.{conv,norm}`
with `...skip.I.{conv,norm}` where a block projects its skip; voxseg's residual UNet (built with `pooled_skip`)
has `stem.{0,1}`, `encoder.S.B.{conv1,conv2}.{0,1}` and `encoder.S.B.skip.I.{0,1}`. The decoders are the same.

dynamic_network_architectures' PlainConvUNet names its tensors

    encoder.stages.S.0.convs.C.{conv,norm}.{weight,bias}       encoder stage S, convolution C
    decoder.transpconvs.L.{weight,bias}                          upsampling of decoder level L (0 = deepest)
    decoder.stages.L.convs.C.{conv,norm}.{weight,bias}           convolutions of decoder level L
    decoder.seg_layers.L.{weight,bias}                           segmentation head of decoder level L

and every tensor a second time under aliases (`...convs.C.all_modules.0/1` for conv/norm, `decoder.encoder.*`
for the whole encoder, which the decoder holds a reference to). voxseg's UNet has the same layers in the same
order as `encoder.S.C.{0,1}`, `upsample.L`, `decoder.L.C.{0,1}` and `heads.L`. `nnunet_names` lists the pairs;
`map_nnunet_weights` uses them and checks every shape, so a checkpoint of another topology fails on the first
tensor that differs instead of loading silently wrong.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from voxseg.errors import CheckpointError
from voxseg.models.unet import UNet

_CONV_NORM = (("0", "conv"), ("1", "norm"))  # index in voxseg's ConvNormAct -> nnU-Net's attribute name


def _conv_norm(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    """A voxseg (conv, norm, ...) Sequential at `ours` against nnU-Net's ConvDropoutNormReLU at `theirs`."""
    for index, name in _CONV_NORM:
        yield f"{ours}.{index}", f"{theirs}.{name}"


def _stacked_pairs(ours: str, theirs: str, block: nn.Module) -> Iterator[tuple[str, str]]:
    """(voxseg prefix, nnU-Net prefix) of every conv and norm of a StackedConvs `block`."""
    for c in range(len(block)):
        yield from _conv_norm(f"{ours}.{c}", f"{theirs}.convs.{c}")


def _residual_pairs(s: int, stage: nn.Module) -> Iterator[tuple[str, str]]:
    """A ResidualStage against nnU-Net's StackedResidualBlocks of BasicBlockD (skip: [AvgPool], [conv, norm])."""
    for b, block in enumerate(stage):
        ours, theirs = f"encoder.{s}.{b}", f"encoder.stages.{s}.blocks.{b}"
        yield from _conv_norm(f"{ours}.conv1", f"{theirs}.conv1")
        yield from _conv_norm(f"{ours}.conv2", f"{theirs}.conv2")
        for i, part in enumerate(block.skip if isinstance(block.skip, nn.Sequential) else []):
            if isinstance(part, nn.Sequential):  # the projection; a strided 1x1 conv skip has none and stays unmapped
                yield from _conv_norm(f"{ours}.skip.{i}", f"{theirs}.skip.{i}")


def _module_pairs(network: UNet) -> Iterator[tuple[str, str]]:
    """(voxseg module prefix, nnU-Net module prefix) in forward order: stem, encoder, then each decoder level."""
    residual = not isinstance(network.stem, nn.Identity)
    if residual:
        yield from _conv_norm("stem", "encoder.stem.convs.0")
    for s, stage in enumerate(network.encoder):
        yield from _residual_pairs(s, stage) if residual else _stacked_pairs(f"encoder.{s}", f"encoder.stages.{s}.0",
                                                                              stage)
    for level, block in enumerate(network.decoder):
        yield f"upsample.{level}", f"decoder.transpconvs.{level}"
        yield from _stacked_pairs(f"decoder.{level}", f"decoder.stages.{level}", block)
        yield f"heads.{level}", f"decoder.seg_layers.{level}"


def nnunet_names(network: UNet) -> dict[str, str]:
    """voxseg state-dict name -> nnU-Net name (PlainConvUNet, or ResidualEncoderUNet for a residual `network`
    built with `pooled_skip`), for every tensor of `network`."""
    own = network.state_dict()
    names = {}
    for ours, theirs in _module_pairs(network):
        for key in own:
            if key.startswith(ours + ".") and "." not in key[len(ours) + 1:]:
                names[key] = f"{theirs}.{key[len(ours) + 1:]}"
    unmapped = sorted(set(own) - set(names))
    if unmapped:  # a layer the walk does not know: a UNet change this module must follow
        raise CheckpointError(f"voxseg UNet tensors without an nnU-Net counterpart: {', '.join(unmapped[:5])}")
    return names


def _is_alias(name: str) -> bool:
    return name.startswith("decoder.encoder.") or ".all_modules." in name


def map_nnunet_weights(weights: dict[str, torch.Tensor], network: UNet, source: str) -> dict[str, torch.Tensor]:
    """nnU-Net `weights` (PlainConvUNet or ResidualEncoderUNet) renamed to `network`'s state dict, every shape checked.

    A convolution trained without bias (`conv_bias: false`) gets a zero bias, which is the same function.

    Raises:
        CheckpointError: a tensor is missing, has another shape, or the checkpoint holds tensors the walk did not
            use (another architecture); the message names the tensor and `source` (the checkpoint file).
    """
    own = network.state_dict()
    mapped, used = {}, set()
    for ours, theirs in nnunet_names(network).items():
        expected = tuple(own[ours].shape)
        if theirs not in weights:
            if ours.endswith(".bias") and ".heads." not in f".{ours}":
                mapped[ours] = torch.zeros_like(own[ours])
                continue
            raise CheckpointError(f"{source}: nnU-Net tensor {theirs} is missing (voxseg {ours}, shape {expected}); "
                                  "the checkpoint does not match the architecture in plans.json")
        tensor = weights[theirs]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{source}: nnU-Net tensor {theirs} has shape {tuple(tensor.shape)}, but "
                                  f"plans.json's architecture needs {expected} (voxseg {ours})")
        mapped[ours] = tensor
        used.add(theirs)
    left = sorted(name for name in weights if name not in used and not _is_alias(name))
    if left:
        raise CheckpointError(f"{source}: {len(left)} nnU-Net tensor(s) have no place in the network of plans.json "
                              f"(first: {', '.join(left[:3])}); is the checkpoint of another architecture?")
    return mapped


def untranspose_weights(weights: dict[str, torch.Tensor], transpose: Sequence[int]) -> dict[str, torch.Tensor]:
    """nnU-Net `weights` of a network run on cases transposed by `transpose` (plans.json's transpose_forward) with
    the spatial dimensions of every convolution permuted back, so the network runs on the untransposed case."""
    transpose = [int(a) for a in transpose]
    if transpose == sorted(transpose):
        return dict(weights)
    spatial = [2 + transpose.index(axis) for axis in range(len(transpose))]
    return {name: tensor.permute(0, 1, *spatial).contiguous() if tensor.ndim == 2 + len(transpose) else tensor
            for name, tensor in weights.items()}
