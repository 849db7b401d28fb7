"""nnU-Net style U-Net (plain or residual encoder) for 2D and 3D, with deep supervision.

Topology, for `features=[32, 64, 128]`, `strides=[[1,1,1], [2,2,2], [2,2,2]]` (3 stages, 2 decoder levels):

    stage 0: convs -> 32 @ full ─── skip ──────────────────────> cat -> convs -> 32 @ full -> head (full)
    stage 1: strided conv -> 64 @ 1/2 ── skip ──> cat -> convs -> 64 @ 1/2 -> head (1/2)    ^ up x2
    stage 2: strided conv -> 128 @ 1/4 (bottleneck) ──> up x2 ─┘  (no head at the bottleneck)

Downsampling is the first convolution of a stage with that stage's stride (no pooling). Each decoder level
upsamples with a transposed convolution whose kernel equals the stride of the stage below, concatenates the
skip, runs the conv blocks and has its own 1x1 segmentation head; the heads exist whether or not deep
supervision is on, so checkpoints load either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from voxseg.errors import ConfigError
from voxseg.models.blocks import (
    ConvNormAct,
    LayerSpec,
    ResidualStage,
    StackedConvs,
    conv_layer,
    init_weights,
    transposed_conv_layer,
)
from voxseg.network_plan import default_blocks_per_stage


@dataclass
class UNetTopology:
    """The shape of a U-Net: stages, their features, kernels and strides, blocks, and its layers."""

    features: Sequence[int]
    """feature maps per stage (the last stage is the bottleneck)."""
    kernel_sizes: Sequence[Sequence[int]]
    """per-stage kernel size (a list of ndim ints); its length sets 2D or 3D."""
    strides: Sequence[Sequence[int]]
    """per-stage downsampling stride applied by the stage's first convolution."""
    conv_per_stage: int = 2
    """convolutions per encoder stage (plain encoder) and per decoder level."""
    residual: bool = False
    """residual encoder (ResEnc): a stem convolution, then `blocks_per_stage` residual blocks per stage; the
    decoder stays plain."""
    blocks_per_stage: int | Sequence[int] | None = None
    """residual blocks per encoder stage (int or list); default nnU-Net's [1, 3, 4, 6, 6, 6]."""
    decoder_conv_per_stage: int | None = None
    """convolutions per decoder level (default `conv_per_stage`)."""
    pooled_skip: bool = False
    """residual skips downsample by average pooling and project only when the feature count changes (nnU-Net's
    ResidualEncoderUNet, BasicBlockD); default a strided 1x1 projection."""
    norm: str = "instance"
    """normalisation layer, by name (`voxseg.models.blocks.NORMS`)."""
    nonlin: str = "leaky_relu"
    """nonlinearity, by name (`voxseg.models.blocks.NONLINS`)."""
    norm_kwargs: dict[str, Any] | None = None
    """options of the normalisation layer (e.g. {"eps": 1e-5})."""
    nonlin_kwargs: dict[str, Any] | None = None
    """options of the nonlinearity (e.g. {"negative_slope": 0.01})."""


class UNet(nn.Module):
    """U-Net with strided-conv encoder, transposed-conv decoder and a segmentation head per decoder level.

    Args:
        in_channels: input image channels.
        num_outputs: output logit channels.
        topology: stages, features, kernels, strides, blocks and layers (`UNetTopology`).
        deep_supervision: in training mode return all decoder outputs, highest resolution first.
    """

    def __init__(self, in_channels: int, num_outputs: int, topology: UNetTopology,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        top = topology
        num_stages = len(top.features)
        if num_stages < 2 or len(top.kernel_sizes) != num_stages or len(top.strides) != num_stages:
            raise ConfigError(
                f"network needs at least 2 stages and one kernel size and stride per stage; got {num_stages} "
                f"features, {len(top.kernel_sizes)} kernel sizes, {len(top.strides)} strides"
            )
        kernel_sizes = top.kernel_sizes
        self.ndim = len(kernel_sizes[0])
        self.spec = spec = LayerSpec(self.ndim, top.norm, top.nonlin, top.norm_kwargs, top.nonlin_kwargs)
        self.features = [int(f) for f in top.features]
        self.strides = [tuple(int(s) for s in stride) for stride in top.strides]
        self.num_outputs = int(num_outputs)

        if top.residual:
            self.stem: nn.Module = ConvNormAct(spec, in_channels, self.features[0], kernel_sizes[0])
            self.encoder = self._residual_encoder(spec, kernel_sizes, top.blocks_per_stage, top.pooled_skip)
        else:
            self.stem = nn.Identity()
            self.encoder = nn.ModuleList(
                StackedConvs(spec, top.conv_per_stage, c_in, c_out, kernel, stride)
                for c_in, c_out, kernel, stride in zip(
                    [in_channels] + self.features[:-1], self.features, kernel_sizes, self.strides
                )
            )

        decoder_convs = top.decoder_conv_per_stage or top.conv_per_stage
        # Decoder level i (0 = just above the bottleneck) works at the resolution of encoder stage s = n-2-i.
        levels = list(range(num_stages - 2, -1, -1))
        self.upsample = nn.ModuleList(
            transposed_conv_layer(self.ndim, self.features[s + 1], self.features[s], self.strides[s + 1])
            for s in levels
        )
        self.decoder = nn.ModuleList(
            StackedConvs(spec, decoder_convs, 2 * self.features[s], self.features[s], kernel_sizes[s]) for s in levels
        )
        self.heads = nn.ModuleList(conv_layer(self.ndim, self.features[s], num_outputs, 1) for s in levels)
        self.apply(init_weights)
        self.deep_supervision = bool(deep_supervision)

    @property
    def deep_supervision(self) -> bool:
        """Whether training returns every decoder level's output (the heads exist either way)."""
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        # without deep supervision the lower heads take no part in the loss: they are frozen, so that no
        # parameter that needs a gradient goes without one (DistributedDataParallel fails on such a parameter at
        # the second iteration) and the optimiser skips them, as it would skip any parameter without a gradient
        self._deep_supervision = bool(value)
        for head in self.heads[:-1]:
            head.requires_grad_(self._deep_supervision)

    def _residual_encoder(
        self, spec: LayerSpec, kernel_sizes: Sequence[Sequence[int]], blocks: int | Sequence[int] | None,
        pooled_skip: bool = False,
    ) -> nn.ModuleList:
        num_stages = len(self.features)
        if blocks is None:
            blocks = default_blocks_per_stage(num_stages)
        elif isinstance(blocks, int):
            blocks = [blocks] * num_stages
        if len(blocks) != num_stages:
            raise ConfigError(f"blocks_per_stage has {len(blocks)} entries; the network has {num_stages} stages")
        return nn.ModuleList(
            ResidualStage(spec, n, c_in, c_out, kernel, stride, pooled_skip)
            for n, c_in, c_out, kernel, stride in zip(
                blocks, self.features[:1] + self.features[:-1], self.features, kernel_sizes, self.strides
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C, *P) -> (B, K, *P) logits, or in training with deep supervision the list [full, 1/2, ...]."""
        skips = []
        x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        # Only python attributes decide what runs, so torch.compile specialises on them instead of breaking.
        all_heads = self.deep_supervision and self.training
        last = len(self.decoder) - 1
        outputs = []
        for i, (up, block, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = up(x)  # (B, F_s, *P_s)
            x = block(torch.cat((x, skips[-(i + 2)]), dim=1))
            if all_heads or i == last:
                outputs.append(head(x))
        if all_heads:
            return outputs[::-1]
        return outputs[-1]
