"""ONNX export (parity with PyTorch, onnxruntime backend, the export -> predict / archive -> install -> predict
workflows) and model archives (round trip, unsafe members)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import stat
import zipfile

import numpy as np
import pytest
import torch

from voxseg.cli import main
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.errors import CheckpointError
from voxseg.infer import export as export_module
from voxseg.infer.archive import export_archive, install_archive, load_fold_network
from voxseg.infer.export import export_onnx, load_onnx_model
from voxseg.infer.install import MANIFEST
from voxseg.infer.predictor import Predictor
from voxseg.models import build_network
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.weights import read_weights_header

pytest.importorskip("onnxruntime")


def tiny_plan() -> Plan:
    return Plan(
        dataset_name="Tiny", raw_dataset="/nonexistent", channel_names={"0": "a", "1": "b"},
        labels={"background": 0, "x": 1, "y": 2}, file_ending=".nii.gz", target_spacing=[1.0, 1.0, 1.0],
        patch_size=[16, 16, 16], batch_size=2,
        network=NetworkPlan(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]]),
        normalization=[ChannelNormalization(), ChannelNormalization()],
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    plan = tiny_plan()
    plan.save(root / "plans.json")
    (root / "dataset.json").write_text(json.dumps({"labels": plan.labels, "file_ending": ".nii.gz"}))
    (root / "postprocessing.json").write_text(json.dumps({"largest_component": [[1]]}))
    for fold in (0, 1):
        torch.manual_seed(fold)
        net = build_network(plan, deep_supervision=True)
        folder = root / "training" / f"fold_{fold}"
        folder.mkdir(parents=True)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        net(torch.randn(1, 2, 16, 16, 16))[0].square().mean().backward()
        optimizer.step()
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "plan": plan.to_dict(),
                    "config": {"loop": {"epochs": 1}}, "progress": {"epoch": 1}}, folder / "checkpoint_final.pt")
        (folder / "config.json").write_text(json.dumps({"loop": {"epochs": 1}}))
    return root


def test_onnx_export_matches_pytorch(workdir, tmp_path):
    out = tmp_path / "model.onnx"
    difference = export_onnx(workdir, 0, out)
    assert out.is_file() and difference < 1e-3
    model = load_onnx_model(out)
    assert model.plan is not None and model.plan.to_dict() == tiny_plan().to_dict()
    network, _ = load_fold_network(workdir, 0)
    image = torch.randn(3, 2, 16, 16, 16)  # a batch size other than the export's: the batch axis is dynamic
    with torch.no_grad():
        expected = network(image)
    assert (model(image) - expected).abs().max() < 1e-3


def test_failed_parity_check_writes_nothing(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "onnx_parity", lambda *args, **kwargs: 0.5)
    with pytest.raises(CheckpointError, match="differs from PyTorch by 0.5"):
        export_onnx(workdir, 0, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnxruntime_backend_predicts_like_torch(workdir):
    export_onnx(workdir, 1, None)  # default location: training/fold_1/model.onnx
    assert (workdir / "training" / "fold_1" / "model.onnx").is_file()
    image = np.random.default_rng(0).normal(size=(2, 20, 17, 18)).astype(np.float32)
    torch_predictor = Predictor.from_workdir(workdir, folds=[1], device="cpu", mirror_axes=(1,))
    onnx_predictor = Predictor.from_workdir(workdir, folds=[1], mirror_axes=(1,), backend="onnxruntime")
    assert torch.allclose(onnx_predictor.predict_logits(image), torch_predictor.predict_logits(image), atol=1e-3)
    labels = torch_predictor.predict_array(image, (1.0, 1.0, 1.0))
    assert (onnx_predictor.predict_array(image, (1.0, 1.0, 1.0)) == labels).mean() > 0.999


def test_archive_round_trip(workdir, tmp_path):
    archive = export_archive(workdir, tmp_path / "model.zip", folds=[0, 1])
    with zipfile.ZipFile(archive) as handle:
        names = set(handle.namelist())
    assert {"plans.json", "dataset.json", "postprocessing.json", "training/fold_0/model_final.safetensors",
            "training/fold_1/config.json"} <= names
    assert not any(name.endswith(".pt") for name in names)  # no pickle is shipped, nor the resuming state
    target = install_archive(archive, tmp_path / "installed")
    installed = read_weights_header(target / "training" / "fold_0" / "model_final.safetensors")
    assert installed.epoch == 1 and installed.provenance["source"] == "converted"
    assert installed.provenance["source_file"] == "checkpoint_final.pt"
    image = np.random.default_rng(1).normal(size=(2, 18, 16, 20)).astype(np.float32)
    original = Predictor.from_workdir(workdir, folds=[0, 1], device="cpu", mirror_axes=None)
    copy = Predictor.from_workdir(target, folds=[0, 1], device="cpu", mirror_axes=None)
    assert copy.postprocessing == {"largest_component": [[1]]}
    assert torch.equal(original.predict_logits(image), copy.predict_logits(image))


def _zip_with(tmp_path, extra: zipfile.ZipInfo | str, content: bytes = b"x") -> str:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, buffer)
    path = tmp_path / "bad.zip"
    members = {"plans.json": b"{}", "training/fold_0/checkpoint_final.pt": buffer.getvalue()}
    name = extra.filename if isinstance(extra, zipfile.ZipInfo) else extra
    files = {n: {"sha256": hashlib.sha256(c).hexdigest(), "size": len(c)}
             for n, c in {**members, name: content}.items()}
    with zipfile.ZipFile(path, "w") as handle:
        for member, data in members.items():
            handle.writestr(member, data)
        handle.writestr(extra, content)
        handle.writestr(MANIFEST, json.dumps({"format": "voxseg-model", "version": 2, "files": files}))
    return str(path)


@pytest.mark.parametrize("member", ["../evil.txt", "../evil.json", "/tmp/voxseg_evil.json", "a/../../evil.json",
                                    "run.sh", "training\\..\\..\\evil.json"])
def test_unsafe_archive_members_are_refused(tmp_path, member):
    target = tmp_path / "target"
    with pytest.raises(CheckpointError, match="member '" + member.replace("\\", "\\\\").replace(".", r"\.")):
        install_archive(_zip_with(tmp_path, member), target)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil.json").exists()
    assert not (target / "plans.json").exists()  # refused before anything was written


def test_symlink_member_is_refused(tmp_path):
    link = zipfile.ZipInfo("training/fold_0/link.json")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(CheckpointError, match="symbolic link"):
        install_archive(_zip_with(tmp_path, link, b"/etc/passwd"), tmp_path / "target")
    assert not (tmp_path / "target" / "training").exists()


class NotWeights:
    """Any object that is not plain data; weights_only loading refuses to build it."""


def test_checkpoint_with_code_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"model": NotWeights()}, buffer)
    with pytest.raises(CheckpointError, match="fold_1/checkpoint_final.pt': checkpoint .* holds Python objects "
                       ".*nothing was installed"):
        install_archive(_zip_with(tmp_path, "training/fold_1/checkpoint_final.pt", buffer.getvalue()),
                        tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "model.zip").write_text("hello")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        install_archive(tmp_path / "model.zip", tmp_path / "target")
    path = tmp_path / "empty.zip"
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr("notes.json", "{}")
    with pytest.raises(CheckpointError, match="not a voxseg model archive"):
        install_archive(path, tmp_path / "target")


# ----- the ONNX workflow through the command line: export -> predict, export -> archive -> install -> predict ----
def _cli(*args: object) -> str:
    """voxseg.cli.main, which must succeed; returns stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture
