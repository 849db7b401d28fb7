"""Preprocessing: resampling, crop, normalisation, inverse mapping and the idempotent dataset run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from voxseg.data.io import Geometry, write_image
from voxseg.data.preprocess import plan_hash, preprocess_case, preprocess_dataset, resample, restore_to_original
from voxseg.data.store import list_cases, load_case, load_foreground_locations
from voxseg.errors import DatasetError, InputError
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan

LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}


def make_plan(raw: str = "", target=(1.0, 1.0, 1.0), norm=None, anisotropy_axis=None, channels=2, **kw) -> Plan:
    norm = norm or [ChannelNormalization("zscore", use_nonzero_mask=True) for _ in range(channels)]
    return Plan(
        dataset_name="Test", raw_dataset=raw, channel_names={str(c): f"ch{c}" for c in range(channels)},
        labels=dict(LABELS), file_ending=".nii.gz", target_spacing=list(target), patch_size=[16, 16, 16],
        batch_size=2, network=NetworkPlan(features=[4, 8], kernel_sizes=[[3, 3, 3]] * 2,
                                          strides=[[1, 1, 1], [2, 2, 2]]),
        normalization=norm, anisotropy_axis=anisotropy_axis, **kw,
    )


def make_case(shape=(32, 36, 40), seed=0, channels=2):
    """A 'brain' (nonzero ellipsoid inside a zero border) with nested spherical labels 1 > 2 > 3."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))  # (3, D, H, W)
    brain = (grid**2).sum(0) < 0.8
    image = np.zeros((channels, *shape), np.float32)
    for c in range(channels):
        image[c][brain] = rng.normal(100 + 50 * c, 20 + 5 * c, brain.sum())
    center = grid - np.array([0.1, -0.05, 0.05])[:, None, None, None]
    radius = np.sqrt((center**2).sum(0))
    seg = np.zeros(shape, np.uint8)
    seg[radius < 0.5], seg[radius < 0.3], seg[radius < 0.15] = 1, 2, 3
    return image, seg


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * (x & y).sum() / max(x.sum() + y.sum(), 1)


# ----- resample ---------------------------------------------------------------------------------------------
def test_identity_fast_path_returns_input_without_copy():
    labels = torch.randint(0, 3, (1, 8, 9, 10), dtype=torch.int8)
    assert resample(labels, (8, 9, 10), is_label=True) is labels
    image = torch.randn(2, 8, 9, 10)
    assert resample(image, (8, 9, 10)) is image


@pytest.mark.parametrize("new_shape", [(32, 32, 32), (72, 72, 72)])
def test_image_resampling_reproduces_a_smooth_function(new_shape):
    # f sampled at voxel centres of a 48^3 grid on [0, 1]^3, resampled, compared with f at the new centres
    def sample(n):
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        z, y, x = torch.meshgrid(centres, centres, centres, indexing="ij")
        return torch.sin(2 * math.pi * z) * torch.cos(2 * math.pi * y) + torch.sin(2 * math.pi * x)

    expected = sample(new_shape[0])
    inner = (slice(2, -2),) * 3  # border voxels extrapolate as constant, as any interpolator without padding
    errors = {}
    for order in (3, 1):  # images: cubic splines (the default); linear for network outputs
        out = resample(sample(48)[None].float(), new_shape, order=order)[0].double()
        errors[order] = (out - expected)[inner].abs().max().item()
    assert errors[1] < 0.02, errors  # amplitude 2: under 1 % of it
    assert errors[3] < 0.7 * errors[1], errors  # the cubic spline is the closer of the two


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_label_resampling_never_creates_values_and_chunks_agree(axis):
    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.choice(np.array([-1, 0, 2, 5, 7], np.int8), size=(1, 12, 14, 16)))
    for new_shape in [(7, 30, 9), (24, 14, 33)]:
        small_chunks = resample(labels, new_shape, is_label=True, anisotropy_axis=axis, label_chunk=1)
        one_chunk = resample(labels, new_shape, is_label=True, anisotropy_axis=axis, label_chunk=64)
        assert small_chunks.shape == (1, *new_shape) and small_chunks.dtype == torch.int8
        assert set(small_chunks.unique().tolist()) <= {-1, 0, 2, 5, 7}
        assert torch.equal(small_chunks, one_chunk)


def test_anisotropic_labels_are_copied_along_the_coarse_axis():
    rng = np.random.default_rng(2)
    labels = torch.from_numpy(rng.integers(0, 4, size=(1, 5, 12, 12)).astype(np.int8))
    out = resample(labels, (10, 12, 12), is_label=True, anisotropy_axis=0)
    # in-plane size unchanged, coarse axis doubled: nearest along the axis repeats every slice twice
    assert torch.equal(out, labels.repeat_interleave(2, dim=1))


