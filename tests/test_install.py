"""Installing model archives: an existing model is kept unless forced (then replaced as a whole), limits on
what an archive may inflate to, free disk space, SHA-256 digests of members and of exported ONNX files."""
from __future__ import annotations

import json
import shutil
import zipfile
from collections import namedtuple

import pytest

from tests.test_export import tiny_plan
from tests.test_predictor import make_workdir
from voxseg.errors import CheckpointError
from voxseg.infer import install as install_module
from voxseg.infer.archive import export_archive, install_archive
from voxseg.infer.install import MANIFEST


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    first = make_workdir(root / "first", tiny_plan(), folds=(0, 1), seed=0)
    second = make_workdir(root / "second", tiny_plan(), folds=(0,), seed=5)
    return export_archive(first, root / "first.zip", folds=[0, 1]), export_archive(second, root / "second.zip")


def test_manifest_lists_every_member_with_its_digest(archives):
    with zipfile.ZipFile(archives[0]) as archive:
        files = json.loads(archive.read(MANIFEST))["files"]
        names = {n for n in archive.namelist() if n != MANIFEST}
    assert set(files) == names and all(len(entry["sha256"]) == 64 for entry in files.values())


def test_installing_over_a_model_is_refused_unless_forced_and_then_replaces_it_whole(archives, tmp_path):
    target = install_archive(archives[0], tmp_path / "model")
    before = (target / "training/fold_0/model_final.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a model .*force"):
        install_archive(archives[1], target)
    assert (target / "training/fold_0/model_final.safetensors").read_bytes() == before
    install_archive(archives[1], target, force=True)
    assert (target / "training/fold_0/model_final.safetensors").read_bytes() != before
    assert not (target / "training/fold_1").exists()  # nothing of the first model is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folder left


def _rewrite_member(source, destination, name, data):
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, data if info.filename == name else old.read(info.filename))
    return destination


def test_a_member_that_does_not_match_its_digest_is_refused(archives, tmp_path):
    bad = _rewrite_member(archives[0], tmp_path / "bad.zip", "dataset.json", b'{"labels": {}}')
    with pytest.raises(CheckpointError, match="'dataset.json' does not match its SHA-256"):
        install_archive(bad, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_unlisted_members_are_not_installed_and_no_manifest_is_refused(archives, tmp_path):
    extra = tmp_path / "extra.zip"
    shutil.copyfile(archives[1], extra)
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("training/fold_0/notes.json", "{}")
    target = install_archive(extra, tmp_path / "target")
    assert (target / "plans.json").is_file() and not (target / "training/fold_0/notes.json").exists()
    bare = tmp_path / "bare.zip"
    with zipfile.ZipFile(archives[1]) as old, zipfile.ZipFile(bare, "w") as new:
        for name in old.namelist():
            if name != MANIFEST:
                new.writestr(name, old.read(name))
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST}"):
        install_archive(bare, tmp_path / "other")


def test_size_and_compression_limits(archives, tmp_path):
    with pytest.raises(CheckpointError, match="more than the 1000-byte limit;"):
        install_archive(archives[0], tmp_path / "a", max_total_bytes=1000)
    with pytest.raises(CheckpointError, match="limit per member"):
        install_archive(archives[0], tmp_path / "b", max_member_bytes=100)
    bomb = _rewrite_member(archives[1], tmp_path / "bomb.zip", "dataset.json", b" " * (8 << 20))
    with pytest.raises(CheckpointError, match="'dataset.json' inflates .*:1 .*zip bomb"):
        install_archive(bomb, tmp_path / "c")


def test_a_full_disk_says_not_enough_space(archives, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(install_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 10, 10))
    with pytest.raises(CheckpointError,
                       match=r"not enough space in .*needs \d+ bytes .*10 bytes \(0.00 GiB\) are free"):
        install_archive(archives[0], tmp_path / "target")


def test_exported_onnx_carries_its_digest_and_a_changed_file_is_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    from voxseg.infer.export import export_onnx, load_onnx_model

    workdir = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    export_onnx(workdir, 0)
    path = workdir / "training/fold_0/model.onnx"
    sidecar = path.with_name("model.onnx.sha256")
    assert sidecar.read_text().endswith("  model.onnx\n")
    assert load_onnx_model(path).plan is not None
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="model.onnx: its SHA-256 is .* but model.onnx.sha256 says"):
        load_onnx_model(path)


def test_a_refused_install_creates_nothing_and_a_killed_one_is_swept(archives, tmp_path):
    target = tmp_path / "deep" / "model"
    bad = _rewrite_member(archives[0], tmp_path / "bad.zip", "dataset.json", b'{"labels": {}}')
    with pytest.raises(CheckpointError):
        install_archive(bad, target)
    assert not (tmp_path / "deep").exists()
    # the staging folder of an install killed mid-way (its process is gone) is removed by the next install
    (tmp_path / "deep").mkdir()
    stale = tmp_path / "deep" / ".model.install-999999999-abcd"
    (stale / "training").mkdir(parents=True)
    (stale / "training" / "part.bin").write_bytes(b"x" * 100)
    install_archive(archives[0], target)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["model"]
