"""How unsure the model was: normalised entropy of the probabilities `voxseg predict --save-probabilities` wrote.

For a softmax model (the channels sum to one) a voxel's uncertainty is its entropy over the K classes divided by
log K; for a region model (independent sigmoid channels) it is the mean over the channels of the binary
entropy divided by log 2. Both lie in [0, 1]: 0 is a sure voxel, 1 a coin toss.

A case's score is the mean over the voxels predicted as foreground, or over every voxel when nothing was
predicted (then a high score means the model hesitated everywhere). The reviewer sorts cases by it to look at the
most doubtful first.

The CASE.npz file is read one channel at a time from its zip stream, so a 100-class CT case needs memory for a
few volumes, never for all channels at once.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from voxseg.errors import InputError

__all__ = ["case_uncertainty", "entropy_map"]

_MEMBER = "probabilities.npy"
_TINY = 1e-6


def _channels(path: Path):
    """Yield (channel index, (D, H, W) float32) from CASE.npz, and first the shape (K, D, H, W)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a probabilities file written by 'voxseg predict --save-probabilities' "
                         f"({exc})") from None
    with archive:
        if _MEMBER not in archive.namelist():
            raise InputError(f"{path}: holds no '{_MEMBER}'; write it with 'voxseg predict --save-probabilities'")
        with archive.open(_MEMBER) as stream:
            version = np.lib.format.read_magic(stream)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(stream)  # the header only: nothing is unpickled
            if fortran or len(shape) != 4 or dtype.hasobject:
                raise InputError(f"{path}: probabilities of shape {shape} ({dtype}); expected (K, D, H, W) numbers")
            yield shape
            count = int(np.prod(shape[1:]))
            for channel in range(shape[0]):
                data = stream.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise InputError(f"{path}: ends inside channel {channel}; the file is truncated, predict again")
                yield channel, np.frombuffer(data, dtype=dtype).astype(np.float32).reshape(shape[1:])


def entropy_map(path: str | Path) -> np.ndarray:
    """(D, H, W) float32 normalised entropy in [0, 1] of CASE.npz (module docstring)."""
    channels = _channels(Path(path))
    shape = next(channels)
    total = np.zeros(shape[1:], dtype=np.float32)
    softmax_sum = np.zeros(shape[1:], dtype=np.float32)
    binary_sum = np.zeros(shape[1:], dtype=np.float32)
    for _, values in channels:
        np.clip(values, 0.0, 1.0, out=values)
        total += values
        plogp = values * np.log(np.maximum(values, _TINY))
        softmax_sum -= plogp
        rest = 1.0 - values
        binary_sum -= plogp + rest * np.log(np.maximum(rest, _TINY))
    classes = max(int(shape[0]), 2)
    if float(np.abs(total - 1.0).max(initial=0.0)) < 0.05:  # float16 storage: sums within a few thousandths
        return np.clip(softmax_sum / np.log(classes), 0.0, 1.0)
    return np.clip(binary_sum / (np.log(2.0) * shape[0]), 0.0, 1.0)


def case_uncertainty(entropy: np.ndarray, prediction: np.ndarray) -> float:
    """The mean entropy over the predicted foreground, over every voxel when none was predicted."""
    foreground = prediction > 0
    values = entropy[foreground] if foreground.any() else entropy
    return float(values.mean()) if values.size else 0.0