# ----- preprocess_case ----------------------------------------------------------------------------------------
def test_crop_bbox_and_shapes():
    image = np.zeros((2, 30, 32, 34), np.float32)
    image[0, 3:20, 5:25, 2:30] = 1.0
    image[1, 25:27, 10:12, 10:12] = -2.0  # a nonzero in one channel only still counts
    plan = make_plan(norm=[ChannelNormalization("none")] * 2)
    out, seg, props = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), plan)
    assert props["crop_bbox"] == [[3, 27], [5, 25], [2, 30]]
    assert props["shape_after_crop"] == props["shape_after_resample"] == [24, 20, 28]
    assert out.shape == (2, 24, 20, 28) and out.dtype == np.float32 and seg is None
    np.testing.assert_array_equal(out, image[:, 3:27, 5:25, 2:30])
    json.dumps(props)  # JSON-serialisable


def test_zscore_inside_mask_and_outside_marked():
    image, seg = make_case()
    plan = make_plan()
    out, seg_pp, props = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), plan, seg)
    box = tuple(slice(a, b) for a, b in props["crop_bbox"])
    mask = np.any(image != 0, axis=0)[box]
    for c in range(2):
        assert abs(out[c][mask].mean()) < 1e-4 and abs(out[c][mask].std() - 1.0) < 1e-3
        assert np.all(out[c][~mask] == 0)
    assert np.all(seg_pp[0][~mask & (seg[box] == 0)] == -1)
    assert np.all(seg_pp[0][mask] == seg[box][mask])
    assert props["normalization_stats"][1][0] == pytest.approx(image[1][image[1] != 0].mean(), rel=1e-4)


def test_holes_of_the_nonzero_mask_are_inside_it():
    """Zero voxels enclosed by the object (a cavity) count as inside, as in nnU-Net: the z-score statistics
    include them, they are normalised (not set to 0) and an unlabelled one is background, not "outside"."""
    image, seg = make_case()
    image[:, 14:18, 16:20, 18:22] = 0.0  # a cavity in the middle of the brain, in every channel
    seg[14:18, 16:20, 18:22] = 0
    out, seg_pp, props = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), make_plan(), seg)
    box = tuple(slice(a, b) for a, b in props["crop_bbox"])
    brain = np.any(image != 0, axis=0)
    brain[14:18, 16:20, 18:22] = True
    for c in range(2):
        mean, std = image[c][brain].mean(), image[c][brain].std()
        assert props["normalization_stats"][c] == pytest.approx([mean, std], rel=1e-4)
        np.testing.assert_allclose(out[c][14 - box[0].start, 16 - box[1].start, 18 - box[2].start], -mean / std,
                                   rtol=1e-4)
        assert np.all(out[c][~brain[box]] == 0)
    assert np.all(seg_pp[0][brain[box] & (seg[box] == 0)] == 0)
    assert np.all(seg_pp[0][~brain[box] & (seg[box] == 0)] == -1)


def test_ct_normalization_clips_then_standardises():
    image = np.linspace(-2000, 3000, 2 * 16 * 16 * 16, dtype=np.float32).reshape(2, 16, 16, 16)
    image[0] = image[0] * 2.5 + 2500  # channel 0 spans -2500..3500: both clip bounds are hit
    ct = ChannelNormalization("ct", clip_low=-1000.0, clip_high=1000.0, mean=50.0, std=200.0)
    plan = make_plan(norm=[ct, ChannelNormalization("none")])
    original = image.copy()
    out, _, _ = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), plan)
    np.testing.assert_array_equal(image, original)  # the caller's array is not normalised in place
    assert out[0].max() == pytest.approx((1000 - 50) / 200) and out[0].min() == pytest.approx((-1000 - 50) / 200)
    inside = (image[0] > -1000) & (image[0] < 1000)
    np.testing.assert_allclose(out[0][inside], (image[0][inside] - 50) / 200, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[1], image[1])  # "none" leaves the channel as it is


def test_round_trip_equal_spacing_is_exact():
    image, seg = make_case()
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    _, seg_pp, props = preprocess_case(image, geometry, make_plan(), seg)
    restored = restore_to_original(seg_pp[0], props, is_label=True)
    assert restored.shape == seg.shape
    for value in (1, 2, 3):
        assert dice(restored, seg, value) >= 0.99
    assert np.all(restored >= 0)  # the "outside" marker -1 does not leak into predictions


@pytest.mark.parametrize("shape,target,axis", [((40, 40, 40), (1.3, 1.2, 0.8), None),
                                               ((24, 40, 40), (2.0, 1.5, 1.5), 0)])
def test_round_trip_with_resampling(shape, target, axis):
    # labels here are 4-10 voxel spheres: coarser targets lose them (information loss, not a bug)
    image, seg = make_case(shape=shape)
    spacing = (4.0, 1.0, 1.0) if axis == 0 else (1.0, 1.0, 1.0)
    geometry = Geometry.from_spacing(spacing)
    out, seg_pp, props = preprocess_case(image, geometry, make_plan(target=target, anisotropy_axis=axis), seg)
    expected = [round(s * sp / t) for s, sp, t in zip(props["shape_after_crop"], spacing, target)]
    assert props["shape_after_resample"] == expected and out.shape[1:] == seg_pp.shape[1:] == tuple(expected)
    assert props["anisotropy_axis"] == axis
    assert set(np.unique(seg_pp).tolist()) <= {-1, 0, 1, 2, 3}
    restored = restore_to_original(torch.from_numpy(seg_pp[0]), props, is_label=True)
    assert restored.shape == seg.shape
    for value in (1, 2, 3):
        assert dice(restored, seg, value) >= 0.9, (value, dice(restored, seg, value))


