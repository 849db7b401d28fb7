"""Each batched fast path against the simple path it replaces.

- sliding window: tiles x mirrors x folds batched into one forward call vs a per-tile, per-mirror, per-model
  loop accumulating in float64;
- augmentation: one batched call (only the rows each transform fires for) vs each sample alone with its own
  draws, and vs the simple path computing every transform for every sample (voxseg.augment.reference);
- patch sampler: crops staged on the host and moved in one copy (the pinned / mmap path on a GPU) vs crops
  written straight into the batch (the gpu-cache path).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from voxseg.augment import AugmentConfig, apply_augment, draw_batch_params, source_size
from voxseg.augment.reference import augment_reference
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.infer.config import Tiling
from voxseg.infer.sliding_window import (
    gaussian_importance,
    mirror_combinations,
    pad_to_patch,
    sliding_window_inference,
    tile_positions,
)
from voxseg.models import build_network
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.train.cache import CaseCache
from voxseg.train.sampler import ForegroundSampling, PatchSampler


# ----- sliding window ---------------------------------------------------------------------------------------
def per_tile_reference(models, image, patch, num_outputs, step, mirror_axes, use_gaussian):
    """The simple path: one tile, one mirror, one model per forward call; float64 accumulators."""
    padded, crop = pad_to_patch(image, patch)
    spatial_shape = padded.shape[2:]
    weight = gaussian_importance(patch).double() if use_gaussian else torch.ones(patch, dtype=torch.float64)
    logits = torch.zeros((num_outputs, *spatial_shape), dtype=torch.float64)
    weight_sum = torch.zeros(spatial_shape, dtype=torch.float64)
    with torch.no_grad():
        for start in tile_positions(spatial_shape, patch, step):
            window = tuple(slice(s, s + p) for s, p in zip(start, patch))
            tile = padded[(slice(None), slice(None), *window)]  # (1, C, *P)
            outputs = []
            for model in models:
                for combo in mirror_combinations(mirror_axes):
                    dims = [a + 2 for a in combo]
                    out = model(tile.flip(dims)).flip(dims) if combo else model(tile)
                    outputs.append(out[0].double())
            logits[(slice(None), *window)] += torch.stack(outputs).mean(0) * weight
            weight_sum[window] += weight
    return (logits / weight_sum)[(slice(None), *crop)].float()


def _unet(seed: int, ndim: int = 3) -> torch.nn.Module:
    plan = Plan(
        dataset_name="T", raw_dataset="/nowhere", channel_names={"0": "A", "1": "B"},
        labels={"background": 0, "a": 1, "b": 2}, file_ending=".nii.gz", target_spacing=[1.0] * ndim,
        patch_size=[8] * ndim, batch_size=2,
        network=NetworkPlan(features=[4, 8, 8], kernel_sizes=[[3] * ndim] * 3,
                            strides=[[1] * ndim, [2] * ndim, [2] * ndim], conv_per_stage=1),
        normalization=[ChannelNormalization(), ChannelNormalization()],
    )
    torch.manual_seed(seed)
    net = build_network(plan, deep_supervision=True).eval()
    with torch.no_grad():  # non-zero biases and norms so that tile borders and flips change the output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("shape, patch, step, tile_batch, mirror_axes, folds, gaussian", [
    ((19, 30, 7), (8, 12, 8), 0.5, 4, (0, 1, 2), 2, True),  # last axis padded, partial last tile batch
    ((13, 10, 15), (8, 8, 8), 0.33, 1, (1,), 1, False),
    ((12, 20, 16), (12, 8, 16), 1.0, 7, (0, 2), 3, True),
])
def test_batched_sliding_window_matches_a_per_tile_loop(shape, patch, step, tile_batch, mirror_axes, folds, gaussian):
    models = [_unet(seed) for seed in range(folds)]
    image = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    fast = sliding_window_inference(models, image, patch, 3,
                                    Tiling(step, tile_batch, mirror_axes, use_gaussian=gaussian))
    simple = per_tile_reference(models, image, patch, 3, step, mirror_axes, gaussian)
    assert fast.shape == (3, *shape)
    torch.testing.assert_close(fast, simple, atol=2e-5, rtol=1e-5)
    # the comparison can fail: the network's output depends on where a tile starts and on mirroring
    unmirrored = per_tile_reference(models, image, patch, 3, step, (), gaussian)
    assert (simple - unmirrored).abs().max() > 1e-3


def test_2d_network_over_a_volume_matches_a_per_slice_per_tile_loop():
    net = _unet(5, ndim=2)
    image = torch.randn(1, 2, 3, 21, 9, generator=torch.Generator().manual_seed(1))
    fast = sliding_window_inference(net, image, (8, 8), 3, Tiling(0.5, 3, (0, 1)))
    simple = torch.stack([per_tile_reference([net], image[:, :, d], (8, 8), 3, 0.5, (0, 1), True)
                          for d in range(image.shape[2])], dim=1)
    torch.testing.assert_close(fast, simple, atol=2e-5, rtol=1e-5)


# ----- augmentation -------------------------------------------------------------------------------------------
TRANSFORMS = ["rotation_p", "scale_p", "elastic_p", "mirror_p", "rot90_p", "noise_p", "blur_p", "brightness_p",
              "contrast_p", "low_res_p", "gamma_p", "inverted_gamma_p"]
FIRED = ["rotate", "scaled", "elastic", "flips", "rot90", "noise", "brightness", "contrast", "gamma", "inverted_gamma"]


@pytest.mark.parametrize("patch, p", [((12, 12, 10), 0.2), ((12, 12, 10), 0.5), ((12, 12, 10), 1.0), ((16, 16), 0.3)])
def test_batched_augmentation_matches_per_sample_application(patch, p):
    """One batch (only the rows each transform fires for) vs each sample alone with its own draws, and vs the
    simple path that computes every transform for every sample and keeps it with torch.where."""
    config = AugmentConfig(**{name: p for name in TRANSFORMS}, blur_per_channel_p=0.5, low_res_per_channel_p=0.5)
    size = source_size(patch, config)
    generator = torch.Generator().manual_seed(11)
    batch = 6
    image = torch.randn(batch, 2, *size, generator=generator) * 2 + 1
    seg = torch.randint(-1, 4, (batch, 1, *size), generator=generator, dtype=torch.int8)
    params = draw_batch_params(batch, 2, patch, config, np.random.default_rng(11))
    if p == 1.0:  # every per-sample transform fires for every sample
        assert all(getattr(params, name).all() for name in FIRED)
    fast_image, fast_seg = apply_augment(image, seg, params, config, patch)
    for b in range(batch):
        one_image, one_seg = apply_augment(image[b:b + 1], seg[b:b + 1], params.subset(b, b + 1), config, patch)
        torch.testing.assert_close(one_image[0], fast_image[b], atol=1e-5, rtol=1e-5)
        assert torch.equal(one_seg[0], fast_seg[b])
    simple_image, simple_seg = augment_reference(image, seg, params, config, patch)
    torch.testing.assert_close(simple_image, fast_image, atol=1e-5, rtol=1e-5)
    assert torch.equal(simple_seg, fast_seg)
    # the comparison can fail: samples were augmented differently
    assert not torch.allclose(fast_image[0], fast_image[1])


# ----- patch sampler ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(4)
    for index, shape in enumerate([(20, 17, 23), (9, 30, 12)]):
        seg = np.zeros((1, *shape), np.int8)
        seg[0, 2:7, 3:9, 4:10] = 1
        seg[0, 0] = -1
        image = rng.normal(size=(2, *shape)).astype(np.float32)
        save_case(directory, f"c{index}", image, seg, {"name": f"c{index}"},
                  sample_foreground_locations(seg, [1]), image_dtype="float16")
    return directory


@pytest.mark.parametrize("mode", ["gpu", "pinned", "mmap"])
def test_host_staged_batches_match_direct_crops(store, monkeypatch, mode):
    cache = CaseCache(store, ["c0", "c1"], "cpu", mode=mode)

    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        sampler = PatchSampler(cache, (12, 12, 12), 3, foreground=ForegroundSampling(0.5), source_size=(16, 14, 16),
                               seed=2)
        return [sampler.sample() for _ in range(4)]

    direct = batches()
    monkeypatch.setattr(CaseCache, "on_device", property(lambda self: False))  # the CUDA pinned/mmap path
    staged = batches()
    for (image, seg), (image_staged, seg_staged) in zip(direct, staged):
        assert image_staged.dtype == torch.float32 and seg_staged.dtype == torch.int8
        assert torch.equal(image, image_staged) and torch.equal(seg, seg_staged)
    assert (direct[0][1] == -1).any() and (direct[0][1] == 1).any()  # padding and foreground were cropped
