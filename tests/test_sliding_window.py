"""Sliding-window inference: tiling, Gaussian blending, mirrored TTA and fold ensembling."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from voxseg.infer.config import Tiling
from voxseg.infer.sliding_window import (
    axis_starts,
    gaussian_importance,
    mirror_combinations,
    pad_to_patch,
    sliding_window_inference,
    tile_positions,
)


def _coverage(shape, patch, step):
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    count = np.zeros(padded, dtype=int)
    for start in tile_positions(shape, patch, step):
        count[tuple(slice(s, s + p) for s, p in zip(start, patch))] += 1
    return count


@pytest.mark.parametrize(
    "shape, patch, step",
    [((40, 40, 40), (16, 16, 16), 0.5), ((17, 33, 9), (8, 16, 8), 0.5), ((5, 7, 3), (8, 8, 8), 0.5),
     ((31, 20, 45), (16, 12, 10), 0.33), ((16, 16, 16), (16, 16, 16), 0.5), ((50, 13, 29), (7, 5, 11), 1.0)],
)
def test_tiles_cover_every_voxel_and_stay_inside(shape, patch, step):
    count = _coverage(shape, patch, step)
    assert count.min() >= 1
    for start in tile_positions(shape, patch, step):
        for s, p, size in zip(start, patch, shape):
            assert 0 <= s and s + p <= max(size, p)


def test_axis_starts_are_even_and_respect_step():
    assert axis_starts(100, 64, 0.5) == [0, 18, 36]  # ceil(36 / 32) + 1 = 3 tiles
    assert axis_starts(64, 64, 0.5) == [0]
    assert axis_starts(160, 32, 0.5) == [0, 16, 32, 48, 64, 80, 96, 112, 128]
    starts = axis_starts(97, 16, 0.5)
    gaps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == 97 - 16
    assert gaps.max() <= 8 and gaps.max() - gaps.min() <= 1
    assert len(starts) == int(np.ceil((97 - 16) / 8)) + 1


def test_pad_to_patch_centres_and_crops_back():
    image = torch.arange(5 * 7 * 3, dtype=torch.float32).reshape(1, 1, 5, 7, 3)
    padded, crop = pad_to_patch(image, (8, 8, 8))
    assert padded.shape == (1, 1, 8, 8, 8)
    assert torch.equal(padded[(slice(None), slice(None)) + crop], image)
    assert padded.sum() == image.sum()
    assert crop[0] == slice(1, 6)  # 3 voxels of padding: 1 before, 2 after


def test_gaussian_importance_is_normalised_positive_and_centred():
    weight = gaussian_importance((16, 12, 9))
    assert weight.shape == (16, 12, 9)
    assert weight.max().item() == pytest.approx(1.0)
    assert weight.min().item() > 0
    assert np.unravel_index(int(weight.argmax()), weight.shape) == (8, 6, 4)
    half = gaussian_importance((64, 64, 64), dtype=torch.float16)
    assert half.min().item() > 0  # border values would underflow to zero in fp16 without the clamp


def test_mirror_combinations():
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_combinations(()) == [()]


class Constant(torch.nn.Module):
    def __init__(self, value: float, k: int = 2) -> None:
        super().__init__()
        self.value, self.k = value, k

    def forward(self, x):
        return torch.full((x.shape[0], self.k, *x.shape[2:]), self.value)


@pytest.mark.parametrize("shape", [(20, 23, 17), (5, 9, 6), (16, 16, 16)])
def test_blending_all_ones_network_returns_exactly_ones(shape):
    image = torch.randn(1, 2, *shape)
    out = sliding_window_inference(Constant(1.0, 3), image, (8, 8, 8), 3,
                                   Tiling.default(tile_batch=3, mirror_axes=(0, 1, 2)))
    assert out.shape == (3, *shape)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)


def test_pointwise_network_matches_full_image_forward():
    """A 1x1x1 conv gives the same logits in any tile, so the blend must equal one forward of the whole image:
    this checks that every tile is written back at its own offset."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 1).eval()
    image = torch.randn(1, 2, 21, 18, 13)
    with torch.no_grad():
        full = net(image)[0]
    out = sliding_window_inference(net, image, (8, 10, 6), 3, Tiling(step=0.5, tile_batch=4))
    assert torch.allclose(out, full, atol=1e-5)


