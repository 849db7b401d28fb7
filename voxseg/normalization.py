"""Per-channel intensity normalisation schemes, chosen by name in the plan (`ChannelNormalization.scheme`).

This is a ground-floor module (torch, numpy and the registry only): the plan schema validates its `scheme`
against `SCHEMES`, and preprocessing (`voxseg.data.preprocess`) calls `normalize`. A scheme is a registered
function that normalises one channel in place and returns the (mean, std) it used; the plan fields it needs
are declared with `requires`, and a plan that names the scheme without them is refused when it is loaded:

    @SCHEMES.register("minmax", "rescale to [0, 1] with the dataset's clip range", requires=("clip_low", "clip_high"))
    def minmax(x, mask, settings):                    # x: (d, h, w) view of one channel, edited in place
        low, high = float(settings.clip_low), float(settings.clip_high)
        x.clamp_(low, high).sub_(low).div_(high - low)
        return low, high - low

Then `"scheme": "minmax"` in plans.json selects it.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from voxseg.registry import Registry


class ChannelSettings(Protocol):
    """What a scheme reads of a channel's plan entry (`voxseg.plans.ChannelNormalization`)."""

    scheme: str
    use_nonzero_mask: bool
    clip_low: float | None
    clip_high: float | None
    mean: float | None
    std: float | None


# scheme(x (d, h, w) edited in place, mask (d, h, w) bool, settings) -> (mean, std) used
Scheme = Callable[[torch.Tensor, torch.Tensor, ChannelSettings], tuple[float, float]]
SCHEMES: Registry[Scheme] = Registry("normalization scheme")


def required_fields(scheme: str) -> tuple[str, ...]:
    """Plan fields (of `ChannelNormalization`) scheme `scheme` needs set, as declared at its registration."""
    return tuple(SCHEMES.metadata(scheme).get("requires", ()))


def normalize(image: torch.Tensor, mask: torch.Tensor,
              schemes: Sequence[ChannelSettings]) -> tuple[torch.Tensor, list[list[float]]]:
    """Normalise each channel of (C, d, h, w) in place per its scheme; returns it and [[mean, std], ...] used.

    Args:
        image: (C, d, h, w) float image, modified in place.
        mask: (d, h, w) bool nonzero mask of the case.
        schemes: one plan entry per channel.
    """
    stats = []
    for channel, settings in enumerate(schemes):
        mean, std = SCHEMES.get(settings.scheme)(image[channel], mask, settings)  # a view: edits land in image
        stats.append([float(mean), float(std)])
    return image, stats


@SCHEMES.register("zscore", "the case's own mean/std (inside the nonzero mask when use_nonzero_mask)")
def zscore(x: torch.Tensor, mask: torch.Tensor, settings: ChannelSettings) -> tuple[float, float]:
    """Per-case z-score; with use_nonzero_mask the statistics come from the mask (when it has voxels) and voxels
    outside it are set to 0."""
    use_mask = settings.use_nonzero_mask and bool(mask.any())
    var, mean_t = torch.var_mean(x[mask] if use_mask else x, correction=0)
    mean, std = float(mean_t), float(var.sqrt())
    x.sub_(mean).div_(max(std, 1e-8))
    if settings.use_nonzero_mask:
        x.masked_fill_(~mask, 0.0)
    return mean, std


@SCHEMES.register("ct", "clip to the dataset's foreground percentiles, z-score with its foreground mean/std",
                  requires=("clip_low", "clip_high", "mean", "std"))
def ct(x: torch.Tensor, mask: torch.Tensor, settings: ChannelSettings) -> tuple[float, float]:
    mean, std = float(settings.mean), float(settings.std)
    x.clamp_(float(settings.clip_low), float(settings.clip_high)).sub_(mean).div_(max(std, 1e-8))
    return mean, std


@SCHEMES.register("none", "left as it is")
def none(x: torch.Tensor, mask: torch.Tensor, settings: ChannelSettings) -> tuple[float, float]:
    return 0.0, 1.0
