"""The network section of the plan (`Plan.network`): the U-Net's topology and block options, and the residual
encoder's block schedule.

`voxseg.plans` holds the rest of the plan schema and is where `NetworkPlan` is usually imported from. The
block schedule lives here, with the topology it completes, so that the two places that must agree on it read
one definition: the network (`voxseg.models.unet` builds its residual stages with it) and the planner's memory
model (`voxseg.data.memory` counts their activations and weights), which must not import the network code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from voxseg.errors import ConfigError

# Residual blocks per encoder stage of nnU-Net's residual-encoder presets (ResEnc M/L); deeper stages repeat 6.
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6)


def default_blocks_per_stage(num_stages: int) -> list[int]:
    """nnU-Net ResEnc schedule truncated or extended to `num_stages`: [1, 3, 4, 6, 6, 6, 6, ...]."""
    return [RESENC_BLOCKS[min(i, len(RESENC_BLOCKS) - 1)] for i in range(num_stages)]


@dataclass
class NetworkPlan:
    """U-Net topology."""

    name: str = "unet"
    """registered network name ("unet"; `residual` switches the encoder to residual blocks)."""
    features: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 320, 320])
    """feature maps per stage, e.g. [32, 64, 128, 256, 320, 320]."""
    kernel_sizes: list[list[int]] = field(default_factory=lambda: [[3, 3, 3]] * 6)
    """convolution kernel size per stage, e.g. [[1,3,3], [3,3,3], ...] (1 along a coarse axis that is not yet
    isotropic)."""
    strides: list[list[int]] = field(default_factory=lambda: [[1, 1, 1]] + [[2, 2, 2]] * 5)
    """per stage downsampling stride; the first stage's is [1,1,1]."""
    conv_per_stage: int = 2
    """convolutions per encoder stage (and per decoder level unless decoder_conv_per_stage)."""
    residual: bool = False
    """residual encoder blocks instead of plain conv blocks."""
    deep_supervision: bool = True
    """extra output heads on the decoder's lower resolutions during training."""
    blocks_per_stage: list[int] | None = None
    """residual blocks per encoder stage (residual networks); None: voxseg's default [1, 3, 4, 6, 6, 6] (cut to the
    stage count)."""
    decoder_conv_per_stage: int | None = None
    """convolutions per decoder level; None: conv_per_stage."""
    pooled_skip: bool = False
    """residual skips downsample by average pooling and project only when the feature count changes (nnU-Net's
    ResidualEncoderUNet); False: a strided 1x1 projection."""
    norm_eps: float = 1e-5
    """epsilon of the normalisation layers."""
    negative_slope: float = 1e-2
    """slope of the leaky ReLU."""

    def __post_init__(self) -> None:
        n = len(self.features)
        if not (len(self.kernel_sizes) == len(self.strides) == n):
            raise ConfigError(
                f"plans.json: network.features ({n} stages), kernel_sizes ({len(self.kernel_sizes)}) and strides "
                f"({len(self.strides)}) must have the same length"
            )
        dims = {len(k) for k in self.kernel_sizes} | {len(s) for s in self.strides}
        if len(dims) != 1 or dims.pop() not in (2, 3):
            raise ConfigError("plans.json: network kernel_sizes and strides must all be 2D or all be 3D")
        if self.blocks_per_stage is not None and len(self.blocks_per_stage) != n:
            raise ConfigError(f"plans.json: network.blocks_per_stage {self.blocks_per_stage} needs one entry per "
                              f"stage ({n})")

    @property
    def n_stages(self) -> int:
        return len(self.features)

    @property
    def ndim(self) -> int:
        return len(self.strides[0])

    @property
    def total_stride(self) -> list[int]:
        """Product of the per-stage strides, per axis: patch sizes must be multiples of it."""
        total = [1] * self.ndim
        for stride in self.strides:
            total = [t * int(s) for t, s in zip(total, stride)]
        return total
