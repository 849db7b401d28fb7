"""Networks: shapes (3D, 2D, anisotropic), deep supervision, residual encoder, layer factories, init,
autocast, channels_last_3d, ONNX parity and a tiny overfitting run."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from voxseg.errors import ConfigError
from voxseg.models import NETWORKS, build_network, count_parameters
from voxseg.models.blocks import ResidualBlock
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan

BRATS_REGIONS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}


def make_plan(
    features=(8, 16, 32),
    strides=None,
    kernels=None,
    ndim=3,
    channels=4,
    labels=None,
    patch=None,
    **network,
) -> Plan:
    n = len(features)
    strides = strides or [[1] * ndim] + [[2] * ndim] * (n - 1)
    kernels = kernels or [[3] * ndim] * n
    total = [math.prod(s[a] for s in strides) for a in range(ndim)]
    return Plan(
        dataset_name="test",
        raw_dataset="/nonexistent",
        channel_names={str(i): f"ch{i}" for i in range(channels)},
        labels=labels or LABELS,
        file_ending=".nii.gz",
        target_spacing=[1.0] * ndim,
        patch_size=patch or [2 * t for t in total],
        batch_size=2,
        network=NetworkPlan(features=list(features), kernel_sizes=kernels, strides=strides, **network),
        normalization=[ChannelNormalization() for _ in range(channels)],
    )


def test_registry_has_unet_and_rejects_unknown_name():
    assert "unet" in NETWORKS
    plan = make_plan()
    plan.network.name = "unte"
    with pytest.raises(ConfigError, match="did you mean 'unet'"):
        build_network(plan)


def test_3d_shapes_eval_and_deep_supervision():
    plan = make_plan(features=(4, 8, 16, 16))  # total stride 8, patch 16^3
    net = build_network(plan)
    x = torch.randn(2, 4, 16, 16, 16)
    net.train()
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 3  # one per decoder level, bottleneck excluded
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 16, 16, 16), (2, 4, 8, 8, 8), (2, 4, 4, 4, 4)]
    net.eval()
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (2, plan.num_outputs, 16, 16, 16)
    # Instance norm has no running statistics, so the training-mode full-resolution head equals eval output.
    torch.testing.assert_close(outputs[0].detach(), full, atol=1e-5, rtol=1e-5)


def test_deep_supervision_off_and_toggle():
    plan = make_plan(deep_supervision=False)
    net = build_network(plan).train()
    assert net.deep_supervision is False
    x = torch.randn(1, 4, 8, 8, 8)
    assert isinstance(net(x), torch.Tensor)
    net.deep_supervision = True
    assert len(net(x)) == 2
    assert build_network(plan, deep_supervision=True).deep_supervision is True


@pytest.mark.parametrize("deep_supervision", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_every_trainable_parameter_gets_a_gradient(deep_supervision, residual):
    """What DistributedDataParallel needs: no parameter that requires a gradient goes without one (with deep
    supervision off, the lower heads are frozen and toggling it back unfreezes them)."""
    plan = make_plan(features=(4, 8, 16), deep_supervision=deep_supervision, residual=residual)
    net = build_network(plan).train()
    outputs = net(torch.randn(2, 4, 8, 8, 8))
    loss = sum(o.sum() for o in outputs) if isinstance(outputs, list) else outputs.sum()
    loss.backward()
    without = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    assert frozen == ([] if deep_supervision else ["heads.0.weight", "heads.0.bias"])
    net.deep_supervision = True
    assert all(p.requires_grad for p in net.parameters())


def test_2d_network_shapes():
    plan = make_plan(ndim=2, channels=1, labels={"background": 0, "a": 1})
    net = build_network(plan).train()
    assert any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert not any(isinstance(m, nn.Conv3d) for m in net.modules())
    outputs = net(torch.randn(3, 1, 8, 8))
    assert [tuple(o.shape) for o in outputs] == [(3, 2, 8, 8), (3, 2, 4, 4)]


def test_anisotropic_strides_and_kernels():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    plan = make_plan(strides=strides, kernels=kernels, labels=BRATS_REGIONS, patch=[4, 8, 8])
    net = build_network(plan).train()
    first_conv = net.encoder[0][0][0]
    assert first_conv.kernel_size == (1, 3, 3) and first_conv.padding == (0, 1, 1)
    assert net.upsample[0].kernel_size == (2, 2, 2) and net.upsample[1].stride == (1, 2, 2)
    outputs = net(torch.randn(1, 4, 4, 8, 8))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 4, 8, 8), (1, 3, 4, 4, 4)]


def test_residual_encoder():
    plan = make_plan(residual=True)
    net = build_network(plan).train()
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 1 + 3 + 4  # nnU-Net ResEnc schedule for 3 stages
    # Stage transitions change stride and features, so they project the skip; the rest are identities.
    projected = [b for b in blocks if not isinstance(b.skip, nn.Identity)]
    assert len(projected) == 2 and projected[0].skip[0].stride == (2, 2, 2)
    assert projected[0].skip[0].kernel_size == (1, 1, 1)
    outputs = net(torch.randn(2, 4, 8, 8, 8))
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 8, 8, 8), (2, 4, 4, 4, 4)]
    small = build_network(plan, blocks_per_stage=1)
    assert sum(isinstance(m, ResidualBlock) for m in small.modules()) == 3
    assert count_parameters(small) < count_parameters(net)


def test_parameter_count_of_default_brats_plan():
    plan = make_plan(features=(32, 64, 128, 256, 320, 320), labels=BRATS_REGIONS, patch=[128, 128, 128])
    net = build_network(plan)
    # Measured 31,198,991, in line with nnU-Net's ~31M for BraTS 3d_fullres.
    assert 30_000_000 < count_parameters(net) < 32_500_000
    assert len(net.heads) == 5 and plan.network.total_stride == [32, 32, 32]  # the one definition
    net.heads[-1].weight.requires_grad_(False)  # full-resolution head: 32 -> 3
    assert count_parameters(net, trainable_only=False) - count_parameters(net) == 32 * 3


@pytest.mark.parametrize(
    ("norm", "layer"),
    [("instance", nn.InstanceNorm3d), ("batch", nn.BatchNorm3d), ("group", nn.GroupNorm), ("none", None)],
)
def test_norm_choice(norm, layer):
    net = build_network(make_plan(), norm=norm)
    norms = [m for m in net.modules() if isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm))]
    if layer is None:
        assert norms == []
    else:
        assert norms and all(type(m) is layer for m in norms)
    if norm == "instance":
        assert all(m.affine and m.eps == 1e-5 for m in norms)
    out = net.eval()(torch.randn(2, 4, 8, 8, 8))
    assert out.shape == (2, 4, 8, 8, 8) and torch.isfinite(out).all()


def test_bad_overrides_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'batch'"):
        build_network(make_plan(), norm="bach")
    with pytest.raises(ConfigError, match="did you mean 'norm'"):
        build_network(make_plan(), nrom="batch")
    with pytest.raises(ConfigError, match="blocks_per_stage"):
        build_network(make_plan(residual=True), blocks_per_stage=[1, 2])


def test_layers_and_init():
    net = build_network(make_plan(features=(16, 32, 64)))
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert all(m.bias is not None and torch.all(m.bias == 0) for m in convs)
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 and a.inplace for a in acts)
    # Kaiming normal with a=0.01: std = sqrt(2 / (1 + a^2) / fan_in).
    conv = net.encoder[2][1][0]  # 64 -> 64, 3^3 kernel: fan_in 1728, 110k weights
    expected = math.sqrt(2.0 / (1 + 1e-4) / (64 * 27))
    assert abs(conv.weight.std().item() / expected - 1) < 0.02


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    net = build_network(make_plan()).eval()
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        channels_last = net_cl(x.to(memory_format=torch.channels_last_3d))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()
    torch.testing.assert_close(channels_last, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notices
def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = build_network(make_plan(features=(4, 8)), deep_supervision=True).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.randn(1, 4, 8, 8, 8),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    x = torch.randn(3, 4, 8, 8, 8)  # a different batch size than exported with
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = net(x).numpy()
    assert onnx_out.shape == (3, 4, 8, 8, 8)
    assert abs(onnx_out - expected).max() < 1e-4


def test_tiny_network_overfits_a_blob():
    from voxseg.losses import build_loss

    torch.manual_seed(0)
    plan = make_plan(features=(8, 16), labels={"background": 0, "blob": 1})
    net = build_network(plan).train()
    loss_fn = build_loss("dice_ce", plan)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    target = ((grid - torch.tensor([8.0, 6.0, 9.0]).view(3, 1, 1, 1)).norm(dim=0) < 5).long()[None, None]
    image = torch.randn(1, 4, 16, 16, 16) * 0.5 + target.float()  # blob brighter than noise in all channels
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad(set_to_none=True)
        total, _ = loss_fn(net(image), target)
        total.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        foreground = net(image).softmax(1)[:, 1:]
    truth = target.float()
    soft_dice = (2 * (foreground * truth).sum() / (foreground.sum() + truth.sum())).item()
    assert soft_dice > 0.9
