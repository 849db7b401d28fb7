"""Build a network from a plan: `build_network(plan)` looks up `plan.network.name` in `NETWORKS`.

A new architecture is one registered function `(plan, deep_supervision, **overrides) -> nn.Module`:

    @NETWORKS.register("my_net")
    def build_my_net(plan, deep_supervision, **overrides): ...

and `"network": {"name": "my_net", ...}` in plans.json.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from voxseg.errors import ConfigError
from voxseg.models.unet import UNet, UNetTopology
from voxseg.plans import NetworkPlan, Plan
from voxseg.registry import Registry, unknown_name_message

NETWORKS: Registry[Callable[..., nn.Module]] = Registry("network")


def build_network(plan: Plan, deep_supervision: bool | None = None, **overrides: Any) -> nn.Module:
    """Network for `plan`: input (B, plan.network_in_channels, *patch), output (B, plan.num_outputs, *patch) logits.

    Args:
        plan: the plan; `plan.network` gives the topology, `plan.network.name` the registry entry.
        deep_supervision: None follows `plan.network.deep_supervision`.
        **overrides: constructor options of the network that replace the plan's values, e.g. `norm="batch"`,
            `residual=True`, `features=[16, 32]`. Unknown names raise ConfigError.
    """
    if deep_supervision is None:
        deep_supervision = plan.network.deep_supervision
    return NETWORKS.build(plan.network.name, plan, bool(deep_supervision), **overrides)


def warn_noop_deep_supervision(plan: Plan, emit: Callable[[str], None] = print) -> bool:
    """Say (through `emit`) when deep supervision is on but the network has fewer than 3 stages.

    With 2 stages the decoder has one output only, so there is no lower resolution to supervise: the option
    does nothing. Returns True when the warning was given.
    """
    stages = len(plan.network.features)
    if not plan.network.deep_supervision or stages >= 3:
        return False
    emit(f"WARNING deep supervision is on but the network has {stages} stage(s): with fewer than 3 there is no "
         "lower-resolution decoder output to supervise, so it has no effect (set network.deep_supervision=false "
         "or plan more stages)")
    return True


@NETWORKS.register("unet")
def build_unet(plan: Plan, deep_supervision: bool, **overrides: Any) -> UNet:
    """Plain or residual-encoder U-Net (`network.residual`) from the plan's topology."""
    net = plan.network
    fields: dict[str, Any] = dict(
        features=list(net.features),
        kernel_sizes=[list(k) for k in net.kernel_sizes],
        strides=[list(s) for s in net.strides],
        conv_per_stage=net.conv_per_stage,
        residual=net.residual,
        blocks_per_stage=net.blocks_per_stage,
        decoder_conv_per_stage=net.decoder_conv_per_stage,
        pooled_skip=net.pooled_skip,
    )
    # layer constants only when the plan departs from the layers' defaults, so that a `norm` or `nonlin`
    # override (which may take other options) keeps working
    if net.norm_eps != NetworkPlan.norm_eps:
        fields["norm_kwargs"] = {"eps": net.norm_eps}
    if net.negative_slope != NetworkPlan.negative_slope:
        fields["nonlin_kwargs"] = {"negative_slope": net.negative_slope}
    valid = [field.name for field in dataclasses.fields(UNetTopology)]
    for key in overrides:
        if key not in valid:
            raise ConfigError(unknown_name_message("network option", key, valid))
    fields.update(overrides)
    return UNet(plan.network_in_channels, plan.num_outputs, UNetTopology(**fields), deep_supervision)
