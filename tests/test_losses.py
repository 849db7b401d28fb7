"""Losses: every name builds and backprops, perfect vs random predictions, ignore label, -1 background, region
targets, term weights, deep-supervision weights and target downsampling, bf16 autocast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from voxseg.errors import ConfigError
from voxseg.losses import LOSSES, DeepSupervisionLoss, build_loss, downsample_target
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan

LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}
LABELS_IGNORE = {"background": 0, "edema": 1, "core": 2, "ignore": 3}
REGIONS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
NAMES = sorted(LOSSES.names())


def make_plan(labels=None) -> Plan:
    return Plan(
        dataset_name="test",
        raw_dataset="/nonexistent",
        channel_names={"0": "T1"},
        labels=labels or LABELS,
        file_ending=".nii.gz",
        target_spacing=[1.0, 1.0, 1.0],
        patch_size=[8, 8, 8],
        batch_size=2,
        network=NetworkPlan(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]]),
        normalization=[ChannelNormalization()],
    )


def random_target(shape=(2, 1, 8, 8, 8), high=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g).to(torch.int8)


def region_targets(target: torch.Tensor, regions) -> torch.Tensor:
    """(B, 1, *P) label map -> (B, R, *P) float32 with r_k = isin(target, regions[k])."""
    return torch.cat([torch.isin(target, torch.tensor(r)) for r in regions], 1).float()


def perfect_logits(target: torch.Tensor, plan: Plan, scale: float = 20.0) -> torch.Tensor:
    """Logits that put (almost) all probability on the true class / region membership."""
    if plan.is_region_based:
        return (region_targets(target.long(), plan.regions) * 2 - 1) * scale
    onehot = F.one_hot(target.long().clamp_min(0)[:, 0], plan.num_outputs).movedim(-1, 1).float()
    return (onehot * 2 - 1) * scale


@pytest.mark.parametrize("labels", [LABELS, REGIONS], ids=["labels", "regions"])
@pytest.mark.parametrize("name", NAMES)
def test_every_loss_builds_backprops_and_orders_predictions(name, labels):
    plan = make_plan(labels)
    loss = build_loss(name, plan, deep_supervision=False)
    target = random_target()
    logits = torch.randn(2, plan.num_outputs, 8, 8, 8, requires_grad=True)
    total, parts = loss(logits, target)
    total.backward()
    assert total.ndim == 0 and torch.isfinite(total)
    assert set(parts) == set(LOSSES.get(name).weights)
    assert all(v.ndim == 0 and not v.requires_grad for v in parts.values())
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    best, best_parts = loss(perfect_logits(target, plan), target)
    assert best < 0.01 < total
    assert all(v < 0.01 for v in best_parts.values())


def test_dice_ce_values_match_hand_computation():
    plan = make_plan()
    target = random_target(seed=1)
    logits = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    total, parts = build_loss("dice_ce", plan, deep_supervision=False)(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target.long()[:, 0], 4).movedim(-1, 1).float()
    tp = (probs * onehot).sum((0, 2, 3, 4))
    denominator = probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4))
    dice = ((2 * tp + 1e-5) / (denominator + 1e-5))[1:].mean()  # batch Dice, background excluded
    ce = F.cross_entropy(logits, target.long()[:, 0])
    torch.testing.assert_close(parts["dice"], 1 - dice)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(total, 1 - dice + ce)


def test_minus_one_is_background():
    plan = make_plan()
    target = random_target(seed=3)
    outside = target.clone()
    outside[target == 0] = -1
    logits = torch.randn(2, 4, 8, 8, 8)
    loss = build_loss("dice_ce", plan, deep_supervision=False)
    torch.testing.assert_close(loss(logits, outside)[0], loss(logits, target)[0])


@pytest.mark.parametrize("name", NAMES)
def test_ignore_label_is_excluded(name):
    plan = make_plan(LABELS_IGNORE)
    assert plan.ignore_label == 3 and plan.num_outputs == 3
    target = random_target(seed=4)  # values 0..3, 3 = ignore
    ignored = target == 3
    assert ignored.any()
    loss = build_loss(name, plan, deep_supervision=False)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    total, _ = loss(logits, target)
    total.backward()
    changed = logits.detach() + 50.0 * torch.randn_like(logits) * ignored
    torch.testing.assert_close(loss(changed, target)[0], total.detach())
    assert torch.all(logits.grad[ignored.expand_as(logits)] == 0)
    # Perfect on the rest is still perfect, whatever the ignored voxels predict.
    perfect = perfect_logits(target.masked_fill(ignored, 0), plan) + 30.0 * torch.randn_like(logits) * ignored
    assert loss(perfect, target)[0] < 0.01


def test_region_targets_and_sigmoid_terms():
    plan = make_plan(REGIONS)
    target = torch.tensor([-1, 0, 1, 2, 3]).view(1, 1, 5, 1, 1)
    regions = region_targets(target, plan.regions)[0, :, :, 0, 0]
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(regions, expected)
    logits = torch.randn(1, 3, 5, 1, 1)
    _, parts = build_loss("dice_ce", plan, deep_supervision=False)(logits, target)
    torch.testing.assert_close(parts["ce"], F.binary_cross_entropy_with_logits(logits[:, :, :, 0, 0], expected[None]))
    probs = logits.sigmoid()[0, :, :, 0, 0]
    tp = (probs * expected).sum(1)
    dice = (2 * tp + 1e-5) / (probs.sum(1) + expected.sum(1) + 1e-5)
    torch.testing.assert_close(parts["dice"], 1 - dice.mean())


def test_focal_and_tversky_definitions():
    plan = make_plan()
    target = random_target(seed=5)
    logits = torch.randn(2, 4, 8, 8, 8)
    _, focal = build_loss("focal", plan, deep_supervision=False)(logits, target)
    log_pt = logits.log_softmax(1).gather(1, target.long())
    torch.testing.assert_close(focal["focal"], (-((1 - log_pt.exp()) ** 2) * log_pt).mean())
    # gamma 0 and no alpha reduces focal loss to cross-entropy.
    _, zero = build_loss("focal", plan, deep_supervision=False, focal_gamma=0.0)(logits, target)
    torch.testing.assert_close(zero["focal"], F.cross_entropy(logits, target.long()[:, 0]))
    # alpha: a float weights foreground voxels by alpha and background by 1 - alpha; a list weights per class.
    _, weighted = build_loss("focal", plan, deep_supervision=False, focal_alpha=0.75)(logits, target)
    per_voxel = -((1 - log_pt.exp()) ** 2) * log_pt * torch.where(target > 0, 0.75, 0.25)
    torch.testing.assert_close(weighted["focal"], per_voxel.mean())
    _, listed = build_loss("focal", plan, deep_supervision=False, focal_alpha=[0.25, 0.75, 0.75, 0.75])(logits, target)
    torch.testing.assert_close(listed["focal"], weighted["focal"])
    with pytest.raises(ConfigError, match="focal_alpha has 2 entries"):
        build_loss("focal", plan, focal_alpha=[0.5, 0.5])
    # Tversky with alpha = beta = 0.5 is Dice.
    _, tv = build_loss("tversky", plan, deep_supervision=False, tversky_alpha=0.5, tversky_beta=0.5)(logits, target)
    _, dice = build_loss("dice", plan, deep_supervision=False)(logits, target)
    torch.testing.assert_close(tv["tversky"], dice["dice"])
    # The default (alpha 0.3, beta 0.7) penalises missed foreground more than false alarms.
    binary = make_plan({"background": 0, "lesion": 1})
    lesion = torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
    lesion[:, :, :4] = 1
    depth = torch.arange(8).view(1, 1, 8, 1, 1).expand_as(lesion)
    tversky = build_loss("tversky", binary, deep_supervision=False)
    missed_half = perfect_logits((depth < 2).to(torch.uint8), binary)  # tp = fn = T/2
    extra_half = perfect_logits((depth < 6).to(torch.uint8), binary)  # tp = T, fp = T/2
    assert tversky(missed_half, lesion)[0].item() == pytest.approx(1 - 0.5 / (0.5 + 0.7 * 0.5), abs=1e-4)
    assert tversky(extra_half, lesion)[0].item() == pytest.approx(1 - 1 / (1 + 0.3 * 0.5), abs=1e-4)


def test_term_weights_and_validation():
    plan = make_plan()
    target = random_target()
    logits = torch.randn(2, 4, 8, 8, 8)
    total, parts = build_loss("dice_ce", plan, weights={"ce": 0.25}, deep_supervision=False)(logits, target)
    torch.testing.assert_close(total, parts["dice"] + 0.25 * parts["ce"])
    with pytest.raises(ConfigError, match="'focal'"):
        build_loss("dice_ce", plan, weights={"focal": 1.0})
    with pytest.raises(ConfigError, match="did you mean 'dice_ce'"):
        build_loss("dice_cee", plan)
    with pytest.raises(ConfigError, match="did you mean 'smooth'"):
        build_loss("dice", plan, smoth=1.0)
    assert sorted(LOSSES.names()) == NAMES


def test_deep_supervision_weights_and_targets():
    plan = make_plan()
    loss = build_loss("dice_ce", plan)
    assert isinstance(loss, DeepSupervisionLoss)
    assert loss.output_weights(1) == [1.0]
    w = loss.output_weights(4)  # 1, 1/2, 1/4, (1/8 -> 0), normalised by 1.75
    assert w == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])

    target = random_target((2, 1, 16, 16, 8), seed=6)
    small = downsample_target(target, (8, 8, 4))
    assert small.shape == (2, 1, 8, 8, 4) and small.dtype == torch.int8
    torch.testing.assert_close(small, target[:, :, ::2, ::2, ::2])
    odd = downsample_target(target, (5, 5, 3))  # not a divisor: nearest-exact interpolation
    assert odd.shape == (2, 1, 5, 5, 3) and set(odd.unique().tolist()) <= set(target.unique().tolist())

    outputs = [torch.randn(2, 4, 16, 16, 8), torch.randn(2, 4, 8, 8, 4), torch.randn(2, 4, 4, 4, 2)]
    total, parts = loss(outputs, target)
    single = build_loss("dice_ce", plan, deep_supervision=False)
    per_level = [single(o, downsample_target(target, o.shape[2:])) for o in outputs]
    expected = (per_level[0][0] + 0.5 * per_level[1][0]) / 1.5
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["ce"], (per_level[0][1]["ce"] + 0.5 * per_level[1][1]["ce"]) / 1.5)
    # A single tensor passes through unweighted.
    torch.testing.assert_close(loss(outputs[0], target)[0], per_level[0][0])


def test_bf16_autocast_computes_in_float32():
    plan = make_plan(REGIONS)
    target = random_target(seed=7)
    logits = torch.randn(2, 3, 8, 8, 8)
    reference, _ = build_loss("dice_ce", plan)(logits, target)
    for name in NAMES:
        loss = build_loss(name, plan)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = logits.to(torch.bfloat16).requires_grad_(True)
            total, parts = loss([low, low[:, :, ::2, ::2, ::2]], target)
        total.backward()
        assert total.dtype == torch.float32 and torch.isfinite(total)
        assert torch.isfinite(low.grad.float()).all()
        if name == "dice_ce":
            # Only the bf16 rounding of the logits differs from the float32 result.
            assert math.isclose(total.item(), reference.item(), rel_tol=1e-2)
