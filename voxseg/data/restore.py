"""Network outputs back onto a case's original grid in slabs, so that memory stays bounded.

`restore_to_original` resamples the whole (K, d, h, w) output to the crop box at once, then activates it and
pastes it into the full grid: three K x original-grid float32 tensors. For a CT case (512 x 512 x 300 voxels,
41 classes) that is 3 x 41 x 78.6 M x 4 bytes ~= 39 GB, more than most GPUs have. `RestoreSlabs` computes the
same resampling one slab of rows (along the first axis) of the crop box at a time; the caller activates each
slab, takes its labels and copies it to the host, so the device never holds more than `max_values` values
(channels x voxels) of slab tensors at once. `DEFAULT_RESTORE_VALUES` (2^28 values, 1 GiB of float32) gives the
CT case above slabs of 8 rows on a GPU; a CPU gains nothing from large slabs and takes
`DEFAULT_RESTORE_VALUES_CPU` (2^26, 256 MiB). `StreamingRestore` does the same from rows that arrive in order
(the sliding window's finished rows), so that the whole outputs never exist either.

The resampling is nnU-Net's rule for network outputs (`voxseg.data.resample`): linear, voxel centres of the new
grid at `(i + 0.5) * in / out - 0.5` (edges clamped), a separate coarse axis taken with nearest values. The
first axis (the rows) is computed by gathering the two neighbouring rows and weighing them (weights from
float64), so every output row comes from the same operations whatever the slab size; the two other axes of
each slab go through PyTorch's bilinear kernel at once (whole planes: independent of the slab too, and several
times faster than two gathers). The result does not depend on `max_values` and equals trilinear `F.interpolate`
(what `restore_to_original` uses) to float32 rounding (~1e-6).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from voxseg.data.resample import separate_axis
from voxseg.data.spline import nearest_indices

__all__ = ["DEFAULT_RESTORE_VALUES", "DEFAULT_RESTORE_VALUES_CPU", "RestoreSlabs", "StreamingRestore",
           "default_restore_values", "linear_weights", "restore_in_slabs"]

DEFAULT_RESTORE_VALUES = 1 << 28
"""Values (channels x voxels) of slab tensors a restore holds at once: 2^28 float32 = 1 GiB of device memory."""
DEFAULT_RESTORE_VALUES_CPU = 1 << 26
"""The same on a CPU (256 MiB): slabs of a few rows are as fast there, and host memory is what a case is
budgeted on (`voxseg.infer.budget`)."""


def default_restore_values(device: torch.device | str) -> int:
    """DEFAULT_RESTORE_VALUES on a GPU, DEFAULT_RESTORE_VALUES_CPU on a CPU."""
    return DEFAULT_RESTORE_VALUES_CPU if torch.device(device).type == "cpu" else DEFAULT_RESTORE_VALUES


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

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """For every output index, its first source index and one past its last."""
        if self.kind == "same":
            first = np.arange(self.out_size)
            return first, first + 1
        if self.kind == "nearest":
            index = np.asarray(nearest_indices(self.in_size, self.out_size), dtype=np.int64)
            return index, index + 1
        low, high, _ = linear_weights(self.in_size, self.out_size)
        return low, high + 1

    def apply(self, x: torch.Tensor, dim: int, rows: slice = slice(None), origin: int = 0) -> torch.Tensor:
        """Resample dimension `dim` of x to the output indices `rows` of this axis; x holds the source indices
        from `origin` on along `dim`."""
        if self.kind == "same":
            return x.narrow(dim, (rows.start or 0) - origin, len(range(*rows.indices(self.out_size))))
        if self.kind == "nearest":
            return x.index_select(dim, self.index[rows] - origin)
        shape = [1] * x.ndim
        shape[dim] = -1
        low = x.index_select(dim, self.low[rows] - origin).mul_(self.weight_low[rows].view(shape))
        return low.add_(x.index_select(dim, self.high[rows] - origin).mul_(self.weight_high[rows].view(shape)))


class RestoreSlabs:
    """The crop box of a case's original grid, restored from (K, d, h, w) outputs one slab of rows at a time.

    Args:
        outputs: (K, d, h, w) logits / probabilities at the target spacing (shape_after_resample), or, for a
            stream (`StreamingRestore`), the rows of them received so far that are still needed (`origin` is
            the first one's index; `in_rows` the whole depth d).
        properties: the case's properties from `preprocess_case`.
        max_values: bound on the values (channels x voxels) of the tensors one slab creates (`footprint`).

    `slabs()` lists the row ranges of the crop box; `restore(rows)` gives (K, rows, H, W) on the outputs' device.
    """

    def __init__(self, outputs: torch.Tensor, properties: dict[str, Any], max_values: int = DEFAULT_RESTORE_VALUES,
                 in_rows: int | None = None):
        self.outputs = outputs if outputs.is_floating_point() else outputs.float()
        self.origin = 0  # the index (along the first axis of the target grid) of the first row of `outputs`
        self.crop_shape = tuple(int(s) for s in properties["shape_after_crop"])
        in_shape = (int(self.outputs.shape[1]) if in_rows is None else int(in_rows),
                    *(int(s) for s in self.outputs.shape[2:]))
        self.in_shape = in_shape
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
        """Values held at once while a slab of `rows` rows is restored and consumed (an upper bound): the rows'
        sources (a copy when they span two pieces of a stream), the two gathered rows of the first axis, the
        in-plane resampling's input and output (and a nearest axis's copy); the consumer its slab, the
        activated slab and the labels."""
        channels = int(self.outputs.shape[0])
        _, h_in, w_in = self.in_shape
        d_in = self.in_shape[0]
        _, h_out, w_out = self.crop_shape
        sources = channels * (rows * d_in // max(self.crop_shape[0], 1) + 2) * h_in * w_in
        after_rows, after_w = channels * rows * h_in * w_in, channels * rows * h_out * w_out
        steps = (sources + 2 * after_rows, 2 * after_rows + after_w, 2 * after_w + 2 * rows * h_out * w_out)
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

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """For every row of the crop box, the first and one past the last row of the outputs it is computed from
        (both never decrease from one row to the next)."""
        return self.axes[0].sources()

    def restore(self, rows: slice) -> torch.Tensor:
        """(K, len(rows), H, W): the crop box's rows `rows`, resampled from the outputs."""
        x = self.axes[0].apply(self.outputs, 1, rows, self.origin)
        return _in_plane(x, self.axes[1], self.axes[2])


