"""Builders of bad inputs for tests/test_bad_input_matrix.py: copies of a good dataset, model or archive with
one thing wrong, and `run`, the CLI in process with its exit code and output."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from voxseg.cli import main
from voxseg.data.io import Geometry, read_image, write_image


@dataclass
class World:
    root: Path
    dataset: Path  # a good raw dataset (synth), 4 channels
    work: Path  # a planned (not preprocessed) work dir of it
    model: Path  # a model folder with fold 0 (untrained weights) for the same channels and labels
    archive: Path  # that model exported as an archive



def run(argv: list) -> tuple[int, str, str]:
    """main() in process; an exception escaping it is a traceback the user would see."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - reported as the traceback a user would get
            code = 1
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


# ----- building bad inputs -----------------------------------------------------------------------------------
def copy_dataset(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.dataset, tmp / "ds"))


def first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


def rewrite(path: Path, change: Callable[[np.ndarray, Geometry], tuple[np.ndarray, Geometry]]) -> Path:
    if getattr(change, "whole_file", False):
        change(path)
        return path
    array, geometry = read_image(path)
    write_image(path, *change(array, geometry))
    return path


def affine(geometry: Geometry, edit: Callable[[np.ndarray], None]) -> Geometry:
    affine = geometry.affine.copy()
    edit(affine)
    return Geometry(affine)


def flip(a, g):
    return a, affine(g, lambda m: m.__setitem__((slice(0, 3), 2), -m[:3, 2]))


def shift(a, g):
    return a, affine(g, lambda m: m.__setitem__((0, 3), m[0, 3] + 25.0))


def spacing(value: float):
    return lambda a, g: (a, Geometry.from_spacing((value, value, value)))


def zero_spacing(path: Path) -> None:
    """A NIfTI file whose affine has a zero column (nibabel cannot write one through the usual header update)."""
    import nibabel as nib

    image = nib.load(str(path))
    affine = image.affine.copy()
    affine[:3, 1] = 0.0
    header = image.header.copy()
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header=header), str(path))


zero_spacing.whole_file = True  # type: ignore[attr-defined]


def nan(a, g):
    a = a.astype(np.float32)
    a[2, 3, 4] = np.nan
    return a, g


def value(value: float, dtype=np.float32):
    def change(a, g):
        a = a.astype(dtype)
        a[1, 1, 1] = value
        return a, g
    return change


def dataset_with(change, pattern: str = "imagesTr/*_0001.nii.gz"):
    """A copy of the dataset with the first file matching `pattern` changed (every file, for a '*Tr/' pattern)."""
    def build(w: World, tmp: Path) -> Path:
        ds = copy_dataset(w, tmp)
        for path in (sorted(ds.glob(pattern)) if pattern.startswith("*") else [first(ds, pattern)]):
            rewrite(path, change)
        return ds
    return build


def inputs_with(change, channel: int = 1):
    """A copy of imagesTs whose first case's channel `channel` is changed."""
    def build(w: World, tmp: Path) -> Path:
        folder = Path(shutil.copytree(w.dataset / "imagesTs", tmp / "in"))
        rewrite(first(folder, f"*_{channel:04d}.nii.gz"), change)
        return folder
    return build


def predictions(w: World, tmp: Path, change=None, extra: bool = False, drop: bool = False) -> Path:
    """Predictions for labelsTs (the references themselves), one of them changed."""
    preds = Path(shutil.copytree(w.dataset / "labelsTs", tmp / "preds"))
    victim = first(preds, "*.nii.gz")
    if change is not None:
        rewrite(victim, change)
    if extra:
        shutil.copy(victim, preds / "NOT_A_CASE.nii.gz")
    if drop:
        victim.unlink()
    return preds


