"""Model files that cannot run code: safetensors weights written by training and imports, read by prediction,
shipped in archives; pickles refused on an unsafe torch; tampered, mismatched and hostile files refused;
`voxseg verify`."""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.bad_inputs import tamper_header
from tests.test_export import tiny_plan
from tests.test_nnunet import write_model_folder
from tests.test_nnunet_import import run_cli
from tests.test_predictor import make_workdir
from voxseg import checkpoint as ckpt
from voxseg.errors import CheckpointError
from voxseg.infer.archive import checkpoint_path, export_archive, install_archive
from voxseg.infer.install import MANIFEST
from voxseg.infer.predictor import Predictor
from voxseg.models import build_network
from voxseg.pretrained import load_pretrained
from voxseg.weights import read_weights_header, write_weights
from voxseg.workdir import WorkDir

IMAGE = np.random.default_rng(3).normal(size=(2, 18, 16, 20)).astype(np.float32)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def trained(tmp_path):
    """A work directory with fold 0 trained (checkpoint_final.pt) and its weights file written as training does."""
    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    (work / "fingerprint.json").write_text(json.dumps({"spacings": [[1, 1, 1]]}))
    fold = WorkDir(work).fold(0)
    ckpt.checkpoint_to_weights(fold.checkpoint("final"), fold.weights("final"), "trained", 0, "final", work)
    return work


def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


