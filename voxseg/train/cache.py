"""Case cache: the preprocessed training cases held where patches are cheapest to cut from.

Modes:
    gpu     every case as a tensor on `device` (GPU memory when device is CUDA); crops are device copies.
    pinned  every case in page-locked host memory (plain host memory for a CPU device); crops are host copies
            followed by one asynchronous transfer per batch.
    mmap    memory-mapped .npy files; a crop reads only the pages it touches (for datasets larger than RAM).
    auto    gpu if the cases fit in the device budget (default 80% of the free device memory; for a CPU device
            50% of host RAM), else pinned if they fit in 50% of host RAM as the pinned allocator counts them
            (each tensor rounded up to a power of two), else mmap. A run's training and validation caches share
            one `CacheBudget`: the validation cache gets what the training cache left.

Images stay in their stored dtype (usually float16) in the cache; the sampler converts crops on the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from voxseg.data.store import load_case, load_foreground_locations
from voxseg.errors import ConfigError, DatasetError
from voxseg.units import GIB, gib

MODES = ("auto", "gpu", "pinned", "mmap")


def host_memory_bytes() -> int:
    """Total physical host memory (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def pinned_bytes(sizes: Iterable[int]) -> int:
    """Host memory that pinned tensors of these sizes (bytes) take. PyTorch's caching host allocator, which
    `Tensor.pin_memory()` draws from, rounds every block up to a power of two: a 2.2 GB case pins 4 GiB."""
    return sum(1 << (int(size) - 1).bit_length() for size in sizes if size > 0)


@dataclass
class CacheBudget:
    """The memory that the case caches of one run may still take, shared by its training and validation caches
    (each cache placed takes its part, so the validation cache sees what the training cache left).

    Attributes:
        device_bytes: what "gpu" mode may hold on the training device (on a CPU device: plain host tensors).
        host_bytes: what "pinned" mode may hold in page-locked host memory (counted as the allocator rounds).
    """

    device_bytes: float
    host_bytes: float

    @classmethod
    def for_device(cls, device: torch.device, budget_gb: float | None = None, host_total: int | None = None,
                   free_device: int | None = None) -> "CacheBudget":
        """The default budget: `budget_gb` on the device when given, else 80% of the free CUDA memory (on a CPU
        device half the host RAM); pinned memory up to half the host RAM. The machine's numbers can be passed
        in (`host_total`, `free_device`) instead of read."""
        host = host_memory_bytes() if host_total is None else host_total
        if budget_gb is not None:
            device_budget = budget_gb * GIB
        elif device.type == "cuda":
            device_budget = 0.8 * (free_device_bytes(device) if free_device is None else free_device)
        else:
            device_budget = 0.5 * host
        return cls(float(device_budget), 0.5 * host)

    def place(self, requested: str, sizes: Sequence[int], device_type: str) -> str:
        """The mode for a cache of tensors of `sizes` bytes ("auto": gpu if it fits the device budget, else, for
        a CUDA device, pinned if its rounded size fits the host budget, else mmap); takes what it holds."""
        total, pinned = sum(sizes), pinned_bytes(sizes)
        mode = requested
        if requested == "auto":
            if total <= self.device_bytes:
                mode = "gpu"
            elif device_type == "cuda" and pinned <= self.host_bytes:
                mode = "pinned"
            else:
                mode = "mmap"
        if mode == "gpu":
            self.device_bytes -= total
        elif mode == "pinned" and device_type == "cuda":
            self.host_bytes -= pinned
        return mode


def choose_cache_mode(sizes: Sequence[int], device: torch.device, budget_gb: float | None = None) -> str:
    """The mode "auto" picks for cases of these sizes (bytes per tensor) on their own, with
    `CacheBudget.for_device`'s default budget: `voxseg estimate` asks it for a dataset it times a few cases of."""
    return CacheBudget.for_device(device, budget_gb).place("auto", [int(size) for size in sizes], device.type)


class CaseCache:
    """Preprocessed cases (image, labels, foreground locations) for patch sampling.

    Args:
        preprocessed_dir: WORKDIR/preprocessed.
        names: case names to hold (e.g. the training split of a fold).
        device: where patches are wanted (and, in gpu mode, where cases live).
        mode: "auto", "gpu", "pinned" or "mmap" (see the module docstring).
        budget_gb: memory the gpu mode may use; default 80% of the currently free device memory. Pass the
            free memory minus the training step's estimate when the model is not allocated yet.
        budget: a `CacheBudget` shared with the run's other cache (instead of `budget_gb`): this cache takes its
            part of it, so a second cache sees only what is left.
        previous: a cascade stage's stored first-stage predictions (`voxseg.infer.cascade.StoredPrevious`):
            their one-hot channels are appended to each image's channels (held in memory also in mmap mode),
            so crops and the spatial augmentation treat them with the image; `extra_channels` counts them.
    """

    def __init__(
        self,
        preprocessed_dir: str | Path,
        names: Sequence[str],
        device: str | torch.device = "cpu",
        mode: str = "auto",
        budget_gb: float | None = None,
        previous: Any = None,
        budget: CacheBudget | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"cache mode '{mode}' is unknown; use one of {', '.join(MODES)}")
        if not names:
            raise DatasetError(f"{preprocessed_dir}: no training cases given to the cache; check splits.json")
        self.directory = Path(preprocessed_dir)
        self.names = list(names)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # pin "cuda" to the current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.requested_mode = mode
        self.previous = previous
        self.extra_channels = 0 if previous is None else int(previous.num_channels)
        if previous is not None:
            previous.check(self.names)  # every missing case named before anything is read
        maps = [self._open(name) for name in self.names]  # memory-mapped: shapes and sizes without reading
        self.nbytes = sum(image.nbytes + seg.nbytes for image, seg in maps)
        self.num_channels = int(maps[0][0].shape[0])
        self.image_dtype = maps[0][0].dtype
        for name, (image, _) in zip(self.names, maps):
            if image.shape[0] != self.num_channels:
                raise DatasetError(f"{self.directory}: case '{name}' has {image.shape[0]} channels, "
                                   f"'{self.names[0]}' has {self.num_channels}; run 'voxseg preprocess' again")
        if budget is None:
            budget = CacheBudget.for_device(self.device, budget_gb)
        self.tensor_sizes = [array.nbytes for pair in maps for array in pair]
        self.mode = budget.place(mode, self.tensor_sizes, self.device.type)
        self.images: list[torch.Tensor | np.ndarray] = []
        self.segs: list[torch.Tensor | np.ndarray] = []
        for image, seg in maps:
            stored_image, stored_seg = self._hold(image), self._hold(seg)
            self.images.append(stored_image)
            self.segs.append(stored_seg)
        self._foreground: dict[int, dict[int, np.ndarray]] = {}

    def _open(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        image, seg, _ = load_case(self.directory, name, mmap=True)
        if seg is None:
            raise DatasetError(f"{self.directory}: case '{name}' has no {name}_seg.npy, so it cannot be used for "
                               "training; preprocess the dataset with its labels")
        if image.ndim != 4 or seg.shape != (1, *image.shape[1:]):
            raise DatasetError(f"{self.directory}: case '{name}' has image {image.shape} and seg {seg.shape}; "
                               "expected (C, D, H, W) and (1, D, H, W); run 'voxseg preprocess' again")
        if self.previous is not None:
            onehot = self.previous.onehot(name, image.shape[1:]).astype(image.dtype)
            image = np.concatenate([np.asarray(image), onehot])
        return image, seg

    def _hold(self, array: np.ndarray) -> torch.Tensor | np.ndarray:
        if self.mode == "mmap":
            return array
        tensor = torch.from_numpy(np.array(array))  # reads the file into memory (writable copy)
        if self.mode == "gpu":
            return tensor.to(self.device)
        if self._pinned:
            return tensor.pin_memory()
        return tensor

    @property
    def _pinned(self) -> bool:
        """Pinned only for a CUDA device: page-locked memory helps nothing else and is a scarce OS resource."""
        return self.device.type == "cuda" and torch.cuda.is_available()

    # ----- what the sampler needs --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    @property
    def on_device(self) -> bool:
        """Whether crops can be written straight into tensors on `device` (gpu mode, or any mode on CPU)."""
        return self.mode == "gpu" or self.device.type == "cpu"

    @property
    def gigabytes(self) -> float:
        return gib(self.nbytes)

    def shape(self, index: int) -> tuple[int, ...]:
        """Spatial shape (D, H, W) of case `index`."""
        return tuple(int(s) for s in self.images[index].shape[1:])

    def foreground(self, index: int) -> dict[int, np.ndarray]:
        """{label value: (N, 3) int32 voxel coordinates}, loaded on first use."""
        locations = self._foreground.get(index)
        if locations is None:
            locations = load_foreground_locations(self.directory, self.names[index])
            self._foreground[index] = locations  # a dict store is atomic: safe with a prefetch thread
        return locations

    def read_patch(
        self, index: int, start: Sequence[int], image_out: torch.Tensor, seg_out: torch.Tensor
    ) -> None:
        """Copy the window starting at `start` (may be negative / run past the end) into pre-filled outputs.

        image_out (C, *S) and seg_out (1, *S) already hold the padding values; only the part of the window
        that lies inside the case is written. Outputs are on `device` in gpu mode, on the host otherwise.
        """
        size = image_out.shape[1:]
        source, target = [slice(None)], [slice(None)]
        for begin, length, extent in zip(start, size, self.shape(index)):
            low, high = max(begin, 0), min(begin + length, extent)
            if high <= low:
                return  # the window misses the case entirely: padding only
            source.append(slice(low, high))
            target.append(slice(low - begin, high - begin))
        image, seg = self.images[index][tuple(source)], self.segs[index][tuple(source)]
        if isinstance(image, np.ndarray):
            # np.array reads just these pages of the memmap into a writable array torch can wrap
            image, seg = torch.from_numpy(np.array(image)), torch.from_numpy(np.array(seg))
        image_out[tuple(target)].copy_(image)
        seg_out[tuple(target)].copy_(seg)

    def describe(self) -> str:
        """One line: number of cases, chosen mode and where/how much memory it holds."""
        where = {"gpu": f"tensors on {self.device}",
                 "pinned": "pinned host memory" if self._pinned else "host memory",
                 "mmap": "memory-mapped files"}[self.mode]
        how = "auto" if self.requested_mode == "auto" else "requested"
        return f"case cache: {len(self)} cases, {self.gigabytes:.2f} GiB, mode {self.mode} ({how}) in {where}"
