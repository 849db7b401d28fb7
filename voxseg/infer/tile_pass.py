"""One sliding-window pass: tiles through the models (mirrors x folds, batched), their weighted logits summed in a
band of rows that moves down the image, finished rows handed on; and the out-of-memory fallbacks of a pass.

`voxseg.infer.sliding_window.sliding_window_inference` prepares a `TilePass` (padded image, tile starts,
weights, mirrors) and calls `accumulate_with_fallback` with where finished rows go (`CroppedRows` around the
caller's consumer, or `Collected` for the whole result).

The band: tiles run in order of their first coordinate (`tile_positions` lists them so). Every tile starting at
row z covers rows [z, z + patch depth), and no later tile starts above z, so when the tiles of the next start z'
come, rows [z, z') are final. The band holds (K, patch depth, *S[1:]) sums and the summed weights; finished rows
are divided by their weights and handed over (a view of the band, valid during the call), the band moves down by
z' - z; it is a ring (`Band`), so moving copies nothing. Each voxel's sum takes the same tiles in the same order
as one accumulator over the whole image would.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from voxseg.errors import DeviceMemoryError

ModelLike = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]
RowConsumer = Callable[[slice, torch.Tensor], None]  # (rows of the first spatial axis, (K, len(rows), ...) logits)

__all__ = ["Collected", "CroppedRows", "OutOfMemoryFallback", "TilePass", "accumulate_with_fallback"]


class Collected:
    """A consumer that keeps every row: the whole (K, *S) logits, on `device`, or on the host when the first rows
    come from the host (the accumulator fell back there) or `device` has no room for them."""

    def __init__(self, num_outputs: int, spatial: Sequence[int], device: torch.device) -> None:
        self.shape, self.device = (num_outputs, *spatial), device
        self.logits: torch.Tensor | None = None

    def __call__(self, rows: slice, values: torch.Tensor) -> None:
        if self.logits is None:
            device = torch.device("cpu") if values.device.type == "cpu" else self.device
            try:
                self.logits = torch.empty(self.shape, dtype=torch.float32, device=device)
            except torch.cuda.OutOfMemoryError:
                self.logits = None
            if self.logits is None:  # outside the except block
                _free_cached_memory()
                self.logits = torch.empty(self.shape, dtype=torch.float32)
        self.logits[:, rows] = values.to(self.logits.device)


class CroppedRows:
    """Hands rows of the padded image to `consume` as rows of the image (padding removed), each row once:
    rows handed over before a pass started again (out of memory) are not handed over again."""

    def __init__(self, crop: tuple[slice, ...], consume: RowConsumer) -> None:
        self.crop, self.consume, self.handed = crop, consume, 0

    def __call__(self, rows: slice, values: torch.Tensor) -> None:
        first = self.crop[0].start
        start = max(rows.start, first + self.handed)
        stop = min(rows.stop, self.crop[0].stop)
        if start >= stop:
            return
        part = values[(slice(None), slice(start - rows.start, stop - rows.start)) + self.crop[1:]]
        self.consume(slice(start - first, stop - first), part)
        self.handed = stop - first


class OutOfMemoryFallback:
    """How far a sliding-window pass had to back off after CUDA out-of-memory errors, and the one report of it.

    A forward that runs out is retried with a smaller forward batch (tiles x mirrored copies): half the tiles,
    down to 1 (`tile_batch`), then half the mirrored copies, down to 1 (`mirror_group`). When that is not
    enough, or the accumulator itself does not fit, the pass starts again with the accumulator in host memory
    (`host_accumulator`); only then `error()` names the case and what to try. The result does not depend on
    the fallback taken: the same tiles are summed in the same order. `report()` writes one line on stderr.
    """

    def __init__(self, tile_batch: int, num_mirrors: int, case_name: str = "",
                 mirror_group: int | None = None) -> None:
        self.requested_tile_batch = tile_batch
        self.tile_batch = tile_batch
        self.requested_mirror_group = num_mirrors if mirror_group is None else mirror_group
        self.mirror_group = self.requested_mirror_group
        self.num_mirrors = num_mirrors
        self.host_accumulator = False
        self.case_name = case_name

    def shrink(self) -> bool:
        """Halve the tiles per forward, else the mirrored copies per forward; False when both are at 1."""
        if self.tile_batch > 1:
            self.tile_batch = max(1, self.tile_batch // 2)
        elif self.mirror_group > 1:
            self.mirror_group = max(1, self.mirror_group // 2)
        else:
            return False
        return True

    def taken(self) -> list[str]:
        """The fallbacks taken, in words (empty when none)."""
        steps = []
        if self.tile_batch != self.requested_tile_batch:
            steps.append(f"{self.tile_batch} tile(s) per forward pass instead of {self.requested_tile_batch}")
        if self.mirror_group != self.requested_mirror_group:
            steps.append(f"{self.mirror_group} of the {self.num_mirrors} mirrored copies per forward pass")
        if self.host_accumulator:
            steps.append("the accumulator in host memory")
        return steps

    def report(self) -> None:
        """One line on stderr when a fallback was taken."""
        steps = self.taken()
        if steps:
            hint = (f"--tile-batch {self.tile_batch}" if self.mirror_group == self.num_mirrors else
                    "--tile-batch 1 and fewer --mirror-axes")
            print(f"{self._case()}out of GPU memory; finished with {' and '.join(steps)} (slower; {hint} "
                  "avoids the retries)", file=sys.stderr, flush=True)

    def error(self) -> DeviceMemoryError:
        return DeviceMemoryError(
            f"{self._case()}out of GPU memory even with 1 tile and 1 mirrored copy per forward pass and the "
            f"accumulator in host memory (asked: --tile-batch {self.requested_tile_batch}); predict on the CPU "
            "(--device cpu), free the GPU memory other processes hold, or use a GPU with more memory")

    def _case(self) -> str:
        return f"case '{self.case_name}': " if self.case_name else ""


@dataclass
class TilePass:
    """One sliding-window pass over a padded image: what every group of tiles reads."""

    models: list[ModelLike]
    image: torch.Tensor  # (1, C, *S) padded to at least the patch
    positions: list[tuple[int, ...]]  # start of every tile
    patch_size: tuple[int, ...]
    num_outputs: int
    mirrors: list[tuple[int, ...]]  # every combination of mirrored axes, () first
    weight: torch.Tensor  # (*P) blending weights on the compute device
    amp_dtype: torch.dtype | None
    fallback: OutOfMemoryFallback  # the forward batch, shrunk after out-of-memory errors


def accumulate_with_fallback(acc_device: torch.device, tile_pass: TilePass, emit: RowConsumer) -> None:
    """Accumulate on `acc_device`; when CUDA runs out of memory beyond what smaller forward batches solve,
    again with the accumulator on the host; DeviceMemoryError when even that runs out."""
    fallback = tile_pass.fallback
    for device in (acc_device,) if acc_device.type == "cpu" else (acc_device, torch.device("cpu")):
        fallback.host_accumulator = device.type == "cpu" and acc_device.type != "cpu"
        try:
            return _accumulate_tiles(tile_pass, device, emit)
        except torch.cuda.OutOfMemoryError:
            pass  # retried outside the except block, so the failed attempt's tensors (held by the traceback) go
        _free_cached_memory()
    raise fallback.error()


def _free_cached_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _row_groups(positions: list[tuple[int, ...]]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The tile starts grouped by their first coordinate, in increasing order of it."""
    groups: dict[int, list[tuple[int, ...]]] = {}
    for start in positions:
        groups.setdefault(int(start[0]), []).append(start)
    return sorted(groups.items())