def _asymmetric_net() -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.arange(54, dtype=torch.float32).reshape(2, 1, 3, 3, 3) / 54.0 - 0.3)
    return net.eval()


def test_mirrored_tta_is_undone_correctly():
    net = _asymmetric_net()
    image = torch.randn(1, 1, 12, 12, 12)
    patch = (12, 12, 12)  # one tile: the blend is the plain network output
    tta = sliding_window_inference(net, image, patch, 2, Tiling.default(mirror_axes=(0, 2)))
    with torch.no_grad():
        dims = lambda axes: [a + 2 for a in axes]  # noqa: E731
        manual = sum(net(image.flip(dims(c))).flip(dims(c)) for c in [(), (0,), (2,), (0, 2)])[0] / 4
        plain = net(image)[0]
    assert torch.allclose(tta, manual, atol=1e-5)
    # the network is not mirror symmetric, so forgetting to un-flip would have been caught
    assert (tta - plain).abs().max() > 1e-2
    wrong = sum(net(image.flip(dims(c))) for c in [(), (0,), (2,), (0, 2)])[0] / 4
    assert (tta - wrong).abs().max() > 1e-2


def test_tile_batch_and_mirrors_give_the_same_result_across_batching():
    net = _asymmetric_net()
    image = torch.randn(1, 1, 20, 15, 18)
    a = sliding_window_inference(net, image, (8, 8, 8), 2, Tiling.default(tile_batch=1, mirror_axes=(0, 1, 2)))
    b = sliding_window_inference(net, image, (8, 8, 8), 2, Tiling.default(tile_batch=7, mirror_axes=(0, 1, 2)))
    assert torch.allclose(a, b, atol=1e-5)


def test_fold_ensemble_averages_models():
    image = torch.randn(1, 1, 14, 10, 9)
    out = sliding_window_inference([Constant(0.0), Constant(2.0)], image, (8, 8, 8), 2,
                                   Tiling.default(mirror_axes=(1,)))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)
    net = _asymmetric_net()
    both = sliding_window_inference([net, Constant(4.0)], image, (8, 8, 8), 2)
    single = sliding_window_inference(net, image, (8, 8, 8), 2)
    assert torch.allclose(both, (single + 4.0) / 2, atol=1e-5)


def _out_of_memory_when(fails, net):
    """`net`, except that a call for which `fails(batch_size, call_number)` holds raises CUDA's out-of-memory."""
    calls = []

    def model(x):
        calls.append(x.shape[0])
        if fails(x.shape[0], len(calls)):
            raise torch.cuda.OutOfMemoryError("simulated")
        return net(x)

    return model, calls


def test_a_forward_batch_limit_caps_tiles_then_mirrors_with_the_same_result(capsys):
    """On a CPU a forward pass too large for the memory is not an error to catch: the process is killed. The
    limit the predictor computes from the free memory is applied before anything runs."""
    from voxseg.infer.budget import forward_batch_limit, split_forward_batch

    assert split_forward_batch(4, 8, None) == (4, 8) and split_forward_batch(4, 8, 5) == (1, 4)
    assert split_forward_batch(4, 1, 2) == (2, 1) and split_forward_batch(1, 8, 1) == (1, 1)
    gib = 2**30
    assert forward_batch_limit(1.8 * gib, 20 * gib) == 5 and forward_batch_limit(1.8 * gib, 20 * gib, 10 * gib) == 2
    assert forward_batch_limit(1.8 * gib, 1 * gib) == 1  # one tile at least, whatever is free
    net = _asymmetric_net()
    image = torch.randn(1, 1, 20, 16, 18)
    reference = sliding_window_inference(net, image, (8, 8, 8), 2, Tiling.default(tile_batch=4, mirror_axes=(0, 1, 2)))
    model, calls = _out_of_memory_when(lambda batch, _: False, net)
    out = sliding_window_inference(model, image, (8, 8, 8), 2,
                                   Tiling.default(tile_batch=4, mirror_axes=(0, 1, 2), max_forward_batch=5))
    assert set(calls) == {4}  # 1 tile x 4 of the 8 mirrored copies per call, never more than 5
    assert torch.allclose(out, reference, atol=1e-6)
    assert capsys.readouterr().err == ""  # a planned limit, not a fallback: nothing to report