class Payload:
    """Unpickling this runs `Path(marker).touch()`: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload_checkpoint(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, buffer)
    return buffer.getvalue()


def _rewrite_archive(source: Path, destination: Path, replace: dict[str, bytes], version: int | None = None) -> Path:
    """A copy of an archive with members replaced and a manifest whose digests match (a consistent forgery)."""
    with zipfile.ZipFile(source) as old:
        members = {n: old.read(n) for n in old.namelist() if n != MANIFEST}
        manifest = json.loads(old.read(MANIFEST))
    members.update(replace)
    manifest["files"] = {n: {"sha256": _sha(c), "size": len(c)} for n, c in members.items()}
    if version is not None:
        manifest["version"] = version
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as new:
        for name, content in members.items():
            new.writestr(name, content)
        new.writestr(MANIFEST, json.dumps(manifest))
    return destination


# ----- training and prediction ------------------------------------------------------------------------------------
def test_training_writes_weights_for_final_and_best_only_with_provenance(tmp_path):
    work = WorkDir(tmp_path / "work")
    fold = work.fold(0)
    fold.path.mkdir(parents=True)
    work.fingerprint.write_text('{"spacings": []}')
    plan = tiny_plan()
    network = build_network(plan, deep_supervision=True)
    checkpointer = ckpt.Checkpointer(fold.path, {"model": network}, {"plan": plan.to_dict(), "config": {"x": 1}})
    checkpointer.save("latest")
    assert not fold.weights("latest").exists()
    path = checkpointer.save("final")
    weights = read_weights_header(fold.weights("final"))
    assert weights.plan == plan.to_dict() and weights.config == {"x": 1}
    assert weights.provenance["source"] == "trained" and weights.provenance["fold"] == "0"
    assert weights.provenance["dataset_fingerprint_sha256"] == _sha(work.fingerprint.read_bytes())
    assert weights.checkpoint == {"bytes": path.stat().st_size, "sha256": _sha(path.read_bytes())}
    assert set(weights.shapes) == set(network.state_dict())
    checkpointer.save("best")
    assert fold.weights("best").is_file()


def test_prediction_reads_the_weights_file_and_never_unpickles(trained, monkeypatch):
    expected = Predictor.from_workdir(trained, folds=[0], device="cpu", mirror_axes=None).predict_logits(IMAGE)
    assert checkpoint_path(trained, 0) == WorkDir(trained).fold(0).weights("final")
    _no_unpickling(monkeypatch)
    predictor = Predictor.from_workdir(trained, folds=[0], device="cpu", mirror_axes=None)
    assert torch.equal(predictor.predict_logits(IMAGE), expected)


def test_a_checkpoint_rewritten_without_its_weights_is_refused_until_verify_writes_them(trained):
    fold = WorkDir(trained).fold(0)
    state = torch.load(fold.checkpoint("final"), weights_only=True)
    state["progress"] = {"epoch": 7, "history": list(range(50))}  # a resumed run: another file size
    torch.save(state, fold.checkpoint("final"))
    with pytest.raises(CheckpointError, match="no longer holds the weights of .*checkpoint_final.pt.*voxseg verify "
                                              ".* --write-weights"):
        Predictor.from_workdir(trained, folds=[0], device="cpu")
    code, _, err = run_cli("verify", trained)
    assert code != 0 and "changed after the weights were written" in err
    code, out, _ = run_cli("verify", trained, "--write-weights")
    assert code == 0 and "written again from checkpoint_final.pt" in out
    assert read_weights_header(fold.weights("final")).epoch == 7
    Predictor.from_workdir(trained, folds=[0], device="cpu")


def test_a_work_directory_without_weights_files_still_predicts_and_verify_writes_them(tmp_path, monkeypatch):
    work = make_workdir(tmp_path / "old", tiny_plan(), folds=(0,))  # trained before weights files existed
    expected = Predictor.from_workdir(work, folds=[0], device="cpu", mirror_axes=None).predict_logits(IMAGE)
    code, out, _ = run_cli("verify", work)
    assert code == 0 and "only checkpoint_final.pt" in out and "--write-weights" in out
    code, out, _ = run_cli("verify", work, "--write-weights")
    assert code == 0 and "fold 0 final: model_final.safetensors" in out and "converted" in out
    _no_unpickling(monkeypatch)
    assert torch.equal(Predictor.from_workdir(work, folds=[0], device="cpu", mirror_axes=None)
                       .predict_logits(IMAGE), expected)


def test_pretrained_weights_come_from_a_weights_file_without_unpickling(trained, monkeypatch):
    source = read_weights_header(WorkDir(trained).fold(0).weights("final"))
    network = build_network(tiny_plan(), deep_supervision=True)
    _no_unpickling(monkeypatch)
    report = load_pretrained(network, source.path)
    assert not report.missing and not report.mismatched and len(report.loaded) == len(source.shapes)
    tensors = load_file(str(source.path))
    assert all(torch.equal(network.state_dict()[name], tensors[name]) for name in tensors)


# ----- pickles ----------------------------------------------------------------------------------------------------
def test_a_reduce_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_payload_checkpoint(marker))
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        ckpt.load_checkpoint(path)
    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    WorkDir(work).fold(0).checkpoint("final").write_bytes(_payload_checkpoint(marker))
    code, _, err = run_cli("predict", "-m", work, "-i", tmp_path, "-o", tmp_path / "out")
    assert code != 0 and "refuses to unpickle" in err and "Traceback" not in err
    assert not marker.exists()


def test_an_old_archive_with_a_payload_installs_nothing(trained, tmp_path):
    marker = tmp_path / "pwned"
    archive = export_archive(trained, tmp_path / "model.zip")
    forged = _rewrite_archive(archive, tmp_path / "forged.zip",
                              {"training/fold_0/checkpoint_final.pt": _payload_checkpoint(marker)}, version=2)
    with pytest.raises(CheckpointError, match="checkpoint_final.pt': checkpoint .* holds Python objects .*nothing "
                                              "was installed"):
        install_archive(forged, tmp_path / "target")
    assert not marker.exists() and not (tmp_path / "target").exists()
    # the same pickle in an archive of the safetensors format is refused before it is read
    forged3 = _rewrite_archive(archive, tmp_path / "forged3.zip",
                               {"training/fold_0/checkpoint_final.pt": _payload_checkpoint(marker)})
    with pytest.raises(CheckpointError, match="pickled checkpoints, which an archive of format 3 never holds"):
        install_archive(forged3, tmp_path / "target")
    assert not marker.exists()


@pytest.mark.parametrize(("version", "cve"), [("2.9.1", "CVE-2026-24747"), ("2.5.1+cpu", "CVE-2025-32434")])
def test_pickles_are_refused_on_a_torch_with_an_unsafe_loader(trained, monkeypatch, version, cve):
    monkeypatch.setattr(torch, "__version__", version)
    fold = WorkDir(trained).fold(0)
    with pytest.raises(CheckpointError, match=f"torch {version.split('+')[0]}.*{cve}.*torch>=2.10"):
        ckpt.load_checkpoint(fold.checkpoint("final"))
    # the safetensors weights need no unpickler: prediction still works there
    Predictor.from_workdir(trained, folds=[0], device="cpu", mirror_axes=None).predict_logits(IMAGE)


def test_the_package_requires_the_safe_torch():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.10"' in text and '"safetensors' in text
    assert ckpt.SAFE_UNPICKLER_TORCH == (2, 10)


# ----- archives ---------------------------------------------------------------------------------------------------
def test_archive_ships_weights_with_provenance_and_install_keeps_a_checked_manifest(trained, tmp_path, monkeypatch):
    archive = export_archive(trained, tmp_path / "model.zip")
    with zipfile.ZipFile(archive) as handle:
        names = set(handle.namelist())
        manifest = json.loads(handle.read(MANIFEST))
    assert "training/fold_0/model_final.safetensors" in names and not any(n.endswith(".pt") for n in names)
    assert manifest["version"] == 3 and manifest["exported"]["voxseg_version"]
    code, out, _ = run_cli("verify", archive)
    assert code == 0 and "trained" in out and "data fingerprint" in out and "matches its SHA-256" in out
    target = install_archive(archive, tmp_path / "model")
    installed = json.loads(WorkDir(target).archive_manifest.read_text())
    assert installed["files"]["training/fold_0/model_final.safetensors"]["sha256"] == _sha(
        (target / "training/fold_0/model_final.safetensors").read_bytes())
    _no_unpickling(monkeypatch)
    Predictor.from_workdir(target, folds=[0], device="cpu", mirror_axes=None).predict_logits(IMAGE)
    code, out, _ = run_cli("verify", target)
    assert code == 0 and "from model.zip" in out
    # an installed file changed afterwards is found
    (target / "dataset.json").write_text('{"labels": {}}')
    code, _, err = run_cli("verify", target)
    assert code != 0 and "dataset.json (SHA-256 differs)" in err


def test_an_archive_written_before_weights_files_installs_converted(tmp_path, monkeypatch):
    work = make_workdir(tmp_path / "work", tiny_plan(), folds=(0,))
    fold = WorkDir(work).fold(0)
    state = torch.load(fold.checkpoint("final"), weights_only=True)
    buffer = io.BytesIO()
    torch.save({"format": 2, "model": state["model"], "plan": state["plan"], "config": {}}, buffer)
    members = {"plans.json": WorkDir(work).plans.read_bytes(), "dataset.json": WorkDir(work).dataset_json.read_bytes(),
               "training/fold_0/checkpoint_final.pt": buffer.getvalue()}
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(old, "w") as handle:
        for name, content in members.items():
            handle.writestr(name, content)
        handle.writestr(MANIFEST, json.dumps({"format": "voxseg-model", "version": 2, "folds": [0],
                                              "files": {n: {"sha256": _sha(c), "size": len(c)}
                                                        for n, c in members.items()}}))
    expected = Predictor.from_workdir(work, folds=[0], device="cpu", mirror_axes=None).predict_logits(IMAGE)
    target = install_archive(old, tmp_path / "model")
    assert sorted(p.name for p in (target / "training/fold_0").iterdir()) == ["model_final.safetensors"]
    manifest = json.loads(WorkDir(target).archive_manifest.read_text())
    assert manifest["installed"]["converted"] == {"training/fold_0/model_final.safetensors":
                                                  "training/fold_0/checkpoint_final.pt"}
    _no_unpickling(monkeypatch)
    assert torch.equal(Predictor.from_workdir(target, folds=[0], device="cpu", mirror_axes=None)
                       .predict_logits(IMAGE), expected)


def test_a_tampered_header_is_refused_on_install_and_on_load(trained, tmp_path):
    archive = export_archive(trained, tmp_path / "model.zip")
    name = "training/fold_0/model_final.safetensors"
    with zipfile.ZipFile(archive) as handle:
        data = handle.read(name)
    forged = _rewrite_archive(archive, tmp_path / "forged.zip", {name: tamper_header(data)})
    with pytest.raises(CheckpointError, match="corrupt or altered header.*nothing was installed"):
        install_archive(forged, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    weights = WorkDir(trained).fold(0).weights("final")
    weights.write_bytes(tamper_header(weights.read_bytes()))
    code, _, err = run_cli("predict", "-m", trained, "-i", tmp_path, "-o", tmp_path / "out")
    assert code != 0 and "model_final.safetensors has a corrupt or altered header" in err and "Traceback" not in err
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        read_weights_header(weights)


def test_a_member_changed_after_export_is_refused(trained, tmp_path):
    archive = export_archive(trained, tmp_path / "model.zip")
    name = "training/fold_0/model_final.safetensors"
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(tmp_path / "bad.zip", "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename == name:  # one byte of one weight changed, the manifest left as it was
                data = data[:-4] + bytes([data[-4] ^ 1]) + data[-3:]
            new.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match="model_final.safetensors' does not match its SHA-256"):
        install_archive(tmp_path / "bad.zip", tmp_path / "target")
    code, _, err = run_cli("verify", tmp_path / "bad.zip")
    assert code != 0 and "does not match its SHA-256" in err and "it would not install" in err


def test_a_plan_that_disagrees_with_the_weights_is_refused(trained, tmp_path):
    archive = export_archive(trained, tmp_path / "model.zip")
    name = "training/fold_0/model_final.safetensors"
    weights = read_weights_header(WorkDir(trained).fold(0).weights("final"))
    wider = {**weights.plan, "network": {**weights.plan["network"], "features": [6, 8]}}
    tensors = load_file(str(weights.path))
    forged_weights = tmp_path / "forged.safetensors"
    with safe_open(str(weights.path), "pt") as opened:
        metadata = dict(opened.metadata())
    metadata["plan"] = json.dumps(wider)
    save_file(tensors, str(forged_weights), metadata=metadata)
    forged = _rewrite_archive(archive, tmp_path / "forged.zip", {name: forged_weights.read_bytes()})
    with pytest.raises(CheckpointError, match=r"do not fit the network of its plan: .* is \[4.*\] in the file but "
                                              r"\[6.*\] in the plan's network.*nothing was installed"):
        install_archive(forged, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    # the fold's plans.json disagreeing with the weights' own plan: refused too
    plans = json.dumps(wider).encode()
    forged = _rewrite_archive(archive, tmp_path / "forged2.zip", {"training/fold_0/plans.json": plans})
    with pytest.raises(CheckpointError, match="fold_0/plans.json: the weights do not fit"):
        install_archive(forged, tmp_path / "target")
    # writing weights that do not fit their plan is refused too: no such file is ever made
    with pytest.raises(CheckpointError, match="do not fit the network of its plan"):
        write_weights(tmp_path / "x.safetensors", tensors, wider, provenance={})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("member", ["/etc/model_final.safetensors", "../model_final.safetensors", "link"])
def test_absolute_parent_and_symlink_members_are_refused(trained, tmp_path, member):
    archive = export_archive(trained, tmp_path / "model.zip")
    info = zipfile.ZipInfo(member)
    if member == "link":
        info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(archive, "a") as handle:
        handle.writestr(info, b"/etc/passwd")
    with pytest.raises(CheckpointError, match=f"archive member '{member}' refused: .*Nothing was installed"):
        install_archive(archive, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    assert not (tmp_path / "model_final.safetensors").exists()


# ----- nnU-Net model folders --------------------------------------------------------------------------------------
def test_an_imported_nnunet_model_is_converted_once_and_verify_reports_its_source(tmp_path, monkeypatch):
    folder, _ = write_model_folder(tmp_path / "results")
    code, out, _ = run_cli("verify", folder)
    assert code == 0 and "nnU-Net v2 model folder" in out and "voxseg import nnunet" in out
    work = tmp_path / "work"
    assert run_cli("import", "nnunet", folder, work)[0] == 0
    weights = read_weights_header(WorkDir(work).fold(0).weights("final"))
    source = folder / "fold_0" / "checkpoint_final.pth"
    assert weights.provenance["source"] == "nnunet-import"
    assert weights.provenance["source_sha256"] == _sha(source.read_bytes())
    code, out, _ = run_cli("verify", work)
    assert code == 0 and "nnunet-import" in out and "checkpoint_final.pt matches" in out
    image = np.random.default_rng(0).normal(size=(1, 20, 24, 22)).astype(np.float32)
    expected = Predictor.from_workdir(folder, folds=[0], device="cpu", mirror_axes=None).predict_logits(image)
    _no_unpickling(monkeypatch)
    got = Predictor.from_workdir(work, folds=[0], device="cpu", mirror_axes=None).predict_logits(image)
    assert torch.equal(got, expected)


def test_verify_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run_cli("verify", tmp_path / "notes.txt")
    assert code != 0 and "neither a model archive" in err
    code, _, err = run_cli("verify", tmp_path)
    assert code != 0 and "not a model folder (no plans.json)" in err
    assert os.listdir(tmp_path) == ["notes.txt"]