class Band:
    """The running sums of the image rows [top, top + depth): (K, depth, *S[1:]) weighted logits and (depth,
    *S[1:]) weights, kept as a ring (image row r in band row r % depth), so moving down copies nothing."""

    def __init__(self, num_outputs: int, depth: int, plane: Sequence[int], device: torch.device) -> None:
        self.sums = torch.zeros((num_outputs, depth, *plane), dtype=torch.float32, device=device)
        self.weights = torch.zeros((depth, *plane), dtype=torch.float32, device=device)
        self.depth, self.top = depth, 0

    def _pieces(self, row: int, count: int) -> list[tuple[slice, slice]]:
        """(band rows, offset rows) of image rows [row, row + count): one or two pieces (the ring wraps)."""
        first = row % self.depth
        head = min(count, self.depth - first)
        pieces = [(slice(first, first + head), slice(0, head))]
        if head < count:
            pieces.append((slice(0, count - head), slice(head, count)))
        return pieces

    def add(self, rest: tuple[slice, ...], values: torch.Tensor, weight: torch.Tensor) -> None:
        """Add a tile starting at row `top`: `values` (K, depth, ...) and `weight` (depth, ...) at `rest`, the
        tile's place along the other axes."""
        for band_rows, tile_rows in self._pieces(self.top, self.depth):
            self.sums[(slice(None), band_rows) + rest] += values[:, tile_rows]
            self.weights[(band_rows,) + rest] += weight[tile_rows]

    def finish(self, count: int, emit: RowConsumer) -> None:
        """Rows [top, top + count) are final: divide them by their weights (in place), hand each piece to
        `emit(image rows, (K, rows, ...))` (a view, valid during the call), clear them and move down."""
        for band_rows, offset in self._pieces(self.top, count):
            finished = self.sums[:, band_rows]
            finished /= self.weights[band_rows]
            emit(slice(self.top + offset.start, self.top + offset.stop), finished)
            finished.zero_()
            self.weights[band_rows] = 0
        self.top += count