def test_inference_memory_per_tile_of_the_reference_network():
    from voxseg.data.memory import inference_bytes_per_tile
    from voxseg.plans import NetworkPlan

    network = NetworkPlan(features=[32, 64, 128, 256, 320, 320], kernel_sizes=[[3, 3, 3]] * 6,
                          strides=[[1, 1, 1]] + [[2, 2, 2]] * 5)
    # measured on a CPU in float32: 1.74 GiB per tile at 96x128x160
    assert inference_bytes_per_tile(network, [96, 128, 160], 4, 4) / 2**30 == pytest.approx(1.8, abs=0.1)
    half = inference_bytes_per_tile(network, [96, 128, 160], 4, 4, dtype_bytes=2)
    assert half < 0.6 * inference_bytes_per_tile(network, [96, 128, 160], 4, 4)


def test_out_of_memory_in_a_forward_halves_the_tiles_then_the_mirrors_with_the_same_result(capsys):
    net = _asymmetric_net()
    image = torch.randn(1, 1, 20, 16, 18)
    reference = sliding_window_inference(net, image, (8, 8, 8), 2, Tiling.default(tile_batch=4, mirror_axes=(0, 1, 2)))
    model, calls = _out_of_memory_when(lambda batch, _: batch > 2, net)
    out = sliding_window_inference(model, image, (8, 8, 8), 2, Tiling.default(tile_batch=4, mirror_axes=(0, 1, 2)),
                                   case_name="c7")
    # 4 tiles x 8 mirrors = 32 -> 16 -> 8 (1 tile) -> 4 -> 2 mirrored copies per forward, which fits
    assert calls[:5] == [32, 16, 8, 4, 2] and set(calls[5:]) == {2}
    assert torch.allclose(out, reference, atol=1e-6)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case 'c7': out of GPU memory" in err
    assert "1 tile(s) per forward pass instead of 4" in err and "2 of the 8 mirrored copies" in err
    assert "host memory" not in err


def test_out_of_memory_at_one_tile_moves_the_accumulator_to_the_host(capsys):
    net = _asymmetric_net()
    image = torch.randn(1, 1, 16, 16, 16)
    reference = sliding_window_inference(net, image, (8, 8, 8), 2, Tiling.default(tile_batch=4))
    model, calls = _out_of_memory_when(lambda _, call: call <= 3, net)
    # an accumulator forced onto another "device" (meta): the host fallback must start the pass again on the CPU
    out = sliding_window_inference(model, image, (8, 8, 8), 2, Tiling.default(tile_batch=4, accumulator_device="meta"),
                                   case_name="c8")
    assert calls[:3] == [4, 2, 1] and set(calls[3:]) == {1}  # the halved batch is kept on the host
    assert out.device.type == "cpu" and torch.allclose(out, reference, atol=1e-6)
    assert len(calls) == 3 + 27  # 3 failed forwards, then each of the 3 x 3 x 3 tiles once
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 tile(s) per forward pass instead of 4 and the accumulator in host memory" in err


