"""The residual encoder's block schedule: how many residual blocks each stage of the U-Net gets.

One definition for the two places that must agree on it: the network (`voxseg.models.unet` builds its
residual stages with it) and the planner's memory model (`voxseg.data.memory` counts their activations and
weights), which must not import the network code.
"""
from __future__ import annotations

# Residual blocks per encoder stage of nnU-Net's residual-encoder presets (ResEnc M/L); deeper stages repeat 6.
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6)


def default_blocks_per_stage(num_stages: int) -> list[int]:
    """nnU-Net ResEnc schedule truncated or extended to `num_stages`: [1, 3, 4, 6, 6, 6, 6, ...]."""
    return [RESENC_BLOCKS[min(i, len(RESENC_BLOCKS) - 1)] for i in range(num_stages)]
