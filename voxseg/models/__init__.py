"""Segmentation networks: `build_network(plan)` and the `NETWORKS` registry."""
from voxseg.models.blocks import count_parameters
from voxseg.models.factory import NETWORKS, build_network
from voxseg.models.unet import UNet

__all__ = ["NETWORKS", "UNet", "build_network", "count_parameters"]
