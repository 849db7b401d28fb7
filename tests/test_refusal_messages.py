"""Clear errors instead of tracebacks: bad inference options, outputs that are files, a full disk, files that
are not checkpoints, pickled code in a checkpoint."""
from __future__ import annotations

import argparse
import errno

import numpy as np
import pytest
import torch

import voxseg.checkpoint as checkpoint_module
from tests.test_predictor import make_workdir, tiny_plan
from voxseg.checkpoint import load_checkpoint, save_checkpoint
from voxseg.data.store import save_case
from voxseg.errors import CheckpointError, ConfigError, DiskFullError, VoxsegError
from voxseg.infer.config import InferConfig
from voxseg.infer.predictor import Predictor


@pytest.mark.parametrize("options, words", [({"step": 0}, "step=0"), ({"step": 1.5}, "step=1.5"),
                                            ({"tile_batch": 0}, "tile_batch=0")])
def test_bad_tiling_options_name_the_option(tmp_path, options, words):
    with pytest.raises(ConfigError, match=words):
        Predictor(tiny_plan(), [], InferConfig(**options), device="cpu")


def test_predict_output_that_is_a_file(tmp_path):
    workdir = make_workdir(tmp_path / "work", tiny_plan())
    (tmp_path / "out").write_text("a file")
    predictor = Predictor.from_workdir(workdir, folds=0, device="cpu", mirror_axes=None)
    with pytest.raises(ConfigError, match="predict -o .*out: exists and is a file"):
        predictor.predict_files([], tmp_path / "out")


def _full_disk_save(obj, f):
    with open(f, "wb") as handle:
        handle.write(b"half")
    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_named_for_checkpoints_and_preprocessed_cases(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, {"epoch": 1})
    monkeypatch.setattr(checkpoint_module.torch, "save", _full_disk_save)
    with pytest.raises(DiskFullError, match="checkpoint_latest.pt: no space left on device"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.setattr(np, "save", _no_space)
    with pytest.raises(DiskFullError, match=r"case_a\.npy: no space left on device") as info:
        save_case(tmp_path / "store", "case_a", np.zeros((1, 4, 4, 4), np.float32), None, {})
    assert isinstance(info.value, VoxsegError)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("interesting notes\n")
    with pytest.raises(CheckpointError, match="notes.pt is corrupt or not a checkpoint at all"):
        load_checkpoint(text)
    pointer = tmp_path / "checkpoint_final.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 123\n")
    with pytest.raises(CheckpointError, match="git-lfs pointer.*git lfs pull"):
        load_checkpoint(pointer)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02" + b"e" * 20)  # a pickle header, then garbage: torch raises KeyError
    with pytest.raises(CheckpointError, match="legacy.pt is corrupt, truncated"):
        load_checkpoint(legacy)


def test_pickled_code_is_refused_without_inviting_weights_only_false(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refuses to unpickle foreign code" in message and "argparse.Namespace" in message
    assert "weights_only" not in message and "will likely succeed" not in message