def text(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def pickled(tmp: Path) -> Path:
    path = tmp / "foreign.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)
    return path


def model_with_checkpoint(w: World, tmp: Path, make: Callable[[Path], None]) -> Path:
    model = Path(shutil.copytree(w.model, tmp / "model"))
    make(model / "training" / "fold_0" / "checkpoint_final.pt")
    return model


def zip_with(w: World, tmp: Path, name: str, data: bytes, add: bool = False, relist: bool = False,
             version: int | None = None) -> Path:
    """The archive with member `name` replaced by `data` (or added); `relist` also updates its manifest entry,
    so only what the member holds is wrong; `version` sets the manifest's format version."""
    out = tmp / "bad.zip"
    with zipfile.ZipFile(w.archive) as old, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
        manifest = json.loads(old.read("voxseg_archive.json"))
        if relist:
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if version is not None:
            manifest["version"] = version
        for info in old.infolist():
            if info.filename == "voxseg_archive.json":
                new.writestr(info.filename, json.dumps(manifest))
            else:
                new.writestr(info.filename, data if info.filename == name else old.read(info))
        if add:
            new.writestr(name, data)
    return out


def truncated(w: World, tmp: Path) -> Path:
    out = tmp / "truncated.zip"
    data = w.archive.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def onnx_tampered(w: World, tmp: Path) -> Path:
    model = Path(shutil.copytree(w.model, tmp / "model"))
    code, _, err = run(["export", model, "--onnx", model / "training/fold_0/model.onnx", "--folds", "0"])
    assert code == 0, err
    onnx_file = model / "training/fold_0/model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    return model


def traversal(w: World, tmp: Path) -> Path:
    return zip_with(w, tmp, "../escaped.json", b"{}", add=True)


def pickled_member(w: World, tmp: Path, version: int = 2) -> Path:
    """A pickled checkpoint holding an object, listed in the manifest of an archive of format `version`."""
    buffer = io.BytesIO()
    torch.save({"model": argparse.Namespace(a=1)}, buffer)
    return zip_with(w, tmp, "training/fold_1/checkpoint_final.pt", buffer.getvalue(), add=True, relist=True,
                    version=version)


def tamper_header(data: bytes) -> bytes:
    """A safetensors file whose first tensor claims 1 MiB more data than the file has: only the header lies."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    first_tensor = next(k for k in header if k != "__metadata__")
    header[first_tensor]["data_offsets"][1] += 1 << 20
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def weights_header_tampered(w: World, tmp: Path) -> Path:
    """The archive with its weights file's header altered (`tamper_header`; the manifest updated to match)."""
    name = "training/fold_0/model_final.safetensors"
    with zipfile.ZipFile(w.archive) as handle:
        data = handle.read(name)
    return zip_with(w, tmp, name, tamper_header(data), relist=True)


def weights_of_another_plan(w: World, tmp: Path) -> Path:
    """The archive with fold 0's plans.json of a wider network than its weights (manifest updated)."""
    name = "training/fold_0/plans.json"
    with zipfile.ZipFile(w.archive) as handle:
        plan = json.loads(handle.read("plans.json"))
    plan["network"]["features"] = [f * 2 for f in plan["network"]["features"]]
    return zip_with(w, tmp, name, json.dumps(plan).encode(), add=True, relist=True)


def stale_weights(w: World, tmp: Path) -> Path:
    """A model whose checkpoint_final.pt was rewritten (another size) after its weights file was written."""
    model = Path(shutil.copytree(w.model, tmp / "model"))
    code, _, err = run(["verify", model, "--write-weights"])
    assert code == 0, err
    path = model / "training" / "fold_0" / "checkpoint_final.pt"
    state = torch.load(path, weights_only=True)
    state["progress"] = {"epoch": 3, "history": list(range(100))}
    torch.save(state, path)
    return model


def installed(w: World, tmp: Path) -> Path:
    code, _, err = run(["install", w.archive, tmp / "target"])
    assert code == 0, err
    return w.archive


def drop(ds: Path, pattern: str) -> Path:
    first(ds, pattern).unlink()
    return ds


def cut(ds: Path, pattern: str) -> Path:
    victim = first(ds, pattern)
    victim.write_bytes(victim.read_bytes()[:200])
    return ds


def broken_json(ds: Path) -> Path:
    (ds / "dataset.json").write_text('{"labels": {"background": 0,')
    return ds


def all_background(ds: Path) -> Path:
    for path in ds.glob("labels*/*.nii.gz"):
        rewrite(path, lambda a, g: (np.zeros_like(a), g))
    return ds


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


empty_file.whole_file = True  # type: ignore[attr-defined]


def without_manifest(w: World, tmp: Path) -> Path:
    out = tmp / "bare.zip"
    with zipfile.ZipFile(w.archive) as old, zipfile.ZipFile(out, "w") as new:
        for name in old.namelist():
            if name != "voxseg_archive.json":
                new.writestr(name, old.read(name))
    return out


def touch(tmp: Path, name: str) -> Path:
    text(tmp, name, "a file")
    return tmp


def duplicate_channel(ds: Path) -> Path:
    """dataset.json naming channel "0" twice (a JSON parser keeps the last one silently)."""
    meta = json.loads((ds / "dataset.json").read_text())
    channels = meta.pop("channel_names")
    pairs = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in channels.items())
    (ds / "dataset.json").write_text(json.dumps(meta)[:-1] + f', "channel_names": {{{pairs}, "0": "MR"}}}}')
    return ds