def _in_plane(x: torch.Tensor, rows_axis: _Axis, columns_axis: _Axis) -> torch.Tensor:
    """(K, r, h, w) -> (K, r, H, W): a nearest (separate) axis by its indices, then both axes linearly at once
    with PyTorch's bilinear kernel (the same align_corners=False rule as `linear_weights`, weights in float32;
    an axis whose size is kept is copied exactly), or nothing when neither is linear."""
    if rows_axis.kind == "nearest":
        x = rows_axis.apply(x, 2)
    if columns_axis.kind == "nearest":
        x = columns_axis.apply(x, 3)
    if "linear" in (rows_axis.kind, columns_axis.kind):
        x = F.interpolate(x, size=(rows_axis.out_size, columns_axis.out_size), mode="bilinear", align_corners=False)
    return x


def _report_host_fallback(properties: dict[str, Any]) -> None:
    torch.cuda.empty_cache()
    name = properties.get("name") or ""
    print(f"{f'case {name!r}: ' if name else ''}out of GPU memory restoring the prediction to the original "
          "grid; finishing it on the CPU (slower)", file=sys.stderr, flush=True)


def restore_in_slabs(outputs: torch.Tensor, properties: dict[str, Any], consume: Callable[[slice, torch.Tensor], None],
                     max_values: int = DEFAULT_RESTORE_VALUES) -> None:
    """`consume(rows, restored)` for every slab of rows of the crop box (`RestoreSlabs`), in order.

    On a CUDA out-of-memory error the outputs move to the host and the slab is done again there with the rest
    (one line on stderr says so); `consume` must therefore not keep a partial result of a failed slab.
    """
    slabs = RestoreSlabs(outputs, properties, max_values)
    for rows in slabs.slabs():
        _restore_slab(slabs, rows, consume, properties)


def _restore_slab(slabs: RestoreSlabs, rows: slice, consume: Callable[[slice, torch.Tensor], None],
                  properties: dict[str, Any]) -> None:
    try:
        consume(rows, slabs.restore(rows))
        return
    except torch.cuda.OutOfMemoryError:
        if slabs.device.type == "cpu":
            raise
    # outside the except block: the failed slab's tensors, held by the traceback, are freed first
    _report_host_fallback(properties)
    slabs.to("cpu")
    consume(rows, slabs.restore(rows))


