"""Batched device-side augmentation: alignment of image and labels, exactness, seeding, probabilities."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from voxseg.augment import AugmentConfig, BatchRows, augment_batch, source_size
from voxseg.augment.intensity import simulate_low_resolution
from voxseg.augment.spatial import centre_crop
from voxseg.errors import ConfigError, InputError

INTENSITY_OFF = dict(noise_p=0.0, blur_p=0.0, brightness_p=0.0, contrast_p=0.0, low_res_p=0.0, gamma_p=0.0,
                     inverted_gamma_p=0.0)
SPATIAL_OFF = dict(rotation_p=0.0, scale_p=0.0, elastic_p=0.0, mirror_p=0.0, rot90_p=0.0)
ALL_OFF = {**INTENSITY_OFF, **SPATIAL_OFF}


def gen(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def blocks(batch: int, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels: background 0, a block of 1 with a block of 2 inside; image channel 0 = labels, 1 = a ramp."""
    seg = torch.zeros(batch, 1, *size, dtype=torch.int8)
    outer = tuple(slice(s // 4, s - s // 4) for s in size)
    inner = tuple(slice(s // 3, s // 2 + 1) for s in size)
    seg[(slice(None), 0, *outer)] = 1
    seg[(slice(None), 0, *inner)] = 2
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    ramp = sum(g * (i + 1) for i, g in enumerate(grids)).expand(batch, 1, *size)
    return torch.cat([seg.float(), ramp], dim=1), seg


def random_batch(batch: int, size: tuple[int, ...], channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, channels, *size, generator=g)
    seg = torch.randint(0, 3, (batch, 1, *size), generator=g, dtype=torch.int8)
    return image, seg


def differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample bool: any element differs."""
    return (a != b).flatten(1).any(dim=1)


@pytest.mark.parametrize("patch", [(24, 24, 24), (32, 28)])
def test_spatial_transforms_keep_image_and_labels_aligned(patch):
    config = AugmentConfig(rotation_p=1.0, scale_p=1.0, elastic_p=0.5, mirror_p=0.5, rot90_p=0.5, **INTENSITY_OFF)
    size = source_size(patch, config)
    image, seg = blocks(8, size)
    out_image, out_seg = augment_batch(image, seg, config, gen(1), patch)
    assert out_image.shape == (8, 2, *patch) and out_seg.shape == (8, 1, *patch)
    assert out_seg.dtype == torch.int8
    inside = out_seg >= 0  # -1 marks samples taken outside the crop (far corners of a zoomed-out rotation)
    agree = (out_image[:, :1].round() == out_seg.float())[inside].float().mean()
    assert agree >= 0.99
    # the transforms really moved things: not every sample is the centre crop
    assert differs(out_seg, centre_crop(seg, patch)).sum() >= 6
    assert set(out_seg.unique().tolist()) <= {-1, 0, 1, 2}


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_labels_keep_dtype_and_only_original_values(dtype):
    config = AugmentConfig(rotation_p=1.0, scale_p=1.0, elastic_p=1.0)
    patch = (16, 16, 16)
    image, seg = random_batch(4, source_size(patch, config))
    seg = (seg * 3).to(dtype)  # values 0, 3, 6: interpolation would create 1, 2, 4, 5
    out_image, out_seg = augment_batch(image, seg, config, gen(), patch)
    assert out_seg.dtype == dtype
    assert set(out_seg.unique().tolist()) <= {-1, 0, 3, 6}
    _, filled = augment_batch(image, seg, config, gen(), patch, seg_fill=0)
    assert set(filled.unique().tolist()) <= {0, 3, 6}


def test_seed_determinism():
    config = AugmentConfig(rotation_p=0.5, scale_p=0.5, elastic_p=0.5, rot90_p=0.5, noise_p=0.5, blur_p=0.5,
                           low_res_p=0.5)
    patch = (12, 12, 12)
    image, seg = random_batch(6, source_size(patch, config), channels=2)
    first = augment_batch(image, seg, config, gen(7), patch)
    second = augment_batch(image, seg, config, gen(7), patch)
    other = augment_batch(image, seg, config, gen(8), patch)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_identity_config_returns_exact_centre_crop():
    patch = (10, 12, 8)
    image, seg = random_batch(3, (16, 17, 13), channels=2)
    for config in (AugmentConfig(**ALL_OFF), AugmentConfig(enabled=False)):
        out_image, out_seg = augment_batch(image, seg, config, gen(), patch)
        assert torch.equal(out_image, image[:, :, 3:13, 2:14, 2:10])
        assert torch.equal(out_seg, seg[:, :, 3:13, 2:14, 2:10])


def test_unselected_samples_are_exact_centre_crops():
    config = AugmentConfig(**{**ALL_OFF, "rotation_p": 0.5})
    patch = (8, 8, 8)
    image, seg = random_batch(64, source_size(patch, config))
    out_image, out_seg = augment_batch(image, seg, config, gen(3), patch)
    crop = centre_crop(image, patch)
    same = ~differs(out_image, crop)
    assert 0.3 < same.float().mean() < 0.7  # the rest were rotated
    assert torch.equal(out_seg[same], centre_crop(seg, patch)[same])


def test_scaling_direction_and_centre():
    """Scale s samples source voxel c_S + s (x - c_P): s = 2 doubles a ramp's slope around the same centre."""
    config = AugmentConfig(**{**ALL_OFF, "scale_p": 1.0, "scale_range": (2.0, 2.0), "max_source_factor": 2.0})
    patch = (8, 8, 16)
    size = source_size(patch, config)
    assert size == (16, 16, 32)
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 1, 16, 16, 32).contiguous()
    out, _ = augment_batch(ramp, torch.zeros(1, 1, *size, dtype=torch.int8), config, gen(), patch)
    # output x maps to 15.5 + 2 (x - 7.5): 0.5, 2.5, ..., 30.5 (interior of the source, no padding)
    expected = 15.5 + 2 * (torch.arange(16.0) - 7.5)
    torch.testing.assert_close(out[0, 0, 4, 4], expected)


def test_mirroring_flips_exactly():
    patch = (8, 8, 8)
    image, seg = random_batch(2, (10, 10, 10))
    config = AugmentConfig(**{**ALL_OFF, "mirror_p": 1.0, "mirror_axes": (1,)})
    out_image, out_seg = augment_batch(image, seg, config, gen(), patch)
    assert torch.equal(out_image, centre_crop(image, patch).flip(3))
    assert torch.equal(out_seg, centre_crop(seg, patch).flip(3))
    config = AugmentConfig(**{**ALL_OFF, "mirror_p": 1.0})
    out_image, _ = augment_batch(image, seg, config, gen(), patch)
    assert torch.equal(out_image, centre_crop(image, patch).flip(2, 3, 4))


@pytest.mark.parametrize("patch,axes", [((8, 10, 6), (0, 2)), ((8, 6, 10), (1,)), ((10, 6), (0, 1))])
def test_mirroring_inside_the_grid_matches_the_exact_flip(patch, axes):
    """Grid-transformed samples get mirroring through the affine matrix: with scale 1 it equals the flip."""
    image, seg = random_batch(2, tuple(p + 4 for p in patch))
    dims = tuple(2 + a for a in axes)
    exact = AugmentConfig(**{**ALL_OFF, "mirror_p": 1.0, "mirror_axes": axes})
    via_grid = dataclasses.replace(exact, scale_p=1.0, scale_range=(1.0, 1.0))
    out_exact, seg_exact = augment_batch(image, seg, exact, gen(), patch)
    out_grid, seg_grid = augment_batch(image, seg, via_grid, gen(), patch)
    assert torch.equal(out_exact, centre_crop(image, patch).flip(dims))
    torch.testing.assert_close(out_grid, out_exact, atol=1e-4, rtol=0)
    assert torch.equal(seg_grid, seg_exact)


def test_rot90_only_in_planes_of_equal_size():
    patch = (8, 8, 6)
    image, seg = random_batch(24, patch)
    config = AugmentConfig(**{**ALL_OFF, "rot90_p": 1.0})
    out_image, out_seg = augment_batch(image, seg, config, gen(), patch)
    assert out_image.shape == image.shape
    for b in range(24):
        matches = [k for k in (1, 2, 3) if torch.equal(out_image[b], torch.rot90(image[b], k, (1, 2)))]
        assert len(matches) == 1
        assert torch.equal(out_seg[b], torch.rot90(seg[b], matches[0], (1, 2)))


def test_intensity_changes_only_the_image_and_stays_finite():
    config = AugmentConfig(**{**SPATIAL_OFF, "noise_p": 1.0, "blur_p": 1.0, "brightness_p": 1.0, "contrast_p": 1.0,
                              "low_res_p": 1.0, "gamma_p": 1.0, "inverted_gamma_p": 1.0})
    patch = (12, 12, 12)
    image, seg = random_batch(4, patch, channels=3)
    image[0, 1] = 5.0  # a constant channel must not produce NaN (zero std / zero range)
    out_image, out_seg = augment_batch(image, seg, config, gen(), patch)
    assert torch.equal(out_seg, seg)
    assert torch.isfinite(out_image).all()
    assert differs(out_image, image).all()


def spatial_or_mirror(p: float) -> list[tuple[str, dict, float]]:
    return [
        ("rotation", {"rotation_p": p}, p),
        ("scale", {"scale_p": p}, p),
        ("elastic", {"elastic_p": p, "elastic_alpha": (1.0, 3.0)}, p),
        ("mirror", {"mirror_p": p, "mirror_axes": (0,)}, p),
        ("rot90", {"rot90_p": p}, p),
        ("noise", {"noise_p": p, "noise_variance": (0.01, 0.1)}, p),
        ("blur", {"blur_p": p, "blur_per_channel_p": 0.5}, p * 0.5),
        ("brightness", {"brightness_p": p}, p),
        ("contrast", {"contrast_p": p}, p),
        ("low_res", {"low_res_p": p, "low_res_zoom": (0.5, 0.8), "low_res_per_channel_p": 1.0}, p),
        ("gamma", {"gamma_p": p}, p),
        ("inverted_gamma", {"inverted_gamma_p": p}, p),
    ]


@pytest.mark.parametrize("name,settings,expected", spatial_or_mirror(0.3), ids=[c[0] for c in spatial_or_mirror(0.3)])
def test_each_transform_fires_with_its_probability(name, settings, expected):
    config = AugmentConfig(**{**ALL_OFF, **settings})
    patch = (8, 8, 8)
    image, seg = random_batch(400, source_size(patch, config), seed=5)
    out_image, _ = augment_batch(image, seg, config, gen(11), patch)
    fraction = differs(out_image, centre_crop(image, patch)).float().mean().item()
    assert abs(fraction - expected) < 0.07, f"{name}: {fraction:.3f} vs {expected}"


def test_low_res_matches_interpolate_row_by_row():
    """Each row gets its own zoom: nearest down to round(zoom * n) voxels per axis, linear back up."""
    x = torch.randn(5, 1, 16, 12, 10)
    zooms = np.array([0.5, 0.63, 0.8, 1.0, 0.07])
    out = simulate_low_resolution(x.clone(), zooms)
    for row, zoom in enumerate(zooms):
        small = [max(1, round(zoom * n)) for n in x.shape[2:]]
        reference = F.interpolate(F.interpolate(x[row:row + 1], size=small, mode="nearest"), size=x.shape[2:],
                                  mode="trilinear", align_corners=False)
        torch.testing.assert_close(out[row:row + 1], reference, atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], x[0]) and torch.equal(out[3], x[3])  # zoom 1 keeps the row


def test_blur_matches_scipy_gaussian_filter():
    config = AugmentConfig(**{**ALL_OFF, "blur_p": 1.0, "blur_per_channel_p": 1.0, "blur_sigma": (0.8, 0.8)})
    image, seg = random_batch(2, (10, 11, 12), channels=2)
    out, _ = augment_batch(image, seg, config, gen(), (10, 11, 12))
    # radius ceil(3 * 0.8) = 3 taps each side; scipy's radius is int(truncate * sigma + 0.5) = 3
    reference = ndimage.gaussian_filter(image.numpy(), sigma=(0, 0, 0.8, 0.8, 0.8), mode="nearest", truncate=3.75)
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-5)


def test_source_size():
    patch = (128, 128, 128)
    assert source_size(patch, AugmentConfig()) == (192, 192, 192)  # capped at 1.5x
    assert source_size(patch, AugmentConfig(**SPATIAL_OFF)) == patch
    assert source_size(patch, AugmentConfig(enabled=False)) == patch
    rotation_only = AugmentConfig(**{**SPATIAL_OFF, "rotation_p": 0.2, "rotation_degrees": 10.0})
    size = source_size((40, 64, 64), rotation_only)
    # axis 0 (40) picks up the long axes under rotation: 20 cos10 + 32 sin10 + 32 sin10 > 30, so it hits the cap
    assert size == (60, 82, 82) and all((s - p) % 2 == 0 for p, s in zip((40, 64, 64), size))
    in_plane = dataclasses.replace(rotation_only, rotation_coarse_axis_only=True)
    assert source_size((40, 64, 64), in_plane)[0] == 40  # rotating about axis 0 never reaches along it


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="rotation_p"):
        AugmentConfig(rotation_p=1.5)
    with pytest.raises(ConfigError, match="scale_range"):
        AugmentConfig(scale_range=(1.4, 0.7))
    with pytest.raises(ConfigError, match="mirror_axes"):
        AugmentConfig(mirror_axes=[0, 0])
    with pytest.raises(ConfigError, match="low_res_zoom"):
        AugmentConfig(low_res_zoom=(0.5, 1.5))
    config = AugmentConfig(scale_range=[0.8, 1.2], mirror_axes=[0, 2])  # JSON gives lists
    assert config.scale_range == (0.8, 1.2) and config.mirror_axes == (0, 2)
    with pytest.raises(ConfigError, match="mirror_axes"):
        augment_batch(*random_batch(1, (8, 8)), AugmentConfig(mirror_axes=(2,)), gen(), (8, 8))


