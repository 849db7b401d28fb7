"""Each batched fast path against the simple path it replaces.

- sliding window: tiles x mirrors x folds batched into one forward call vs a per-tile, per-mirror, per-model
  loop accumulating in float64;
- augmentation: one batched call vs the same transforms applied to each sample alone with the same random
  draws (recorded from the batched call and replayed one sample at a time);
- patch sampler: crops staged on the host and moved in one copy (the pinned / mmap path on a GPU) vs crops
  written straight into the batch (the gpu-cache path).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

import voxseg.augment.intensity as intensity
import voxseg.augment.spatial as spatial
from voxseg.augment import AugmentConfig, augment_batch, source_size
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.infer.sliding_window import (
    gaussian_importance,
    mirror_combinations,
    pad_to_patch,
    sliding_window_inference,
    tile_positions,
)
from voxseg.models import build_network
from voxseg.train.cache import CaseCache
from voxseg.train.sampler import PatchSampler


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
    fast = sliding_window_inference(models, image, patch, 3, step=step, tile_batch=tile_batch,
                                    mirror_axes=mirror_axes, use_gaussian=gaussian)
    simple = per_tile_reference(models, image, patch, 3, step, mirror_axes, gaussian)
    assert fast.shape == (3, *shape)
    torch.testing.assert_close(fast, simple, atol=2e-5, rtol=1e-5)
    # the comparison can fail: the network's output depends on where a tile starts and on mirroring
    unmirrored = per_tile_reference(models, image, patch, 3, step, (), gaussian)
    assert (simple - unmirrored).abs().max() > 1e-3


def test_2d_network_over_a_volume_matches_a_per_slice_per_tile_loop():
    net = _unet(5, ndim=2)
    image = torch.randn(1, 2, 3, 21, 9, generator=torch.Generator().manual_seed(1))
    fast = sliding_window_inference(net, image, (8, 8), 3, step=0.5, tile_batch=3, mirror_axes=(0, 1))
    simple = torch.stack([per_tile_reference([net], image[:, :, d], (8, 8), 3, 0.5, (0, 1), True)
                          for d in range(image.shape[2])], dim=1)
    torch.testing.assert_close(fast, simple, atol=2e-5, rtol=1e-5)


# ----- augmentation -------------------------------------------------------------------------------------------
class DrawRecorder:
    """Wraps every random draw of the augmentation: records them for a batch, then replays sample b's slice.

    Every draw has the batch as its first axis, so sample b alone gets row b of each draw in the same order.
    """

    def __init__(self) -> None:
        self.draws: list[torch.Tensor] = []
        self.sample: int | None = None  # None: recording
        self.position = 0

    def wrap(self, real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def draw(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = real(*args, **kwargs)
            if self.sample is None:
                self.draws.append(out)
                return out
            recorded = self.draws[self.position]
            self.position += 1
            assert out.shape[0] == 1 and out.shape[1:] == recorded.shape[1:], "draws out of order"
            return recorded[self.sample:self.sample + 1].clone()
        return draw

    def replay(self, sample: int) -> None:
        self.sample, self.position = sample, 0


@pytest.fixture
def recorder(monkeypatch):
    rec = DrawRecorder()
    for module in (spatial, intensity):
        monkeypatch.setattr(module, "random_uniform", rec.wrap(spatial.random_uniform))
        monkeypatch.setattr(module, "random_mask", rec.wrap(spatial.random_mask))
    monkeypatch.setattr(torch, "randn", rec.wrap(torch.randn))
    monkeypatch.setattr(torch, "randint", rec.wrap(torch.randint))
    return rec


TRANSFORMS = ["rotation_p", "scale_p", "elastic_p", "mirror_p", "rot90_p", "noise_p", "blur_p", "brightness_p",
              "contrast_p", "low_res_p", "gamma_p", "inverted_gamma_p"]


@pytest.mark.parametrize("patch, p", [((12, 12, 10), 0.2), ((12, 12, 10), 0.5), ((12, 12, 10), 1.0), ((16, 16), 0.3)])
def test_batched_augmentation_matches_per_sample_application(recorder, patch, p):
    config = AugmentConfig(**{name: p for name in TRANSFORMS}, blur_per_channel_p=0.5, low_res_per_channel_p=0.5)
    size = source_size(patch, config)
    generator = torch.Generator().manual_seed(11)
    batch = 6
    image = torch.randn(batch, 2, *size, generator=generator) * 2 + 1
    seg = torch.randint(-1, 4, (batch, 1, *size), generator=generator, dtype=torch.int8)
    recorder.draws.clear()  # the inputs above went through the wrapped torch.randn / torch.randint
    fast_image, fast_seg = augment_batch(image, seg, config, generator, patch)
    assert len(recorder.draws) > 10  # every transform drew its parameters
    for b in range(batch):
        recorder.replay(b)
        one_image, one_seg = augment_batch(image[b:b + 1], seg[b:b + 1], config, generator, patch)
        assert recorder.position == len(recorder.draws)
        torch.testing.assert_close(one_image[0], fast_image[b], atol=1e-5, rtol=1e-5)
        assert torch.equal(one_seg[0], fast_seg[b])
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
        sampler = PatchSampler(cache, (12, 12, 12), 3, foreground_fraction=0.5, source_size=(16, 14, 16), seed=2)
        return [sampler.sample() for _ in range(4)]

    direct = batches()
    monkeypatch.setattr(CaseCache, "on_device", property(lambda self: False))  # the CUDA pinned/mmap path
    staged = batches()
    for (image, seg), (image_staged, seg_staged) in zip(direct, staged):
        assert image_staged.dtype == torch.float32 and seg_staged.dtype == torch.int8
        assert torch.equal(image, image_staged) and torch.equal(seg, seg_staged)
    assert (direct[0][1] == -1).any() and (direct[0][1] == 1).any()  # padding and foreground were cropped
