"""Building blocks of the U-Nets, with every layer chosen by name through small factories.

A block never names `nn.Conv3d` or `nn.InstanceNorm3d` itself: it asks `conv_layer(ndim, ...)`,
`norm_layer(name, ndim, ...)` and `nonlin_layer(name)`, so one class serves 2D and 3D networks and a different
normalisation or activation is a keyword, not a new class. Norms and activations are looked up in the `NORMS`
and `NONLINS` registries, so a new one is a registered factory:

    @NORMS.register("layer", "layer norm over the channels")
    def layer_norm(ndim, channels, eps=1e-5):
        return nn.GroupNorm(1, channels, eps=eps)

    build_network(plan, norm="layer")
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from voxseg.errors import ConfigError
from voxseg.registry import Registry

NORMS: Registry[Callable[..., nn.Module]] = Registry("norm")  # factory(ndim, channels, **kwargs)
NONLINS: Registry[Callable[..., nn.Module]] = Registry("nonlin")  # factory(**kwargs)

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_BATCH = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _check_ndim(ndim: int) -> None:
    if ndim not in (2, 3):
        raise ConfigError(f"network dimensionality must be 2 or 3, got {ndim}")


def _as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (int(value),) * ndim if isinstance(value, int) else tuple(int(v) for v in value)


def conv_layer(
    ndim: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    bias: bool = True,
) -> nn.Module:
    """Convolution with 'same' padding (k // 2 per axis), so only the stride changes the spatial shape."""
    _check_ndim(ndim)
    kernel = _as_tuple(kernel_size, ndim)
    padding = tuple(k // 2 for k in kernel)
    return _CONV[ndim](in_channels, out_channels, kernel, stride=_as_tuple(stride, ndim), padding=padding, bias=bias)


def transposed_conv_layer(ndim: int, in_channels: int, out_channels: int, stride: int | Sequence[int]) -> nn.Module:
    """Learned upsampling by exactly `stride`: kernel = stride, so output tiles never overlap."""
    _check_ndim(ndim)
    stride = _as_tuple(stride, ndim)
    return _CONV_TRANSPOSED[ndim](in_channels, out_channels, stride, stride=stride, bias=True)


def _group_count(channels: int, max_groups: int) -> int:
    """Largest number of groups <= max_groups that divides `channels` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


@NORMS.register("instance", "instance norm, affine, eps 1e-5 (nnU-Net's default)")
def instance_norm(ndim: int, channels: int, eps: float = 1e-5, affine: bool = True, **kwargs: Any) -> nn.Module:
    return _INSTANCE[ndim](channels, eps=eps, affine=affine, **kwargs)


@NORMS.register("batch", "batch norm")
def batch_norm(ndim: int, channels: int, eps: float = 1e-5, **kwargs: Any) -> nn.Module:
    return _BATCH[ndim](channels, eps=eps, **kwargs)


@NORMS.register("group", "group norm with up to num_groups (8) groups, the largest divisor of the channels")
def group_norm(ndim: int, channels: int, eps: float = 1e-5, num_groups: int = 8, **kwargs: Any) -> nn.Module:
    return nn.GroupNorm(_group_count(channels, num_groups), channels, eps=eps, **kwargs)


@NORMS.register("none", "no normalisation")
def no_norm(ndim: int, channels: int, **ignored: Any) -> nn.Module:
    return nn.Identity()


def norm_layer(name: str, ndim: int, channels: int, **kwargs: Any) -> nn.Module:
    """Normalisation layer registered as `name` in `NORMS`: "instance" (nnU-Net's default), "batch", "group",
    "none", ...; a norm factory takes (ndim, channels, **kwargs)."""
    _check_ndim(ndim)
    return NORMS.get(name)(ndim, channels, **kwargs)


@NONLINS.register("leaky_relu", "leaky ReLU, slope 0.01, in place (nnU-Net's default)")
def leaky_relu(negative_slope: float = 1e-2, inplace: bool = True) -> nn.Module:
    return nn.LeakyReLU(negative_slope, inplace=inplace)


@NONLINS.register("relu", "ReLU, in place")
def relu(inplace: bool = True) -> nn.Module:
    return nn.ReLU(inplace=inplace)


@NONLINS.register("gelu", "GELU")
def gelu(**kwargs: Any) -> nn.Module:
    return nn.GELU(**kwargs)


@NONLINS.register("elu", "ELU, in place")
def elu(inplace: bool = True, **kwargs: Any) -> nn.Module:
    return nn.ELU(inplace=inplace, **kwargs)


@NONLINS.register("none", "no activation")
def no_nonlin(**ignored: Any) -> nn.Module:
    return nn.Identity()


def nonlin_layer(name: str, **kwargs: Any) -> nn.Module:
    """Activation registered as `name` in `NONLINS`; "leaky_relu" (slope 0.01, in place) is nnU-Net's default."""
    return NONLINS.get(name)(**kwargs)


class LayerSpec:
    """The layer choices every block of a network shares: dimensionality, norm and nonlinearity."""

    def __init__(
        self,
        ndim: int,
        norm: str = "instance",
        nonlin: str = "leaky_relu",
        norm_kwargs: dict[str, Any] | None = None,
        nonlin_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_ndim(ndim)
        # Build once to fail early (at network construction) on an unknown name.
        norm_layer(norm, ndim, 8, **dict(norm_kwargs or {}))
        nonlin_layer(nonlin, **dict(nonlin_kwargs or {}))
        self.ndim = ndim
        self.norm = norm
        self.nonlin = nonlin
        self.norm_kwargs = dict(norm_kwargs or {})
        self.nonlin_kwargs = dict(nonlin_kwargs or {})

    def conv(self, in_ch: int, out_ch: int, kernel: Sequence[int] | int, stride: Sequence[int] | int = 1) -> nn.Module:
        return conv_layer(self.ndim, in_ch, out_ch, kernel, stride)

    def make_norm(self, channels: int) -> nn.Module:
        return norm_layer(self.norm, self.ndim, channels, **dict(self.norm_kwargs))

    def make_nonlin(self) -> nn.Module:
        return nonlin_layer(self.nonlin, **dict(self.nonlin_kwargs))


class ConvNormAct(nn.Sequential):
    """conv -> norm -> nonlinearity."""

    def __init__(
        self, spec: LayerSpec, in_ch: int, out_ch: int, kernel: Sequence[int] | int, stride: Sequence[int] | int = 1
    ) -> None:
        super().__init__(spec.conv(in_ch, out_ch, kernel, stride), spec.make_norm(out_ch), spec.make_nonlin())


class StackedConvs(nn.Sequential):
    """`num_convs` ConvNormAct blocks; the first one carries the stride (strided-conv downsampling)."""

    def __init__(
        self,
        spec: LayerSpec,
        num_convs: int,
        in_ch: int,
        out_ch: int,
        kernel: Sequence[int] | int,
        stride: Sequence[int] | int = 1,
    ) -> None:
        if num_convs < 1:
            raise ConfigError(f"conv_per_stage must be at least 1, got {num_convs}")
        layers = [ConvNormAct(spec, in_ch, out_ch, kernel, stride)]
        layers += [ConvNormAct(spec, out_ch, out_ch, kernel) for _ in range(num_convs - 1)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two convolutions with an identity skip: nonlin(norm(conv(nonlin(norm(conv(x))))) + skip(x)).

    When the block changes the spatial shape (stride) or the feature count, the skip is a 1x1 convolution with
    the block's stride followed by a norm, so both branches have the same shape. With `pooled_skip` (nnU-Net's
    BasicBlockD, "ResNet-D") a stride is average pooling instead, and the 1x1 convolution + norm after it is
    there only when the feature count changes: skip = Sequential([AvgPool], [Sequential(conv, norm)]).
    """

    def __init__(
        self, spec: LayerSpec, in_ch: int, out_ch: int, kernel: Sequence[int] | int, stride: Sequence[int] | int = 1,
        pooled_skip: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(spec, in_ch, out_ch, kernel, stride)
        self.conv2 = nn.Sequential(spec.conv(out_ch, out_ch, kernel), spec.make_norm(out_ch))
        strided = any(s != 1 for s in _as_tuple(stride, spec.ndim))
        self.skip: nn.Module = nn.Identity()
        if pooled_skip and (strided or in_ch != out_ch):
            pool = [_AVG_POOL[spec.ndim](_as_tuple(stride, spec.ndim))] if strided else []
            project = [nn.Sequential(spec.conv(in_ch, out_ch, 1), spec.make_norm(out_ch))] if in_ch != out_ch else []
            self.skip = nn.Sequential(*pool, *project)
        elif strided or in_ch != out_ch:
            self.skip = nn.Sequential(spec.conv(in_ch, out_ch, 1, stride), spec.make_norm(out_ch))
        self.act = spec.make_nonlin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ResidualStage(nn.Sequential):
    """`num_blocks` residual blocks; the first one carries the stride and the feature change (`pooled_skip`: see
    ResidualBlock)."""

    def __init__(
        self,
        spec: LayerSpec,
        num_blocks: int,
        in_ch: int,
        out_ch: int,
        kernel: Sequence[int] | int,
        stride: Sequence[int] | int = 1,
        pooled_skip: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ConfigError(f"blocks_per_stage entries must be at least 1, got {num_blocks}")
        blocks = [ResidualBlock(spec, in_ch, out_ch, kernel, stride, pooled_skip)]
        blocks += [ResidualBlock(spec, out_ch, out_ch, kernel, pooled_skip=pooled_skip) for _ in range(num_blocks - 1)]
        super().__init__(*blocks)


def init_weights(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """He (kaiming normal) init for every (transposed) convolution, zero bias; norms keep their defaults.

    Use as `model.apply(init_weights)`. The slope matches the LeakyReLU that follows each convolution.
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