def onnx_work(workdir, tmp_path):
    """A copy of the trained work dir (the module's own gets ONNX files) and one input case."""
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    for path in work.glob("training/fold_*/model.onnx*"):
        path.unlink()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = np.random.default_rng(5).normal(size=(2, 20, 17, 18)).astype(np.float32)
    for channel in range(2):
        write_image(inputs / f"case_{channel:04d}.nii.gz", image[channel], Geometry.from_spacing((1.0, 1.2, 0.9)))
    return work, inputs


def _labels(folder) -> np.ndarray:
    return read_image(folder / "case.nii.gz")[0]


def test_onnx_without_a_file_exports_each_fold_where_predict_looks(onnx_work, tmp_path):
    work, inputs = onnx_work
    out = _cli("export", work, "--onnx", "--folds", "0,1")
    for fold in (0, 1):
        path = work / "training" / f"fold_{fold}" / "model.onnx"
        assert f"wrote {path} (fold {fold}" in out and path.with_name("model.onnx.sha256").is_file()
    assert f"voxseg predict -m {work} -i INPUT -o OUTPUT --backend onnxruntime --folds 0,1" in out
    _cli("predict", "-m", work, "-i", inputs, "-o", tmp_path / "torch", "--folds", "0,1", "--device", "cpu")
    _cli("predict", "-m", work, "-i", inputs, "-o", tmp_path / "onnx", "--folds", "0,1", "--backend", "onnxruntime")
    assert np.array_equal(_labels(tmp_path / "onnx"), _labels(tmp_path / "torch"))
    assert len(np.unique(_labels(tmp_path / "torch"))) > 1