def _accumulate_tiles(tile_pass: TilePass, acc_device: torch.device, emit: RowConsumer) -> None:
    """Sum weighted tile logits in a `Band` as deep as the patch, moving down the (padded) image; hand every
    finished row, divided by its summed weights, to `emit(rows, (K, len(rows), *S[1:]))`."""
    spatial = tuple(tile_pass.image.shape[2:])
    band = Band(tile_pass.num_outputs, tile_pass.patch_size[0], spatial[1:], acc_device)
    weight_on_acc = tile_pass.weight.to(acc_device, torch.float32)
    # no_grad rather than inference_mode: callers may modify the logits handed over in place
    with torch.no_grad():
        for row, group in _row_groups(tile_pass.positions):
            if row > band.top:  # no later tile starts above `row`: the rows before it are final
                band.finish(row - band.top, emit)
            first = 0
            while first < len(group):
                starts = group[first : first + tile_pass.fallback.tile_batch]
                slices = [tuple(slice(s, s + p) for s, p in zip(start, tile_pass.patch_size)) for start in starts]
                out = _weighted_tiles(tile_pass, slices)
                if out is None:  # out of memory: the same tiles again with a smaller forward batch
                    _free_cached_memory()
                    continue
                # the only device->host copy of the loop, and only when the accumulator lives on the host
                out = out.to(acc_device)
                for i, sl in enumerate(slices):
                    band.add(sl[1:], out[i], weight_on_acc)
                first += len(slices)
        band.finish(spatial[0] - band.top, emit)


def _weighted_tiles(tile_pass: TilePass, slices: list[tuple[slice, ...]]) -> torch.Tensor | None:
    """Weighted mean logits (n, K, *P) of the tiles at `slices`; None after an out-of-memory error that a
    smaller forward batch may avoid (the pass's fallback has shrunk it); the error itself when nothing is left
    to shrink."""
    fallback = tile_pass.fallback
    try:
        tiles = torch.stack([tile_pass.image[0][(slice(None),) + sl] for sl in slices])  # (n, C, *P)
        mean = _predict_tiles(tile_pass.models, tiles, tile_pass.mirrors, tile_pass.num_outputs, tile_pass.amp_dtype,
                              fallback.mirror_group)
        return mean.mul_(tile_pass.weight)
    except torch.cuda.OutOfMemoryError:
        if not fallback.shrink():
            raise
    return None


def _predict_tiles(
    models: list[ModelLike],
    tiles: torch.Tensor,
    mirrors: list[tuple[int, ...]],
    num_outputs: int,
    amp_dtype: torch.dtype | None,
    mirror_group: int | None = None,
) -> torch.Tensor:
    """Mean logits (n, K, *P) over mirror combinations and models for a batch of tiles (n, C, *P).

    The mirrored copies of the tiles go through each model `mirror_group` combinations at a time (default all
    in one batch); the sum runs over models, then combinations, in the same order whatever the grouping.
    """
    n = tiles.shape[0]
    group = len(mirrors) if mirror_group is None else max(1, int(mirror_group))
    total = None
    with torch.autocast(device_type=tiles.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for model in models:
            for first in range(0, len(mirrors), group):
                combos = mirrors[first : first + group]
                # every mirrored copy of the group in one batch: (n * len(combos), C, *P)
                batch = torch.cat([tiles.flip([a + 2 for a in combo]) if combo else tiles for combo in combos])
                out = model(batch)
                out = out[0] if isinstance(out, (list, tuple)) else out
                if out.shape[0] != batch.shape[0] or out.shape[1] != num_outputs or out.shape[2:] != batch.shape[2:]:
                    raise ValueError(
                        f"model output {tuple(out.shape)} does not match the expected "
                        f"({batch.shape[0]}, {num_outputs}, {', '.join(map(str, batch.shape[2:]))})"
                    )
                out = out.float()
                for j, combo in enumerate(combos):
                    chunk = out[j * n : (j + 1) * n]
                    chunk = chunk.flip([a + 2 for a in combo]) if combo else chunk
                    # summed in place, in the same order: a K x tile copy less per mirrored copy
                    if total is None:  # a view of `out` only when it holds nothing else
                        total = chunk if chunk.shape[0] == out.shape[0] else chunk.clone()
                    else:
                        total.add_(chunk)
    assert total is not None
    return total.div_(len(models) * len(mirrors))
