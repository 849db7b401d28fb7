"""Network outputs back onto a case's original grid in slabs, so that memory stays bounded.

`restore_to_original` resamples the whole (K, d, h, w) output to the crop box at once, then activates it and
pastes it into the full grid: three K x original-grid float32 tensors. For a CT case (512 x 512 x 300 voxels,
41 classes) that is 3 x 41 x 78.6 M x 4 bytes ~= 39 GB, more than most GPUs have. `RestoreSlabs` computes the
same resampling one slab of rows (along the first axis) of the crop box at a time; the caller activates each
slab, takes its labels and copies it to the host, so the device never holds more than `max_values` values
(channels x voxels) of slab tensors at once. `DEFAULT_RESTORE_VALUES` (2^28 values, 1 GiB of float32) gives the
CT case above slabs of 8 rows, whatever the number of cases or their size.

The resampling is nnU-Net's rule for network outputs (`voxseg.data.resample`): linear, voxel centres of the new
grid at `(i + 0.5) * in / out - 0.5` (edges clamped), a separate coarse axis taken with nearest values. It is
computed one axis at a time (gather the two neighbouring rows, weigh them), so every output value comes from
the same operations whatever the slab size: the result does not depend on `max_values`. It equals trilinear
`F.interpolate` (what `restore_to_original` uses) to float32 rounding (~1e-6); where a near-tie makes a label
differ (20 of 4.9 M voxels for random logits, 96^3 -> 160^3), the labels here are those of a float64
computation, F.interpolate's (whose CPU weights are less exact) are not.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch

from voxseg.data.resample import separate_axis
from voxseg.data.spline import nearest_indices

__all__ = ["DEFAULT_RESTORE_VALUES", "RestoreSlabs", "linear_weights", "restore_in_slabs"]

DEFAULT_RESTORE_VALUES = 1 << 28
"""Values (channels x voxels) of slab tensors a restore holds at once: 2^28 float32 = 1 GiB of device memory."""


def linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear resampling of one axis: for each output index the two source indices and the second's weight.

    Source coordinate `(i + 0.5) * in / out - 0.5`, clamped to [0, in - 1] (align_corners=False).
    Example: 4 -> 8 gives sources 0, 0, 0.25, 0.75, 1.25, ...: indices (0, 1), (0, 1), (0, 1), (0, 1),
    (1, 2), ... with weights 0, 0, 0.25, 0.75, 0.25, ...
    """
    coords = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    coords = np.clip(coords, 0.0, in_size - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, coords - low


class _Axis:
    """How one axis goes from `in_size` to `out_size`: unchanged, nearest (the separate axis) or linear."""

    def __init__(self, in_size: int, out_size: int, nearest: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.in_size, self.out_size = in_size, out_size
        self.kind = "same" if in_size == out_size else ("nearest" if nearest else "linear")
        self.to(device, dtype)

    def to(self, device: torch.device, dtype: torch.dtype) -> "_Axis":
        if self.kind == "nearest":
            self.index = torch.tensor(nearest_indices(self.in_size, self.out_size), device=device)
        elif self.kind == "linear":
            low, high, weight = linear_weights(self.in_size, self.out_size)
            self.low, self.high = torch.as_tensor(low, device=device), torch.as_tensor(high, device=device)
            self.weight_high = torch.as_tensor(weight, dtype=dtype, device=device)
            self.weight_low = torch.as_tensor(1.0 - weight, dtype=dtype, device=device)
        return self

    def apply(self, x: torch.Tensor, dim: int, rows: slice = slice(None)) -> torch.Tensor:
        """Resample dimension `dim` of x to the output indices `rows` of this axis."""
        if self.kind == "same":
            return x.narrow(dim, rows.start or 0, len(range(*rows.indices(self.out_size))))
        if self.kind == "nearest":
            return x.index_select(dim, self.index[rows])
        shape = [1] * x.ndim
        shape[dim] = -1
        low = x.index_select(dim, self.low[rows]).mul_(self.weight_low[rows].view(shape))
        return low.add_(x.index_select(dim, self.high[rows]).mul_(self.weight_high[rows].view(shape)))


class RestoreSlabs:
    """The crop box of a case's original grid, restored from (K, d, h, w) outputs one slab of rows at a time.

    Args:
        outputs: (K, d, h, w) logits / probabilities at the target spacing (shape_after_resample).
        properties: the case's properties from `preprocess_case`.
        max_values: bound on the values (channels x voxels) of the tensors one slab creates (`footprint`).

    `slabs()` lists the row ranges of the crop box; `restore(rows)` gives (K, rows, H, W) on the outputs' device.
    """

    def __init__(self, outputs: torch.Tensor, properties: dict[str, Any], max_values: int = DEFAULT_RESTORE_VALUES):
        self.outputs = outputs if outputs.is_floating_point() else outputs.float()
        self.crop_shape = tuple(int(s) for s in properties["shape_after_crop"])
        in_shape = tuple(int(s) for s in self.outputs.shape[1:])
        axis = None
        if in_shape != self.crop_shape:  # the separate axis from the target spacing back to the case's
            axis = separate_axis(properties["target_spacing"], properties["original_spacing"])
        self.axes = [_Axis(i, o, a == axis, self.outputs.device, self.outputs.dtype)
                     for a, (i, o) in enumerate(zip(in_shape, self.crop_shape))]
        self.rows = self.slab_rows(max_values)

    @property
    def device(self) -> torch.device:
        return self.outputs.device

    def to(self, device: torch.device | str) -> "RestoreSlabs":
        """Move the outputs (and the index tables) to `device`, e.g. the host after a CUDA out-of-memory error."""
        self.outputs = self.outputs.to(device)
        for axis in self.axes:
            axis.to(self.outputs.device, self.outputs.dtype)
        return self

    def footprint(self, rows: int) -> int:
        """Values held at once while a slab of `rows` rows is restored and consumed (an upper bound): each step
        keeps its input and two gathered outputs; the consumer its slab, the activated slab and the labels."""
        channels = int(self.outputs.shape[0])
        d_in, h_in, w_in = (int(s) for s in self.outputs.shape[1:])
        _, h_out, w_out = self.crop_shape
        after_rows, after_h, after_w = (channels * rows * h_in * w_in, channels * rows * h_out * w_in,
                                        channels * rows * h_out * w_out)
        steps = (2 * after_rows, after_rows + 2 * after_h, after_h + 2 * after_w,
                 2 * after_w + 2 * rows * h_out * w_out)
        tables = 4 * sum(self.crop_shape)  # indices and weights per axis
        return max(steps) + tables

    def slab_rows(self, max_values: int) -> int:
        """The most rows whose footprint stays within `max_values` (at least 1 row)."""
        low, high = 1, max(1, self.crop_shape[0])
        while low < high:  # the largest fitting row count; the footprint grows with the rows
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.footprint(middle) <= max_values else (low, middle - 1)
        return low

    def slabs(self) -> list[slice]:
        """Row ranges of the crop box, `self.rows` rows each (the last may be shorter)."""
        return [slice(start, min(start + self.rows, self.crop_shape[0]))
                for start in range(0, self.crop_shape[0], self.rows)]

    def restore(self, rows: slice) -> torch.Tensor:
        """(K, len(rows), H, W): the crop box's rows `rows`, resampled from the outputs."""
        x = self.axes[0].apply(self.outputs, 1, rows)
        x = self.axes[1].apply(x, 2)
        return self.axes[2].apply(x, 3)


def restore_in_slabs(outputs: torch.Tensor, properties: dict[str, Any], consume: Callable[[slice, torch.Tensor], None],
                     max_values: int = DEFAULT_RESTORE_VALUES) -> None:
    """`consume(rows, restored)` for every slab of rows of the crop box (`RestoreSlabs`), in order.

    On a CUDA out-of-memory error the outputs move to the host and the slab is done again there with the rest
    (one line on stderr says so); `consume` must therefore not keep a partial result of a failed slab.
    """
    slabs = RestoreSlabs(outputs, properties, max_values)
    for rows in slabs.slabs():
        try:
            consume(rows, slabs.restore(rows))
            continue
        except torch.cuda.OutOfMemoryError:
            if slabs.device.type == "cpu":
                raise
        # outside the except block: the failed slab's tensors, held by the traceback, are freed first
        torch.cuda.empty_cache()
        name = properties.get("name") or ""
        print(f"{f'case {name!r}: ' if name else ''}out of GPU memory restoring the prediction to the original "
              "grid; finishing it on the CPU (slower)", file=sys.stderr, flush=True)
        slabs.to("cpu")
        consume(rows, slabs.restore(rows))


def crop_box(properties: dict[str, Any]) -> tuple[slice, ...]:
    """The crop box of the original grid as slices (D, H, W)."""
    return tuple(slice(int(a), int(b)) for a, b in properties["crop_bbox"])


def paste_rows(target: np.ndarray, box: Sequence[slice], rows: slice, values: np.ndarray) -> None:
    """Write `values` (..., rows, H, W) into the crop box rows `rows` of `target` (..., D, H, W)."""
    start = box[0].start + rows.start
    target[(..., slice(start, start + values.shape[-3]), box[1], box[2])] = values