def test_restore_probabilities_fills_background_outside_the_crop():
    image, seg = make_case()
    _, seg_pp, props = preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)),
                                       make_plan(target=(1.5, 1.5, 1.5)), seg)
    probs = np.stack([(np.maximum(seg_pp[0], 0) == k) for k in range(4)]).astype(np.float32)  # (4, d, h, w)
    restored = restore_to_original(probs, props, is_label=False)
    assert restored.shape == (4, *seg.shape) and restored.dtype == np.float32
    np.testing.assert_allclose(restored.sum(0), 1.0, atol=1e-5)  # linear interpolation keeps a partition of unity
    (d0, d1), _, _ = props["crop_bbox"]
    assert np.all(restored[0, :d0] == 1) and np.all(restored[1:, :d0] == 0)
    assert dice(restored.argmax(0), seg, 1) >= 0.9
    regions = restore_to_original(probs[1:], props, is_label=False, background_channel=False)
    assert np.all(regions[:, :d0] == 0)


# ----- preprocess_dataset -----------------------------------------------------------------------------------
def write_dataset(root: Path, num_cases: int = 3) -> Path:
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    for i in range(num_cases):
        image, seg = make_case(shape=(20, 22, 24), seed=i)
        for c in range(2):
            write_image(root / "imagesTr" / f"case{i}_{c:04d}.nii.gz", image[c], geometry)
        write_image(root / "labelsTr" / f"case{i}.nii.gz", seg, geometry)
    meta = {"channel_names": {"0": "ch0", "1": "ch1"}, "labels": LABELS, "numTraining": num_cases,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_preprocess_dataset_is_idempotent_and_follows_the_plan(tmp_path):
    raw = write_dataset(tmp_path / "raw")
    workdir = tmp_path / "work"
    plan = make_plan(raw=str(raw), target=(1.0, 1.0, 1.0))
    plan.save(workdir / "plans.json")
    first = preprocess_dataset(workdir, progress=False)
    assert (first["done"], first["skipped"]) == (3, 0) and first["cases_per_s"] > 0 and first["mb_per_s"] > 0
    pre = workdir / "preprocessed"
    assert list_cases(pre) == ["case0", "case1", "case2"]
    image, seg, props = load_case(pre, "case1")
    assert image.dtype == np.float16 and seg.dtype == np.int8 and props["plan_hash"] == plan_hash(plan)
    assert props["label_file"].endswith("case1.nii.gz") and len(props["channel_files"]) == 2
    fg = load_foreground_locations(pre, "case1")
    assert sorted(fg) == [1, 2, 3] and all(np.all(seg[0][tuple(v.T)] == k) for k, v in fg.items())
    assert not list(pre.glob(".*"))  # no temporary files left

    second = preprocess_dataset(workdir, progress=False)
    assert (second["done"], second["skipped"]) == (0, 3)
    mtime = (pre / "case0.npy").stat().st_mtime_ns
    (pre / "case2.json").unlink()
    third = preprocess_dataset(workdir, progress=False)
    assert (third["done"], third["skipped"]) == (1, 2) and (pre / "case0.npy").stat().st_mtime_ns == mtime

    plan.target_spacing = [1.5, 1.5, 1.5]
    plan.save(workdir / "plans.json")
    fourth = preprocess_dataset(workdir, progress=False)
    assert (fourth["done"], fourth["skipped"]) == (3, 0)
    assert load_case(pre, "case0")[2]["shape_after_resample"] != props["shape_after_resample"]


def test_preprocess_dataset_reports_failed_cases_after_the_others(tmp_path):
    raw = write_dataset(tmp_path / "raw")
    (raw / "imagesTr" / "case1_0001.nii.gz").write_bytes(b"not an image")
    workdir = tmp_path / "work"
    make_plan(raw=str(raw)).save(workdir / "plans.json")
    with pytest.raises(DatasetError, match="case1"):
        preprocess_dataset(workdir, num_workers=2, progress=False)
    assert list_cases(workdir / "preprocessed") == ["case0", "case2"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    image, seg = make_case(shape=(40, 44, 48))
    plan = make_plan(target=(1.3, 0.9, 1.1))
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    cpu = preprocess_case(image, geometry, plan, seg, device="cpu")
    gpu = preprocess_case(image, geometry, plan, seg, device="cuda")
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    assert (gpu[1] != cpu[1]).mean() < 1e-3  # ties of interpolated masks may break differently
    assert gpu[2]["shape_after_resample"] == cpu[2]["shape_after_resample"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused_by_case_and_channel(bad):
    image, _ = make_case()[:2]
    image = image.copy()
    image[1, 5, 6, 7] = bad
    with pytest.raises(InputError, match=r"case 'sick': channel 1 has 1 NaN/Inf voxel"):
        preprocess_case(image, Geometry.from_spacing((1.0, 1.0, 1.0)), make_plan(), name="sick")
