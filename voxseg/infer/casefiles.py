"""The files side of `Predictor.predict_files`: this torchrun rank's share of the cases, the failure of one
case in the report, and the writers of a case's probabilities: `save_probabilities` for an array in memory
(full validation, ensembles), `ProbabilityFile` for probabilities that arrive slab by slab and go to disk as
they come (prediction: K x the original grid is never held in memory)."""
from __future__ import annotations

import io
import os
import shutil
import sys
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from voxseg.atomicio import atomic_open, temporary_path
from voxseg.data.io import Geometry
from voxseg.distributed import env_world, shard_balanced
from voxseg.errors import VoxsegError

__all__ = ["CaseImage", "ProbabilityFile", "case_failure_reason", "collect_write", "my_share", "save_probabilities"]


class CaseImage:
    """A case's (C, D, H, W) image and its geometry, handed over to the predictor, which lets go of the image
    once it is preprocessed (`take_image`): a CT case's float32 image is not kept through its prediction."""

    def __init__(self, image: np.ndarray, geometry: Geometry) -> None:
        self.image: np.ndarray | None = image
        self.geometry = geometry

    def take_image(self) -> np.ndarray:
        image, self.image = self.image, None
        if image is None:
            raise RuntimeError("the case's image was already taken")
        return image



def my_share(cases: Sequence[tuple[str, Sequence[str | Path]]]) -> list[tuple[str, Sequence[str | Path]]]:
    """This torchrun rank's cases, balanced by the size of their input files (all cases for one process)."""
    rank, size, _ = env_world()
    if size == 1:
        return list(cases)
    # a channel is a file, or a DICOM series (`voxseg.infer.dicom_cases`) whose files count
    paths = [[Path(f) for entry in files for f in getattr(entry, "files", [entry])] for _, files in cases]
    sizes = [sum(path.stat().st_size for path in case_paths if path.is_file()) for case_paths in paths]
    mine = shard_balanced(list(cases), sizes, rank, size)
    print(f"rank {rank}/{size}: predicting {len(mine)} of {len(cases)} cases", file=sys.stderr, flush=True)
    return mine


def case_failure_reason(name: str, exc: Exception) -> str:
    """The error message without a leading "case NAME:", which the failure list already shows."""
    message = str(exc)
    for prefix in (f"case '{name}': ", f"case {name}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def collect_write(item: tuple[str, Future], failures: list[tuple[str, str]]) -> int:
    """1 when the write of a case finished, else 0 with (name, reason) appended to `failures`."""
    name, future = item
    try:
        future.result()
        return 1
    except (VoxsegError, OSError) as exc:
        failures.append((name, f"could not write the prediction ({exc})"))
        return 0


def save_probabilities(path: Path, probabilities: np.ndarray, class_names: Sequence[str]) -> None:
    """NAME.npz with "probabilities" (K, D, H, W) float16 and "class_names", written atomically."""
    with atomic_open(path) as handle:
        np.savez_compressed(handle, probabilities=probabilities.astype(np.float16), class_names=np.array(class_names))


class ProbabilityFile:
    """A case's probabilities written to disk slab by slab, then packed as NAME.npz: the same file as
    `save_probabilities` writes ("probabilities" (K, D, H, W) float16 and "class_names", deflated), without ever
    holding K x the original grid in memory.

    The float16 values go into a hidden .npy next to the target as they arrive (`paste`: one write per channel
    per slab, at its offset); `commit` deflates that file into the .npz in chunks and renames it into place
    (atomic), `discard` removes it. Outside the crop box the file holds the background: probability 1 for
    channel 0 of a softmax model, 0 everywhere else (regions).

        sink = ProbabilityFile(out / "case.npz", num_channels=K, shape=(D, H, W), class_names=names,
                               background_channel=True)
        grid = OriginalGrid(plan, properties, probability_sink=sink)   # pastes each restored slab into it
        ...
        sink.commit()
    """

    def __init__(self, path: Path, num_channels: int, shape: tuple[int, int, int], class_names: Sequence[str],
                 background_channel: bool) -> None:
        self.path, self.class_names = Path(path), list(class_names)
        self.channels, self.shape = int(num_channels), tuple(int(s) for s in shape)
        self.background_channel = background_channel
        self.raw = temporary_path(self.path.with_suffix(".npy"))  # swept by the next run if this one is killed
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                     "shape": (self.channels, *self.shape)})
        self.offset = len(header.getvalue())
        self.plane_values = self.shape[1] * self.shape[2]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.raw, "w+b")
        try:
            self.handle.write(header.getvalue())
            self.handle.truncate(self.offset + 2 * self.channels * self.shape[0] * self.plane_values)  # zeros
            if background_channel:  # channel 0 is 1 wherever no slab is pasted: every row outside the crop box
                ones = np.ones(self.plane_values, dtype=np.float16).tobytes()
                for row in range(self.shape[0]):
                    os.pwrite(self.handle.fileno(), ones, self._at(0, row))
        except BaseException:
            self.discard()
            raise

    def _at(self, channel: int, row: int) -> int:
        return self.offset + 2 * (channel * self.shape[0] + row) * self.plane_values

    def paste(self, rows: slice, box: Sequence[slice], values: torch.Tensor) -> None:
        """Write (K, len(rows), h, w) probabilities of the crop box `box`'s rows `rows` (rows of the box)."""
        first = box[0].start + rows.start
        count = int(values.shape[1])
        planes = np.zeros((count, *self.shape[1:]), dtype=np.float16)
        for channel in range(self.channels):
            if self.background_channel:
                planes.fill(1.0 if channel == 0 else 0.0)
            planes[:, box[1], box[2]] = values[channel].to(torch.float16).cpu().numpy()
            os.pwrite(self.handle.fileno(), planes.tobytes(), self._at(channel, first))

    def commit(self) -> None:
        """Pack the values into NAME.npz (deflated, as np.savez_compressed) and remove the raw file."""
        try:
            self.handle.flush()
            self.handle.seek(0)
            with atomic_open(self.path) as target, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
                with archive.open("probabilities.npy", "w", force_zip64=True) as member:
                    shutil.copyfileobj(self.handle, member, 1 << 24)
                names = io.BytesIO()
                np.save(names, np.array(self.class_names))
                archive.writestr("class_names.npy", names.getvalue())
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the raw file (nothing is written to NAME.npz)."""
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()
        self.raw.unlink(missing_ok=True)
