"""Atomic writes: a failed write leaves no temporary file and the previous content; the temp name keeps the ending."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import voxseg.atomicio as atomicio
import voxseg.data.io as image_io
from voxseg.atomicio import atomic_open, atomic_path, copy_file, temporary_path, write_bytes, write_text
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.jsonio import write_json_atomic


class WriterFailed(Exception):
    pass


def _only(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name, ending", [("case_0001.nii.gz", ".nii.gz"), ("progress.png", ".png"),
                                          ("ct.mha", ".mha"), ("dataset.json", ".json"), ("plain", "")])
def test_temporary_name_is_hidden_next_to_the_target_and_keeps_the_ending(tmp_path, name, ending):
    tmp = temporary_path(tmp_path / name)
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(ending)
    assert tmp.name != name and temporary_path(tmp_path / name) != tmp  # fresh for every writer


def test_success_writes_the_content_under_the_target_name(tmp_path):
    write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")  # the folder is created
    write_text(tmp_path / "b.txt", "line\n")
    write_json_atomic(tmp_path / "c.json", {"x": [1, 2]})
    (tmp_path / "source.json").write_text('{"y": 1}\n')
    copy_file(tmp_path / "source.json", tmp_path / "d.json")
    with atomic_open(tmp_path / "e.pt") as handle:
        torch.save({"w": torch.arange(3)}, handle)
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text() == "line\n"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert json.loads((tmp_path / "d.json").read_text()) == {"y": 1}
    assert torch.equal(torch.load(tmp_path / "e.pt", weights_only=True)["w"], torch.arange(3))
    assert _only(tmp_path) == ["b.txt", "c.json", "d.json", "e.pt", "source.json", "sub"]


def _fail_bytes(path):
    with atomic_open(path) as handle:
        handle.write(b"half of the new")
        raise WriterFailed


def _fail_json(path, monkeypatch):
    def disk_full(descriptor):  # the whole text is in the temporary file when flushing it to disk fails
        raise WriterFailed

    monkeypatch.setattr(atomicio.os, "fsync", disk_full)
    write_json_atomic(path, {"new": True})


def _fail_torch_save(path):
    with atomic_path(path) as tmp:
        try:  # the tensor is written, then pickling the function fails half-way through the file
            torch.save({"new": torch.zeros(4096), "then": lambda: None}, tmp)
        except Exception as exc:
            assert tmp.stat().st_size > 0
            raise WriterFailed from exc


@pytest.mark.parametrize("kind", ["bytes", "json", "torch"])
def test_failure_mid_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, kind):
    target = tmp_path / {"bytes": "a.bin", "json": "a.json", "torch": "a.pt"}[kind]
    target.write_bytes(b"previous content")
    with pytest.raises(WriterFailed):
        if kind == "bytes":
            _fail_bytes(target)
        elif kind == "json":
            _fail_json(target, monkeypatch)
        else:
            _fail_torch_save(target)
    assert target.read_bytes() == b"previous content"
    assert _only(tmp_path) == [target.name]


def test_block_that_writes_nothing_is_an_error_and_keeps_the_target(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "a.txt"):
            pass
    assert (tmp_path / "a.txt").read_text() == "old" and _only(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="write mode"):
        with atomic_open(tmp_path / "a.txt", "ab"):
            pass


@pytest.mark.parametrize("name", ["case.nii.gz", "case.mha"])
def test_image_writer_failure_keeps_the_previous_image(tmp_path, monkeypatch, name):
    path = tmp_path / name
    previous = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_image(path, previous, Geometry(np.diag([1.0, 2.0, 3.0, 1.0])))
    assert _only(tmp_path) == [name]

    def write_then_fail(original):
        def writer(tmp, array, geometry):
            original(tmp, array, geometry)  # a complete temporary image exists when the failure comes
            assert tmp.name.endswith(name.partition(".")[2]) and tmp.exists()
            raise WriterFailed
        return writer

    monkeypatch.setattr(image_io, "_write_nibabel", write_then_fail(image_io._write_nibabel))
    monkeypatch.setattr(image_io, "_write_sitk", write_then_fail(image_io._write_sitk))
    with pytest.raises(WriterFailed):
        write_image(path, np.zeros((4, 5, 6), dtype=np.int16), Geometry(np.eye(4)))
    array, geometry = read_image(path)  # the format came from the kept ending, so the old image reads back
    np.testing.assert_array_equal(array, previous)
    assert geometry.spacing == pytest.approx((1.0, 2.0, 3.0))
    assert _only(tmp_path) == [name]


def test_sweep_removes_only_temporaries_of_dead_or_older_writers(tmp_path):
    import os
    import subprocess
    import sys

    from voxseg.atomicio import sweep_stale_temporaries, temporary_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temporary_path(tmp_path / "case.nii.gz")                      # this process, being written now
    stale = tmp_path / f".case_b.tmp{dead_pid}-abc123.nii.gz"            # its writer has exited
    reused = tmp_path / f".case_c.tmp{os.getppid()}-00ff00.npy"           # older than the (running) writer
    kept = [mine, tmp_path / ".hidden_notes", tmp_path / "case.tmp1-abc.nii.gz", tmp_path / "case_d.nii.gz"]
    for path in [stale, reused, *kept]:
        path.write_bytes(b"x")
    os.utime(reused, (1.0, 1.0))
    (tmp_path / "validation").mkdir()
    nested = tmp_path / "validation" / f".v.tmp{dead_pid}-0a0b0c.nii.gz"
    nested.write_bytes(b"x")
    assert sorted(sweep_stale_temporaries(tmp_path)) == sorted([stale, reused])
    assert all(path.exists() for path in kept) and nested.exists()
    assert sweep_stale_temporaries(tmp_path, recursive=True) == [nested]