def test_predict_runs_an_explicit_onnx_file(onnx_work, tmp_path, capsys):
    work, inputs = onnx_work
    onnx_file = tmp_path / "exported" / "fold1.onnx"
    onnx_file.parent.mkdir()
    out = _cli("export", work, "--onnx", onnx_file, "--folds", "1")
    assert f"--onnx-model {onnx_file}" in out and not (work / "training" / "fold_1" / "model.onnx").exists()
    _cli("predict", "-m", work, "-i", inputs, "-o", tmp_path / "torch", "--folds", "1", "--device", "cpu")
    _cli("predict", "-m", work, "-i", inputs, "-o", tmp_path / "onnx", "--onnx-model", onnx_file)
    assert np.array_equal(_labels(tmp_path / "onnx"), _labels(tmp_path / "torch"))
    capsys.readouterr()
    assert main(["predict", "-m", str(work), "-i", str(inputs), "-o", str(tmp_path / "x"), "--backend", "torch",
                 "--onnx-model", str(onnx_file)]) != 0
    assert "--onnx-model runs ONNX files with onnxruntime" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"fold_0/model.onnx not found; export it first with 'voxseg export "
                                              r".* --onnx --folds 0 --checkpoint final', or give a file with "
                                              r"--onnx-model"):
        Predictor.from_workdir(work, folds=[0], backend="onnxruntime")


def test_archive_carries_the_onnx_files_and_the_installed_model_runs_them(onnx_work, tmp_path):
    work, inputs = onnx_work
    archive, installed = tmp_path / "model.zip", tmp_path / "installed"
    _cli("export", work, "--onnx", "--archive", archive, "--folds", "0,1")
    with zipfile.ZipFile(archive) as handle:
        manifest = json.loads(handle.read(MANIFEST))
        for fold in (0, 1):
            member = f"training/fold_{fold}/model.onnx"
            assert manifest["files"][member]["sha256"] == hashlib.sha256(handle.read(member)).hexdigest()
    _cli("install", archive, installed)
    assert (installed / "training" / "fold_0" / "model.onnx.sha256").is_file()  # verified again when loaded
    _cli("predict", "-m", work, "-i", inputs, "-o", tmp_path / "torch", "--folds", "0,1", "--device", "cpu")
    _cli("predict", "-m", installed, "-i", inputs, "-o", tmp_path / "onnx", "--folds", "0,1",
         "--backend", "onnxruntime")
    assert np.array_equal(_labels(tmp_path / "onnx"), _labels(tmp_path / "torch"))

    altered = tmp_path / "altered.zip"  # an ONNX member that does not match its digest
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(altered, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:-1] + bytes([data[-1] ^ 1]) if name.endswith("fold_1/model.onnx") else data)
    with pytest.raises(CheckpointError, match="'training/fold_1/model.onnx' does not match its SHA-256"):
        install_archive(altered, tmp_path / "refused")
    assert not (tmp_path / "refused" / "training").exists()


def test_onnx_member_with_external_data_is_refused(tmp_path):
    import onnx
    from onnx import helper

    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [2], np.array([1, 2], np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], [weight])
    (tmp_path / "made").mkdir()
    onnx.save_model(helper.make_model(graph), str(tmp_path / "made" / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    content = (tmp_path / "made" / "model.onnx").read_bytes()
    with pytest.raises(CheckpointError, match="'training/fold_0/model.onnx' keeps weights in external data files"):
        install_archive(_zip_with(tmp_path, "training/fold_0/model.onnx", content), tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_default_onnx_file_of_another_checkpoint_is_refused(onnx_work):
    work, _ = onnx_work
    export_onnx(work, 0, None, checkpoint="final")
    with pytest.raises(CheckpointError, match=r"exported from checkpoint_final.pt, not the checkpoint_best.pt asked "
                                              r"for; predict with --checkpoint final"):
        Predictor.from_workdir(work, folds=[0], checkpoint="best", backend="onnxruntime")
