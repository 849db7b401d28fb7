"""One place that turns a device option ("auto", "cpu", "cuda", "cuda:1") into a usable torch device, and one
that turns a mixed-precision option ("auto", "bf16", "fp16", "off") into an autocast dtype: training
(`loop.amp`) and inference (`InferConfig.amp`) both resolve theirs here."""
from __future__ import annotations

import contextlib
import platform
import re
from pathlib import Path
from typing import Iterator

import torch

from voxseg.errors import ConfigError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # the values of a mixed-precision option


def is_device_name(name: str) -> bool:
    """Whether `name` is a device option `resolve_device` understands: auto, cpu, cuda or cuda:N."""
    return isinstance(name, str) and _DEVICE.match(name) is not None


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


def resolve_amp(name: str, device: torch.device, option: str = "loop.amp") -> torch.dtype | None:
    """Autocast dtype of mixed-precision option `name` (one of `AMP_CHOICES`) on `device`.

    "auto" is bf16 where the GPU supports it, else fp16 (training adds loss scaling), and float32 (None) on a
    CPU; "bf16" and "off" are taken as they are; "fp16" needs CUDA.

    Args:
        name: the option's value.
        device: the compute device.
        option: how the user spelled the option, for the error message ("loop.amp", "amp").

    Raises:
        ConfigError: "fp16" on a device that is not CUDA.
    """
    if name == "off" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"{option}=fp16 needs a CUDA device; use {option}=bf16 or off on the CPU")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


def amp_name(dtype: torch.dtype | None) -> str:
    """The mixed-precision option that resolves to `dtype` on any device that supports it: bf16, fp16 or off."""
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows, often only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning while tiles run (one patch shape for every tile: it pays), then the caller's setting."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
