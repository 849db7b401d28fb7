"""One place that turns a device option ("auto", "cpu", "cuda", "cuda:1") into a usable torch device."""
from __future__ import annotations

import re

import torch

from voxseg.errors import ConfigError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """"auto" -> CUDA when available, else CPU; a GPU this machine does not have is refused up front.

    Args:
        name: the option's value.
        option: how the user spelled the option, for the error message (e.g. "loop.device").

    Raises:
        ConfigError: unknown value, CUDA missing, or a GPU index that is not visible.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not _DEVICE.match(name):
        raise ConfigError(f"{option} {name}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {name}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device
