"""The CPU forward variants: the same numbers as the network as built, and the measured choice with its cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from voxseg.infer.cpu_forward import (
    CpuForward,
    SampleInstanceNorm,
    cache_file,
    choose_variant,
    cpu_candidates,
    prepare_cpu_networks,
    replace_instance_norms,
)
from voxseg.models.unet import UNet, UNetTopology


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXSEG_CACHE_DIR", str(tmp_path / "cache"))


def _unet(seed: int = 0, ndim: int = 3) -> UNet:
    torch.manual_seed(seed)
    topology = UNetTopology(features=[4, 8, 16], kernel_sizes=[[3] * ndim] * 3, strides=[[1] * ndim] + [[2] * ndim] * 2)
    return UNet(2, 3, topology, deep_supervision=True).eval()


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_sample_instance_norm_equals_instance_norm(layout, affine, batch):
    torch.manual_seed(1)
    norm = nn.InstanceNorm3d(5, affine=affine, eps=1e-5)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(batch, 5, 6, 7, 8) * 3 + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    expected = norm(x.contiguous())
    got = SampleInstanceNorm(norm)(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_every_instance_norm_is_replaced_and_shares_its_parameters():
    net = _unet()
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    weights = [m.weight for m in norms]
    assert replace_instance_norms(net) == len(norms) > 0
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())
    replaced = [m for m in net.modules() if isinstance(m, SampleInstanceNorm)]
    assert all(a is b for a, b in zip(weights, [m.weight for m in replaced]))


@pytest.mark.parametrize("variant", ["fp32", "fp32-cl"])
def test_float32_variants_give_the_networks_logits(variant):
    reference = _unet(3)
    net = _unet(3)
    x = torch.randn(3, 2, 16, 16, 16)
    with torch.no_grad():
        expected = _first(reference(x))
        replace_instance_norms(net)
        got = CpuForward(net, variant)(x)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_bf16_variant_rounds_like_bfloat16_autocast():
    reference = _unet(4)
    net = _unet(4)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _first(reference(x)).float()
    with torch.no_grad():
        exact = _first(reference(x))
        replace_instance_norms(net)
        got = CpuForward(net, "bf16-cl")(x)
    assert got.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: the logits move by that rounding, as autocast's do, not more
    spread = (expected - exact).abs().max().item()
    assert 0 < (got - exact).abs().max().item() <= 2 * spread + 1e-3


def test_a_2d_network_runs_channels_last_on_4d_tiles():
    torch.manual_seed(5)
    topology = UNetTopology(features=[4, 8], kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])
    reference = UNet(1, 2, topology, deep_supervision=False).eval()
    net = UNet(1, 2, topology, deep_supervision=False).eval()
    net.load_state_dict(reference.state_dict())
    assert any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())
    x = torch.randn(2, 1, 24, 20)
    with torch.no_grad():
        expected = reference(x)
        (runner,) = prepare_cpu_networks([net], (1, 24, 20), ("fp32-cl",))
        got = runner(x)
    assert runner.variant == "fp32-cl"
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())
    assert torch.allclose(got, expected, atol=1e-4)


def test_the_fastest_candidate_is_chosen_and_kept(tmp_path):
    net = _unet()
    replace_instance_norms(net)
    calls: list[str] = []

    def timer(network, variant, sample):
        calls.append(variant)
        assert tuple(sample.shape) in [(8, 2, 16, 16, 16), (8, 2, 32, 16, 16)]  # small tiles: measured as a batch
        return {"fp32": 2.0, "fp32-cl": 1.0}[variant]

    lines: list[str] = []
    assert choose_variant(net, (2, 16, 16, 16), ("fp32", "fp32-cl"), timer, lines.append) == "fp32-cl"
    assert calls == ["fp32", "fp32-cl"]
    assert "fp32-cl 1.00 s, fp32 2.00 s -> fp32-cl" in lines[0]
    entries = json.loads(cache_file().read_text())
    (entry,) = entries.values()
    assert entry["variant"] == "fp32-cl" and entry["seconds"] == {"fp32": 2.0, "fp32-cl": 1.0}
    # the second time: read from the cache, nothing timed
    assert choose_variant(net, (2, 16, 16, 16), ("fp32", "fp32-cl"), timer, lines.append) == "fp32-cl"
    assert calls == ["fp32", "fp32-cl"] and len(lines) == 1
    # another input shape is another measurement
    choose_variant(net, (2, 32, 16, 16), ("fp32", "fp32-cl"), timer, lines.append)
    assert len(calls) == 4 and len(json.loads(cache_file().read_text())) == 2


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"k": "v"}'])
def test_a_damaged_cache_is_measured_again(content):
    net = _unet()
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text(content)
    calls: list[str] = []
    timer = lambda network, variant, sample: calls.append(variant) or {"fp32": 1.0, "fp32-cl": 3.0}[variant]  # noqa: E731
    assert choose_variant(net, (2, 16, 16, 16), ("fp32", "fp32-cl"), timer, lambda line: None) == "fp32"
    assert calls == ["fp32", "fp32-cl"]


def test_a_cached_variant_outside_the_candidates_is_not_taken():
    net = _unet()
    timer = lambda network, variant, sample: {"fp32": 2.0, "fp32-cl": 1.0, "bf16-cl": 0.5}[variant]  # noqa: E731
    assert choose_variant(net, (2, 16, 16, 16), ("fp32", "fp32-cl"), timer, lambda line: None) == "fp32-cl"
    assert choose_variant(net, (2, 16, 16, 16), ("bf16-cl",), timer, lambda line: None) == "bf16-cl"


def test_candidates_follow_the_precision():
    assert cpu_candidates(None) == ("fp32", "fp32-cl")
    assert cpu_candidates(torch.bfloat16) == ("bf16-cl",)
    assert cpu_candidates(None, "bf16-cl") == ("bf16-cl",)


def test_prepared_networks_measure_once_and_predict_the_same_labels():
    from voxseg.infer.sliding_window import sliding_window_inference

    nets = [_unet(6), _unet(7)]
    references = [_unet(6), _unet(7)]
    image = torch.randn(1, 2, 20, 24, 28)
    expected = sliding_window_inference(references, image, (16, 16, 16), 3)
    runners = prepare_cpu_networks(nets, (2, 16, 16, 16), ("fp32", "fp32-cl"))
    assert len({r.variant for r in runners}) == 1
    got = sliding_window_inference(runners, image, (16, 16, 16), 3)
    assert torch.allclose(got, expected, atol=1e-4)
    assert np.array_equal(got.argmax(0).numpy(), expected.argmax(0).numpy())
    assert len(json.loads(cache_file().read_text())) == 1


def test_an_unwritable_cache_still_gives_the_choice(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VOXSEG_CACHE_DIR", str(blocker / "below"))  # a folder under a file: cannot be made
    timer = lambda network, variant, sample: {"fp32": 2.0, "fp32-cl": 1.0}[variant]  # noqa: E731
    assert choose_variant(_unet(), (2, 16, 16, 16), ("fp32", "fp32-cl"), timer, lambda line: None) == "fp32-cl"
    assert "could not keep the CPU forward choice" in capsys.readouterr().err


def test_without_a_home_the_cache_goes_to_the_temporary_folder(monkeypatch, tmp_path):
    import tempfile
    from pathlib import Path

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("VOXSEG_CACHE_DIR")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cache_file() == tmp_path / "voxseg-cache" / "cpu_forward.json"


def test_large_tiles_run_one_at_a_time_and_small_ones_as_a_batch(monkeypatch):
    import voxseg.infer.cpu_forward as cpu_forward

    net = _unet(8)
    replace_instance_norms(net)
    runner = CpuForward(net, "fp32-cl")
    batches: list[int] = []
    monkeypatch.setattr(runner, "_sample", lambda x: batches.append(x.shape[0]) or torch.zeros(x.shape[0], 3, 1))
    runner(torch.zeros(3, 2, 16, 16, 16))
    assert batches == [3]
    monkeypatch.setattr(cpu_forward, "SAMPLE_ALONE_VOXELS", 16**3)
    batches.clear()
    runner(torch.zeros(3, 2, 16, 16, 16))
    assert batches == [1, 1, 1]