def test_out_of_memory_after_every_fallback_is_an_error_naming_the_case():
    from voxseg.errors import DeviceMemoryError, VoxsegError

    model, calls = _out_of_memory_when(lambda *_: True, _asymmetric_net())
    with pytest.raises(DeviceMemoryError, match=r"case 'c9': out of GPU memory even with 1 tile") as caught:
        sliding_window_inference(model, torch.randn(1, 1, 16, 16, 16), (8, 8, 8), 2,
                                 Tiling.default(tile_batch=2, mirror_axes=(0,), accumulator_device="meta"),
                                 case_name="c9")
    assert isinstance(caught.value, VoxsegError) and "--device cpu" in str(caught.value)
    assert "--tile-batch 2" in str(caught.value)
    assert calls == [4, 2, 1, 1]  # 2 tiles x 2 mirrors, 1 tile, 1 copy; then again with the host accumulator


def test_2d_network_runs_slice_by_slice():
    torch.manual_seed(2)
    net = torch.nn.Conv2d(1, 2, 1).eval()
    image = torch.randn(1, 1, 5, 13, 11)
    out = sliding_window_inference(net, image, (8, 8), 2, Tiling.default(mirror_axes=(0, 1)))
    with torch.no_grad():
        expected = torch.stack([net(image[:, :, d])[0] for d in range(5)], dim=1)
    assert out.shape == (2, 5, 13, 11)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("axis", [1, 2])
def test_2d_network_runs_along_the_slice_axis(axis):
    torch.manual_seed(3)
    net = torch.nn.Conv2d(1, 2, 3, padding=1).eval()  # a 3x3 kernel: slicing along the wrong axis would differ
    image = torch.randn(1, 1, 5, 13, 11)
    out = sliding_window_inference(net, image, (16, 16), 2, Tiling.default(use_gaussian=False), slice_axis=axis)
    with torch.no_grad():
        if axis == 1:
            expected = torch.stack([net(image[:, :, :, h])[0] for h in range(13)], dim=2)
        else:
            expected = torch.stack([net(image[:, :, :, :, w])[0] for w in range(11)], dim=3)
    assert out.shape == (2, 5, 13, 11)
    assert torch.allclose(out, expected, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        tile_positions((10, 10, 10), (4, 4, 4), step=0.0)
    with pytest.raises(ValueError):
        sliding_window_inference(Constant(1.0), torch.zeros(2, 1, 8, 8, 8), (4, 4, 4), 2)
    with pytest.raises(ValueError, match="does not match"):
        sliding_window_inference(Constant(1.0, k=3), torch.zeros(1, 1, 8, 8, 8), (4, 4, 4), 2)


@contextlib.contextmanager
def full_float32_precision():
    """TF32 off for CUDA matmuls and cuDNN convolutions (10-bit mantissas: ~1e-3 relative error, far above a
    float32 parity tolerance), the caller's settings restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_full_float32_precision_turns_tf32_off_and_restores_the_settings():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(RuntimeError), full_float32_precision():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise RuntimeError("a failing parity assertion")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_with_amp_and_host_accumulator():
    net = _asymmetric_net()
    image = torch.randn(1, 1, 40, 36, 44)
    reference = sliding_window_inference(net, image, (16, 16, 16), 2, Tiling.default(mirror_axes=(0, 1, 2)))
    cuda_net, cuda_image = net.cuda(), image.cuda()
    with full_float32_precision():  # cuDNN convolutions default to TF32 on Ampere and later
        on_device = sliding_window_inference(cuda_net, cuda_image, (16, 16, 16), 2,
                                             Tiling.default(mirror_axes=(0, 1, 2)))
        host = sliding_window_inference(cuda_net, cuda_image, (16, 16, 16), 2,
                                        Tiling.default(mirror_axes=(0, 1, 2), accumulator_device="cpu"))
    amp = sliding_window_inference(cuda_net, cuda_image, (16, 16, 16), 2,
                                   Tiling.default(mirror_axes=(0, 1, 2), amp_dtype=torch.bfloat16))
    assert on_device.device.type == "cuda" and host.device.type == "cpu"
    assert torch.allclose(on_device.cpu(), reference, atol=1e-4)
    assert torch.allclose(host, reference, atol=1e-4)
    assert (amp.cpu() - reference).abs().max() < 5e-2 * reference.abs().max()