class StreamingRestore:
    """Restores the crop box from rows of the outputs that arrive in order (a sliding window hands over the rows
    it has finished, `feed`), so that the whole (K, d, h, w) outputs never exist at once.

    Each slab of crop-box rows is restored and handed to `consume(rows, restored)` (as `restore_in_slabs` does,
    same slabs, same values) as soon as every output row it reads has arrived. The rows given to `feed` are
    read during the call only (they may be a view of a buffer the caller reuses); the few that later slabs still
    read (an interpolation's next row) are copied and kept. A slab whose sources span two feeds is read from a
    copy of just those rows.

        restorer = StreamingRestore(properties, num_channels=K, consume=sink, device=logits_device)
        for rows, values in finished_rows:      # (K, len(rows), h, w), rows in order from 0
            restorer.feed(rows, values)
        restorer.finish()                       # every row received and every slab consumed, or an error
    """

    def __init__(self, properties: dict[str, Any], num_channels: int, consume: Callable[[slice, torch.Tensor], None],
                 max_values: int = DEFAULT_RESTORE_VALUES, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        in_shape = [int(s) for s in properties["shape_after_resample"]]
        self.kept = torch.empty((num_channels, 0, *in_shape[1:]), dtype=dtype, device=device)
        self.slabs = RestoreSlabs(self.kept, properties, max_values, in_rows=in_shape[0])
        self.properties, self.consume = properties, consume
        self.first_source, self.source_stop = self.slabs.sources()
        self.kept_from = 0  # the output row of `kept`'s first row
        self.received = 0  # rows of the outputs received so far
        self.done = 0  # rows of the crop box consumed so far

    def feed(self, rows: slice, values: torch.Tensor) -> None:
        """Receive the outputs' rows `rows` ((K, len(rows), h, w)), which must follow the rows received before."""
        if rows.start != self.received or values.shape[1] != rows.stop - rows.start:
            raise ValueError(f"rows {rows.start}..{rows.stop} received after {self.received}: they must come in order")
        if values.dtype != self.kept.dtype:
            values = values.to(self.kept.dtype)
        self.received = rows.stop
        pieces = [(self.kept_from, self.kept), (rows.start, values)]
        total = self.slabs.crop_shape[0]
        ready = int(np.searchsorted(self.source_stop, self.received, side="right"))  # rows whose sources arrived
        while self.done < ready:
            out_rows = slice(self.done, min(self.done + self.slabs.rows, ready))
            first = int(self.first_source[out_rows.start])
            self.slabs.outputs = _rows_of(pieces, first, int(self.source_stop[out_rows.stop - 1]), self.slabs.device)
            self.slabs.origin = first
            _restore_slab(self.slabs, out_rows, self.consume, self.properties)
            self.done = out_rows.stop
        keep_from = int(self.first_source[self.done]) if self.done < total else self.received
        self.kept = _rows_of(pieces, keep_from, self.received, self.slabs.device).clone()  # owned, not a view
        self.kept_from = keep_from
        self.slabs.outputs = self.kept  # nothing of `values` is held after the call

    def finish(self) -> None:
        """Check that every row arrived and every slab was consumed."""
        if self.received != self.slabs.in_shape[0] or self.done != self.slabs.crop_shape[0]:
            raise RuntimeError(f"restore of case '{self.properties.get('name', '')}' incomplete: {self.received} of "
                               f"{self.slabs.in_shape[0]} rows received, {self.done} of {self.slabs.crop_shape[0]} "
                               "restored")


def _rows_of(pieces: list[tuple[int, torch.Tensor]], start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of the outputs from `pieces` ((first row, (K, rows, h, w)) in order, adjacent): a view
    when one piece holds them, else a copy of just those rows; on `device`."""
    parts = []
    for first, tensor in pieces:
        low, high = max(start, first), min(stop, first + int(tensor.shape[1]))
        if low < high:
            parts.append(tensor[:, low - first : high - first])
    if not parts:
        return pieces[-1][1][:, :0].to(device)
    joined = parts[0] if len(parts) == 1 else torch.cat([part.to(device) for part in parts], 1)
    return joined.to(device)


def crop_box(properties: dict[str, Any]) -> tuple[slice, ...]:
    """The crop box of the original grid as slices (D, H, W)."""
    return tuple(slice(int(a), int(b)) for a, b in properties["crop_bbox"])


def paste_rows(target: np.ndarray, box: Sequence[slice], rows: slice, values: np.ndarray) -> None:
    """Write `values` (..., rows, H, W) into the crop box rows `rows` of `target` (..., D, H, W)."""
    start = box[0].start + rows.start
    target[(..., slice(start, start + values.shape[-3]), box[1], box[2])] = values
