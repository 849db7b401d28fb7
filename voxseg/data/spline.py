"""Spline resampling in torch that equals `scipy.ndimage.zoom(order, mode="nearest", grid_mode=True)`.

nnU-Net resamples images with `skimage.transform.resize(order=3, mode="edge", anti_aliasing=False)`, which
is `scipy.ndimage.zoom(order=3, mode="nearest", grid_mode=True)` (output voxel centres at
`(i + 0.5) * in / out - 0.5` in input voxel units) followed by a clip of the output to the input's
[min, max]. scipy runs that on the CPU only, one thread, and takes seconds per channel.

A B-spline zoom is separable: the prefilter, the edge padding scipy adds before it and the tensor-product
interpolation all act on one axis at a time, so the 3D zoom is three 1D linear maps, each an (out x in)
matrix. `zoom_matrix` builds that matrix once per (in, out, order) by letting scipy zoom the identity (its
columns are the responses to unit vectors; exact by construction, whatever scipy does at the borders), and
`zoom` applies one matmul per resized axis on the tensor's device. Work is split per channel and into slabs
of output rows along the first axis, so memory stays at the input, the output and a slab of temporaries.

`nearest_indices` is the order-0 source index of every output voxel along one axis, as
`scipy.ndimage.map_coordinates(order=0, mode="nearest")` picks it for those centres (nnU-Net's rule along a
separately resampled coarse axis).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

MAX_SPLINE_ORDER = 5
DEFAULT_SLAB_ELEMENTS = 1 << 24  # output voxels per slab (64 MB of float32)


@lru_cache(maxsize=256)
def zoom_matrix(in_size: int, out_size: int, order: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix M such that zoom(x) == M @ x for a 1D signal x (read-only, cached)."""
    from scipy import ndimage

    if not 0 <= order <= MAX_SPLINE_ORDER:
        raise ValueError(f"spline order must be 0..{MAX_SPLINE_ORDER}, got {order}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"zoom_matrix: sizes must be positive, got {in_size} -> {out_size}")
    # zoom along axis 0 only: column j of the result is the zoomed unit vector e_j
    matrix = ndimage.zoom(np.eye(in_size), (out_size / in_size, 1.0), order=order, mode="nearest", grid_mode=True)
    if matrix.shape != (out_size, in_size):  # scipy rounds in * zoom; out / in always rounds back to out
        raise AssertionError(f"zoom_matrix: scipy gave {matrix.shape} for {in_size} -> {out_size}")
    matrix.setflags(write=False)
    return matrix


@lru_cache(maxsize=256)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """(out_size,) int64 source index of each output voxel: the voxel whose centre is nearest
    `(i + 0.5) * in / out - 0.5`, halves rounding up, clamped to the axis (map_coordinates order 0)."""
    coords = float(in_size) / out_size * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5
    index = np.clip(np.floor(coords + 0.5), 0, in_size - 1).astype(np.int64)
    index.setflags(write=False)
    return index


def _matrix(in_size: int, out_size: int, order: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(zoom_matrix(in_size, out_size, order), device=like.device, dtype=like.dtype)


def _apply(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply `matrix` (out x in) into dimension `dim` of x, without moving dimensions around."""
    dim = dim % x.ndim
    if dim == x.ndim - 1:
        return x @ matrix.T
    lead, size, rest = x.shape[:dim], x.shape[dim], x.shape[dim + 1:]
    flat = x.reshape(*lead, size, int(np.prod(rest)))
    return (matrix @ flat).reshape(*lead, matrix.shape[0], *rest)


def _highest_precision():
    """float32 matmuls in full precision (TF32 would cost ~1e-3 relative error) for the duration of a zoom."""
    class _Guard:
        def __enter__(self):
            self.saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")

        def __exit__(self, *exc):
            torch.set_float32_matmul_precision(self.saved)

    return _Guard()


def zoom(
    x: torch.Tensor,
    new_shape: Sequence[int],
    order: int = 3,
    clip: bool = True,
    per_slice_axis: int | None = None,
    slab_elements: int = DEFAULT_SLAB_ELEMENTS,
) -> torch.Tensor:
    """Spline zoom of every channel of a (C, d, h, w) float tensor, as skimage's resize does it.

    Args:
        x: (C, d, h, w) float32 or float64 tensor on any device.
        new_shape: spatial output shape (3 ints).
        order: spline order 0..5 (3 = cubic, nnU-Net's image order).
        clip: clip each output to the [min, max] of its input (skimage's `clip=True`).
        per_slice_axis: None: one 3D zoom per channel, clipped per channel. An axis: every slice orthogonal to
            it is zoomed on its own in 2D (that axis keeps its size, new_shape[axis] is ignored) and clipped
            to its own range, as nnU-Net resizes slice by slice before handling a coarse axis.
        slab_elements: output voxels computed at once (bounds the temporaries; the result does not depend on it).

    Returns:
        (C, *new_shape) tensor of x's dtype on x's device; x itself when no axis changes size.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"zoom expects a (C, d, h, w) float tensor, got {tuple(x.shape)} {x.dtype}")
    shape_in = tuple(int(s) for s in x.shape[1:])
    shape_out = tuple(int(s) for s in new_shape)
    if per_slice_axis is not None:
        shape_out = tuple(shape_in[a] if a == per_slice_axis else shape_out[a] for a in range(3))
    resized = [a for a in range(3) if shape_in[a] != shape_out[a]]
    if not resized:
        return x
    matrices = {a: _matrix(shape_in[a], shape_out[a], order, x) for a in resized}
    plane_size = shape_out[1] * shape_out[2]
    rows = max(1, min(shape_out[0], int(slab_elements) // max(1, plane_size)))
    # the clip range: per channel, or per slice along per_slice_axis (kept as a broadcastable (1|n, 1|n, 1|n))
    reduce_dims = tuple(a for a in range(3) if a != per_slice_axis)
    out = torch.empty((x.shape[0], *shape_out), dtype=x.dtype, device=x.device)
    with _highest_precision():
        for channel in range(x.shape[0]):
            volume = x[channel]
            low = volume.amin(dim=reduce_dims, keepdim=True) if clip else None
            high = volume.amax(dim=reduce_dims, keepdim=True) if clip else None
            for start in range(0, shape_out[0], rows):
                stop = min(shape_out[0], start + rows)
                if 0 in matrices:
                    piece = _apply(volume, matrices[0][start:stop], 0)
                else:
                    piece = volume[start:stop]
                for axis in (1, 2):
                    if axis in matrices:
                        piece = _apply(piece, matrices[axis], axis)
                if clip:
                    # bounds vary along axis 0 only when it is the per-slice axis, whose rows map one to one
                    lo = low[start:stop] if low.shape[0] > 1 else low
                    hi = high[start:stop] if high.shape[0] > 1 else high
                    piece = torch.maximum(torch.minimum(piece, hi), lo)
                out[channel, start:stop] = piece
    return out


def nearest_along(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """Order-0 resampling of spatial `axis` (0..2) of a (C, d, h, w) tensor to out_size (any dtype)."""
    in_size = int(x.shape[1 + axis])
    if in_size == out_size:
        return x
    index = torch.tensor(nearest_indices(in_size, int(out_size)), device=x.device)
    return x.index_select(1 + axis, index)


def spline_along(x: torch.Tensor, axis: int, out_size: int, order: int) -> torch.Tensor:
    """Spline resampling (order >= 1, no clip) of spatial `axis` of a (C, d, h, w) float tensor alone."""
    in_size = int(x.shape[1 + axis])
    if in_size == out_size:
        return x
    with _highest_precision():
        return _apply(x, _matrix(in_size, int(out_size), order, x), 1 + axis)
