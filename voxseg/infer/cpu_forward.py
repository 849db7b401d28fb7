"""The network's forward pass on a CPU, run the fastest way this machine has, chosen by measurement.

PyTorch runs a 3D U-Net on the CPU through oneDNN. How fast depends on the memory layout and the precision,
and which is fastest depends on the CPU, so it is measured, not guessed:

    fp32      float32, (N, C, D, H, W) contiguous: PyTorch's default (and nnU-Net's predictor's)
    fp32-cl   float32, channels-last (N, D, H, W, C): oneDNN's convolutions without layout conversions
    bf16-cl   bfloat16 convolutions, channels-last: on CPUs with native bfloat16 (AMX, AVX512-BF16) several
              times faster; the logits differ from float32's by the rounding of bfloat16 (see docs/INFERENCE.md)

In every variant a large tile (`SAMPLE_ALONE_VOXELS`, 2^19 voxels, e.g. 96 x 128 x 160) goes through the network on
its own: oneDNN already keeps the cores busy with one, and the memory then holds one tile's activations; small
tiles go as one batch. Instance normalisation runs on channels-last tensors without copying them, one sample at
a time (`SampleInstanceNorm`). The variant is chosen by timing one forward pass of each
candidate with the network's own shapes (`choose_variant`). The result is kept per CPU, PyTorch version, thread
count and network in the cache file `cache_file()` (~/.cache/voxseg/cpu_forward.json; VOXSEG_CACHE_DIR moves
it), so the measurement costs a few forward passes once per model and machine.

Which variants are candidates is the precision's (`InferConfig.amp`, `InferConfig.cpu_forward`): float32 by
default (fp32, fp32-cl; the labels are those of float32 up to summation order), bf16-cl with `--amp bf16`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from voxseg.devices import cpu_name
from voxseg.errors import VoxsegError
from voxseg.jsonio import read_json, write_json_atomic

VARIANTS = ("fp32", "fp32-cl", "bf16-cl")
IMPLEMENTATION = 3  # part of the cache key: a change of how a variant runs measures again
SAMPLE_ALONE_VOXELS = 2**19
"""Tiles of at least this many voxels go through the network one at a time (one keeps 2 cores busy, and memory
holds one tile's activations); smaller tiles go as one batch (per-call overhead would dominate)."""
FLOAT32_VARIANTS = ("fp32", "fp32-cl")

__all__ = ["VARIANTS", "CpuForward", "SampleInstanceNorm", "cache_file", "choose_variant", "cpu_candidates",
           "prepare_cpu_networks", "replace_instance_norms"]


class SampleInstanceNorm(nn.Module):
    """Instance normalisation (affine, no running statistics) that runs on channels-last tensors without the
    layout copy PyTorch's instance-norm kernel makes.

    - float32, contiguous: PyTorch's instance norm itself (the numbers of the network as built);
    - float32, channels-last: each sample's mean and variance in two passes (pairwise sums, as accurate as the
      contiguous kernel: PyTorch's channels-last batch-norm statistics sum in one float32 pass and are off by
      ~1e-3 on a 96 x 128 x 160 tile), applied by the batch-norm kernel with those statistics;
    - bfloat16 (autocast): the batch-norm kernel with each sample's own statistics (their rounding is far below
      bfloat16's).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.is_contiguous():
            return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if x.shape[0] > 1:
            return torch.cat([self(x[i : i + 1]) for i in range(x.shape[0])])
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype != torch.float32:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        mean, var = _sample_statistics(x)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


def _sample_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of one sample (1, C, *S): the mean, then the mean squared
    deviation from it, each a pairwise float32 sum over the voxels with the channels innermost."""
    channels = x.shape[1]
    flat = x.movedim(1, -1).reshape(-1, channels)  # a view of a channels-last tensor
    mean = flat.mean(0)
    deviation = flat - mean
    deviation.mul_(deviation)
    return mean, deviation.mean(0)


def replace_instance_norms(module: nn.Module) -> int:
    """Replace every instance norm without running statistics by a SampleInstanceNorm (in place); the count."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, (nn.InstanceNorm2d, nn.InstanceNorm3d)) and not child.track_running_stats:
            setattr(module, name, SampleInstanceNorm(child))
            count += 1
        else:
            count += replace_instance_norms(child)
    return count


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


class CpuForward(nn.Module):
    """A network run on the CPU in one variant: each sample alone, in the variant's layout and precision;
    returns (N, K, *P) float32 logits, contiguous (the first output of a deep-supervision list)."""

    def __init__(self, network: nn.Module, variant: str) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown CPU forward variant {variant!r}; one of {', '.join(VARIANTS)}")
        self.network = network
        self.variant = variant
        self.channels_last = variant.endswith("-cl")
        self.dtype = torch.bfloat16 if variant.startswith("bf16") else None
        self._layout_of: int | None = None

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim in (4, 5):
            layout = _memory_format(x.ndim)
            if self._layout_of != x.ndim:
                self.network.to(memory_format=layout)
                self._layout_of = x.ndim
            x = x.contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 or x[0, 0].numel() < SAMPLE_ALONE_VOXELS:
            return self._sample(x)
        return torch.cat([self._sample(x[i : i + 1]) for i in range(x.shape[0])])


def prepare_cpu_networks(networks: Sequence[nn.Module], input_shape: Sequence[int],
                         candidates: Sequence[str]) -> list[CpuForward]:
    """The networks (modified in place: instance norms replaced) wrapped to run on the CPU as the fastest of
    `candidates` for inputs of `input_shape` (C, *P) (`choose_variant`, measured on the first network)."""
    for network in networks:
        replace_instance_norms(network)
    variant = choose_variant(networks[0], input_shape, candidates)
    return [CpuForward(network, variant) for network in networks]


def cpu_candidates(amp_dtype: torch.dtype | None, requested: str = "auto") -> tuple[str, ...]:
    """The variants a forward may take: `requested` alone when it names one, else those of the precision
    (float32: fp32 and fp32-cl; bfloat16: bf16-cl)."""
    if requested != "auto":
        return (requested,)
    return ("bf16-cl",) if amp_dtype == torch.bfloat16 else FLOAT32_VARIANTS


# ----- the measurement and its cache ------------------------------------------------------------------------
def cache_file() -> Path:
    """Where measured choices are kept: $VOXSEG_CACHE_DIR/cpu_forward.json, else ~/.cache/voxseg/."""
    root = os.environ.get("VOXSEG_CACHE_DIR")
    if not root:
        try:
            root = Path.home() / ".cache" / "voxseg"
        except (RuntimeError, KeyError):  # no home directory known: a temporary folder keeps it for this machine
            root = Path(tempfile.gettempdir()) / "voxseg-cache"
    return Path(root) / "cpu_forward.json"


def cache_key(network: nn.Module, input_shape: Sequence[int], candidates: Sequence[str]) -> str:
    """What the choice depends on: CPU, PyTorch, threads, the network's layers and parameter shapes, the
    input shape and the candidates."""
    layers = [(name, type(module).__name__, tuple(getattr(module, "kernel_size", ())),
               tuple(getattr(module, "stride", ())) if isinstance(getattr(module, "stride", None), tuple) else ())
              for name, module in network.named_modules()]
    shapes = [(name, tuple(p.shape)) for name, p in network.named_parameters()]
    text = json.dumps([IMPLEMENTATION, cpu_name(), torch.__version__, torch.get_num_threads(), layers, shapes,
                       list(input_shape), list(candidates)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or malformed file counts as empty (it is measured again)."""
    try:
        data = read_json(path)
    except (OSError, VoxsegError):
        return {}
    return data if isinstance(data, dict) else {}


def _time_variant(network: nn.Module, variant: str, sample: torch.Tensor) -> float:
    """Seconds of one forward pass of `variant` after a warm-up pass (oneDNN builds its kernels in the first)."""
    network.to(memory_format=torch.contiguous_format)
    runner = CpuForward(network, variant)
    with torch.no_grad():
        runner(sample)
        start = time.perf_counter()
        runner(sample)
        return time.perf_counter() - start


def choose_variant(network: nn.Module, input_shape: Sequence[int], candidates: Sequence[str],
                   timer: Callable[[nn.Module, str, torch.Tensor], float] = _time_variant,
                   report: Callable[[str], None] | None = None) -> str:
    """The fastest of `candidates` for `network` (already prepared: instance norms replaced) on inputs of
    `input_shape` (C, *P), from the cache when this CPU measured it before, else timed and cached."""
    if len(candidates) == 1:
        return candidates[0]
    path, key = cache_file(), cache_key(network, input_shape, candidates)
    entries = _read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("variant") in candidates:
        return entry["variant"]
    batch = 1 if math.prod(input_shape[1:]) >= SAMPLE_ALONE_VOXELS else 8  # as the tiles will run
    sample = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    seconds = {variant: timer(network, variant, sample) for variant in candidates}
    network.to(memory_format=torch.contiguous_format)
    best = min(seconds, key=seconds.get)
    entries[key] = {"variant": best, "seconds": {k: round(v, 4) for k, v in seconds.items()},
                    "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "input": list(input_shape), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, entries)
    except OSError as exc:  # a read-only home: the choice still holds for this run
        print(f"note: could not keep the CPU forward choice in {path}: {exc}", file=sys.stderr)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(seconds.items(), key=lambda kv: kv[1]))
    (report or (lambda line: print(line, file=sys.stderr, flush=True)))(
        f"measured one forward pass on this CPU: {timings} -> {best} (kept in {path})")
    return best
