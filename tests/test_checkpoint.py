"""Checkpoints: atomic writes, weights_only loading, clear errors, RNG state round trip, pretrained report."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch
from torch import nn

from voxseg import checkpoint as ckpt
from voxseg.checkpoint import (
    RngStates,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from voxseg.errors import CheckpointError
from voxseg.pretrained import load_pretrained


def _net(out_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, out_channels, 1))


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    model = _net()
    state = {"model": model.state_dict(), "epoch": 3, "best_metric": 0.5, "config": {"optim": {"lr": 0.01}},
             "history": [1.0, None], "rng": rng_state()}
    path = save_checkpoint(tmp_path / "sub" / "checkpoint_latest.pt", state)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["checkpoint_latest.pt"]  # no temp left
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["config"] == {"optim": {"lr": 0.01}} and loaded["history"] == [1.0, None]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]


def test_missing_corrupt_and_unsafe_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a zip file at all")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt is corrupt"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, {"model": _net().state_dict()})
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"object": argparse.Namespace(a=1)}, unsafe)  # arbitrary objects are refused by weights_only loading
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        load_checkpoint(unsafe)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": RngStates().state_dict()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    RngStates().load_state_dict(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_rng_state_of_an_earlier_version_with_named_generators_still_loads(tmp_path):
    """Checkpoints written before the named-generator path was removed hold "generators" (empty in practice, a
    torch generator's state at most): it is ignored, and the global states are restored."""
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    older = {**rng_state(), "generators": {"sampler": torch.Generator().manual_seed(3).get_state()}}
    save_checkpoint(tmp_path / "older.pt", {"rng": older})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "older.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert "generators" not in RngStates().state_dict()  # new checkpoints no longer write it


def test_pretrained_loads_matching_shapes_and_reports_the_rest(tmp_path):
    torch.manual_seed(0)
    source = _net(out_channels=3)
    save_checkpoint(tmp_path / "pre.pt", {"model": {"_orig_mod." + k: v for k, v in source.state_dict().items()},
                                          "epoch": 5})
    torch.manual_seed(1)
    target = _net(out_channels=5)  # a different number of outputs: the last layer cannot be loaded
    target.register_buffer("extra", torch.zeros(1))
    last_weight = target[2].weight.detach().clone()
    report = load_pretrained(target, tmp_path / "pre.pt")
    assert sorted(report.loaded) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert sorted(n for n, _, _ in report.mismatched) == ["2.bias", "2.weight"]
    assert ("2.weight", [3, 4, 1, 1, 1], [5, 4, 1, 1, 1]) in report.mismatched
    assert report.missing == ["extra"] and report.unexpected == []
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[2].weight, last_weight)  # kept as initialised
    text = report.summary()
    assert "4 tensors loaded" in text and "2.weight (3, 4, 1, 1, 1) vs model (5, 4, 1, 1, 1)" in text


def test_pretrained_from_an_unrelated_network_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "other.pt", {"layer.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(_net(), tmp_path / "other.pt")


class _Counter:
    """A stateful object as the checkpointer sees it."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = int(state["value"])


def _checkpointer(directory, value=0, plan=None, optimizer="sgd", **kwargs):
    objects = {"counter": _Counter(value), "model": _net()}
    metadata = {"plan": plan or {"batch_size": 2, "network": {"residual": False}},
                "config": {"optim": {"name": optimizer}}}
    return ckpt.Checkpointer(directory, objects, metadata, **kwargs)


def test_checkpointer_saves_and_restores_every_object(tmp_path):
    source = _checkpointer(tmp_path, value=7)
    path = source.save("latest")
    assert path == tmp_path / "checkpoint_latest.pt"
    state = load_checkpoint(path)
    assert state["format"] == ckpt.CHECKPOINT_FORMAT and state["counter"] == {"value": 7}
    assert state["plan"]["batch_size"] == 2 and state["config"]["optim"]["name"] == "sgd"
    target = _checkpointer(tmp_path, value=0)
    target.restore("latest")
    assert target.objects["counter"].value == 7
    for name, tensor in source.objects["model"].state_dict().items():
        assert torch.equal(target.objects["model"].state_dict()[name], tensor)


def test_checkpointer_refuses_another_plan_optimiser_or_format(tmp_path):
    _checkpointer(tmp_path).save("latest")
    changed = {"batch_size": 4, "network": {"residual": True}}
    with pytest.raises(CheckpointError, match=r"another plan.*batch_size: 2 -> 4; network.residual: False -> True"):
        _checkpointer(tmp_path, plan=changed).restore("latest")
    with pytest.raises(CheckpointError, match="optim.name=sgd but this run uses adamw"):
        _checkpointer(tmp_path, optimizer="adamw").restore("latest")
    save_checkpoint(tmp_path / "checkpoint_old.pt", {"model": _net().state_dict(), "epoch": 3})
    with pytest.raises(CheckpointError, match="has no counter state"):
        _checkpointer(tmp_path).restore("old")
    with pytest.raises(CheckpointError, match="does not exist: nothing to resume"):
        _checkpointer(tmp_path).restore("missing")


def test_checkpointer_keeps_the_newest_snapshots_and_writes_only_where_enabled(tmp_path):
    keeper = _checkpointer(tmp_path / "a", keep_snapshots=2)
    for epoch in (10, 20, 30, 40):
        keeper.objects["counter"].value = epoch
        keeper.snapshot(epoch)
    assert [p.name for p in keeper.snapshots()] == ["checkpoint_epoch_30.pt", "checkpoint_epoch_40.pt"]
    assert load_checkpoint(tmp_path / "a" / "checkpoint_epoch_40.pt")["counter"] == {"value": 40}
    assert _checkpointer(tmp_path / "b").snapshot(10) is None  # keep_snapshots=0: no snapshots
    silent = _checkpointer(tmp_path / "c", enabled=False)
    assert silent.save("latest") is None and not (tmp_path / "c").exists()


def test_network_from_checkpoint_rebuilds_the_trained_network(tmp_path):
    from test_train import _plan
    from voxseg.models import build_network

    plan = _plan()
    trained = build_network(plan)
    save_checkpoint(tmp_path / "c.pt", {"model": {"_orig_mod." + k: v for k, v in trained.state_dict().items()},
                                        "plan": plan.to_dict()})
    network, loaded_plan, _ = ckpt.network_from_checkpoint(tmp_path / "c.pt")
    assert loaded_plan == plan and not network.training and network.deep_supervision is False
    x = torch.randn(1, 2, 16, 16, 16)
    trained.eval().deep_supervision = False
    torch.testing.assert_close(network(x), trained(x))
    save_checkpoint(tmp_path / "bare.pt", {"model": trained.state_dict()})
    with pytest.raises(CheckpointError, match="holds no plan"):
        ckpt.network_from_checkpoint(tmp_path / "bare.pt")