def plans_edited(w: World, tmp: Path, edit: Callable[[dict], object] | None = None, text: str | None = None) -> Path:
    """A copy of the planned work directory whose plans.json was edited by hand (`edit` on the record, or `text`)."""
    work = Path(shutil.copytree(w.work, tmp / "work"))
    if text is not None:
        (work / "plans.json").write_text(text)
    else:
        data = json.loads((work / "plans.json").read_text())
        edit(data)
        (work / "plans.json").write_text(json.dumps(data))
    return work


def dataset_json_text(ds: Path, text: str) -> Path:
    (ds / "dataset.json").write_text(text)
    return ds


def many_labels(ds: Path) -> Path:
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{f"class{i}": i for i in range(1, 201)}}
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def test_files(w: World, tmp: Path, pick: Callable[[list[Path]], list[Path]]) -> list[Path]:
    """Copies of imagesTs channel files chosen by `pick` from the sorted list, as separate inputs."""
    folder = Path(shutil.copytree(w.dataset / "imagesTs", tmp / "in"))
    return pick(sorted(folder.glob("*.nii.gz")))


def renamed(path: Path, name: str) -> Path:
    return Path(shutil.copy(path, path.with_name(name)))


def manifest_text(w: World, tmp: Path, edit: Callable[[str], str]) -> Path:
    """The archive with its manifest's text edited (duplicate keys, deep nesting ...)."""
    out = tmp / "bad.zip"
    with zipfile.ZipFile(w.archive) as old, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info.filename, edit(data.decode()) if info.filename == "voxseg_archive.json" else data)
    return out


def nnunet_without(tmp: Path, field: str) -> Path:
    """An nnU-Net v2 model folder whose plans.json lacks one field of its 3d_fullres configuration."""
    from tests.test_nnunet import write_model_folder

    folder, _ = write_model_folder(tmp / "results")
    plans = json.loads((folder / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"][field]
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


_HELD: list[int] = []  # lock files held for the rest of the matrix (another process's run, as seen from here)


def held(folder: Path) -> Path:
    """`folder` with its lock taken by an open file of this process, as a second process would find it."""
    import fcntl
    import os

    from voxseg.locks import lock_path

    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(handle, fcntl.LOCK_EX)
    os.write(handle, json.dumps({"pid": 4242, "host": "elsewhere", "since": 0, "command": "voxseg train"}).encode())
    _HELD.append(handle)
    return folder


def work_copy(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.work, tmp / "work"))


def broken_plans(w: World, tmp: Path) -> Path:
    work = Path(shutil.copytree(w.work, tmp / "work"))
    (work / "plans.json").write_text('{"dataset_name": ')
    return work