def test_bad_inputs_raise_input_error():
    image, seg = random_batch(1, (8, 8, 8))
    with pytest.raises(InputError, match="smaller than patch_size"):
        augment_batch(image, seg, AugmentConfig(), gen(), (10, 8, 8))
    with pytest.raises(InputError, match="seg"):
        augment_batch(image, seg[:, :, :4], AugmentConfig(), gen(), (4, 4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_without_host_sync_and_matches_cpu_where_exact():
    config = AugmentConfig(**{k: 1.0 for k in ALL_OFF}, elastic_alpha=(1.0, 2.0))
    patch = (16, 16, 16)
    image, seg = random_batch(4, source_size(patch, config), channels=2)
    device = torch.device("cuda")
    generator = gen(0)
    image_gpu, seg_gpu = image.to(device), seg.to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any .item()/.cpu()/blocking copy inside raises
    try:
        out_image, out_seg = augment_batch(image_gpu, seg_gpu, config, generator, patch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out_image.device.type == "cuda" and torch.isfinite(out_image).all()
    assert set(out_seg.unique().tolist()) <= {-1, 0, 1, 2}
    mirror_only = AugmentConfig(**{**ALL_OFF, "mirror_p": 1.0})
    cpu = augment_batch(image, seg, mirror_only, gen(), patch)
    gpu = augment_batch(image_gpu, seg_gpu, mirror_only, gen(), patch)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


# ----- host-side draws: distributions, determinism, global batch slices ------------------------------------
def test_draws_keep_the_recipes_probabilities_and_ranges():
    """Over many samples each decision fires with its configured probability (binomial 5 sigma) and each
    parameter stays in its range with the mean of its distribution (uniform, or nnU-Net's split uniform)."""
    from voxseg.augment import draw_batch_params

    config, n, channels = AugmentConfig(elastic_p=0.1, rot90_p=0.2), 20000, 2
    params = draw_batch_params(n, channels, (16, 16, 16), config, gen(3))

    def close(fraction: float, p: float, count: int) -> bool:
        return abs(fraction - p) <= 5 * np.sqrt(p * (1 - p) / count) + 1e-9

    rates = {"rotate": config.rotation_p, "scaled": config.scale_p, "elastic": config.elastic_p,
             "rot90": config.rot90_p, "noise": config.noise_p, "brightness": config.brightness_p,
             "contrast": config.contrast_p, "inverted_gamma": config.inverted_gamma_p, "gamma": config.gamma_p}
    for name, p in rates.items():
        assert close(getattr(params, name).mean(), p, n), name
    assert close(params.flips.mean(), config.mirror_p, params.flips.size)
    assert close(params.blur.mean(), config.blur_p * config.blur_per_channel_p, n * channels)
    assert close(params.low_res.mean(), config.low_res_p * config.low_res_per_channel_p, n * channels)
    # channels of one sample fire together for the per-sample decision: a sample either has no chance or p_c
    assert close(params.blur[:, 0].mean(), config.blur_p * config.blur_per_channel_p, n)

    limit = np.radians(config.rotation_degrees)
    uniforms = [(params.angles, -limit, limit), (params.scale, *config.scale_range),
                (params.elastic_magnitude, *config.elastic_alpha), (params.noise_std ** 2, *config.noise_variance),
                (params.blur_sigma, *config.blur_sigma), (params.brightness_factor, *config.brightness_range),
                (params.low_res_zoom, *config.low_res_zoom)]
    for values, low, high in uniforms:
        assert values.min() >= low and values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 5 * (high - low) / np.sqrt(12 * values.size)
    for values, (low, high) in [(params.contrast_factor, config.contrast_range),
                                (params.gamma_exponent, config.gamma_range),
                                (params.inverted_gamma_exponent, config.gamma_range)]:
        assert values.min() >= low and values.max() <= high
        assert close((values < 1).mean(), 0.5, values.size)  # half the draws below 1, half above
        assert abs(values[values < 1].mean() - (low + 1) / 2) < 0.01
        assert abs(values[values >= 1].mean() - (1 + high) / 2) < 0.01
    assert set(np.unique(params.rot90_turns)) == {1, 2, 3} and len(np.unique(params.noise_seed)) == n


def test_default_recipe_fires_at_the_configured_rates_through_the_pipeline():
    """Firing frequencies measured on the output: a sample is resampled iff it drew a grid transform, mirrored
    exactly iff it drew only mirroring, and untouched bit for bit (its centre crop) iff it drew nothing."""
    from voxseg.augment import draw_batch_params

    config = AugmentConfig(**INTENSITY_OFF)
    patch = (8, 8, 8)
    image, seg = random_batch(300, source_size(patch, config), seed=2)
    params = draw_batch_params(300, 1, patch, config, gen(5))
    out_image, _ = augment_batch(image, seg, config, gen(5), patch)
    crop = centre_crop(image, patch)
    plain = ~params.grid & ~params.flips.any(axis=1)
    assert torch.equal(out_image[torch.from_numpy(plain)], crop[torch.from_numpy(plain)])
    assert not differs(out_image, crop)[torch.from_numpy(~plain)].logical_not().any()
    for b in np.flatnonzero(~params.grid & params.flips.any(axis=1))[:20]:
        dims = [2 + a for a in np.flatnonzero(params.flips[b])]
        assert torch.equal(out_image[b:b + 1], crop[b:b + 1].flip(dims))
    grid_rate = 1 - (1 - config.rotation_p) * (1 - config.scale_p)
    assert abs(params.grid.mean() - grid_rate) < 5 * np.sqrt(grid_rate * (1 - grid_rate) / 300)


def test_a_slice_of_the_global_batch_gets_the_global_draws():
    """Data parallelism: every rank draws for the global batch and augments its samples only."""
    config = AugmentConfig(rotation_p=0.5, scale_p=0.5, noise_p=0.5, blur_p=0.5, low_res_p=0.5, rot90_p=0.5)
    patch = (12, 12, 12)
    image, seg = random_batch(6, source_size(patch, config), channels=2)
    whole = augment_batch(image, seg, config, gen(4), patch)
    for rank in range(3):
        part = slice(2 * rank, 2 * rank + 2)
        mine = augment_batch(image[part], seg[part], config, gen(4), patch, rows=BatchRows(part.start, 6))
        torch.testing.assert_close(mine[0], whole[0][part], atol=1e-5, rtol=1e-5)
        assert torch.equal(mine[1], whole[1][part])
    with pytest.raises(InputError, match="global batch"):
        augment_batch(image[:2], seg[:2], config, gen(4), patch, rows=BatchRows(first_sample=5, global_batch=6))
    with pytest.raises(InputError, match="numpy Generator"):
        augment_batch(image, seg, config, torch.Generator(), patch)


def test_rows_no_intensity_transform_drew_are_untouched_bit_for_bit():
    from voxseg.augment import draw_batch_params

    config = AugmentConfig(**{**SPATIAL_OFF, **{k: 0.4 for k in INTENSITY_OFF}})
    patch = (10, 10, 10)
    image, seg = random_batch(40, patch, channels=3, seed=6)
    params = draw_batch_params(40, 3, patch, config, gen(9))
    out, _ = augment_batch(image, seg, config, gen(9), patch)
    per_sample = params.noise | params.brightness | params.contrast | params.gamma | params.inverted_gamma
    untouched = ~per_sample[:, None] & ~params.blur & ~params.low_res  # (B, C)
    assert 0 < untouched.sum() < untouched.size
    for b, c in zip(*np.nonzero(untouched)):
        assert torch.equal(out[b, c], image[b, c])
    for b, c in zip(*np.nonzero(~untouched)):
        assert not torch.equal(out[b, c], image[b, c])
