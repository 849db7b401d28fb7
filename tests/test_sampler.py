"""Case cache and patch sampler: crops, padding, foreground oversampling, grouping, cache modes, prefetch."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from voxseg.data.memory import BYTES_PER_PARAMETER, estimate_memory_breakdown, parameter_count
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.errors import ConfigError, DatasetError
from voxseg.plans import NetworkPlan
from voxseg.train.cache import CaseCache
from voxseg.train.prefetch import BatchStream
from voxseg.train.sampler import ForegroundSampling, PatchSampler
from voxseg.units import GIB

SHAPES = {"big": (30, 24, 26), "small": (10, 12, 9), "empty": (20, 18, 22)}


def make_case(shape, seed, with_foreground=True):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int8)
    seg[0, 0, :, :] = -1  # "outside the nonzero crop"
    if with_foreground:
        d, h, w = shape
        seg[0, d // 3: d // 3 + 6, h // 4: h // 4 + 7, w // 2: w // 2 + 5] = 1
        seg[0, d - 4, h - 3, w - 2] = 2  # a tiny class next to the far corner
    return image, seg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("preprocessed")
    for seed, (name, shape) in enumerate(SHAPES.items()):
        image, seg = make_case(shape, seed, with_foreground=name != "empty")
        locations = sample_foreground_locations(seg, [1, 2], seed=name)
        save_case(directory, name, image, seg, {"name": name}, locations, image_dtype="float16")
    return directory


def reference_crop(array: np.ndarray, start, size, fill):
    """Window of (C, D, H, W) `array` at `start` of `size`, padding with `fill` (simple numpy path)."""
    pad = [(0, 0)] + [(max(0, -s), max(0, s + n - e)) for s, n, e in zip(start, size, array.shape[1:])]
    padded = np.pad(array, pad, constant_values=fill)
    offset = [max(0, -s) + s for s in start]
    return padded[(slice(None), *[slice(o, o + n) for o, n in zip(offset, size)])]


def check_batch_against_reference(sampler, image, seg):
    cache = sampler.cache
    for b, draw in enumerate(sampler.last_draws):
        name = cache.names[draw.case]
        stored = np.load(cache.directory / f"{name}.npy").astype(np.float32)
        stored_seg = np.load(cache.directory / f"{name}_seg.npy")
        np.testing.assert_array_equal(image[b].numpy(), reference_crop(stored, draw.start, sampler._crop, 0))
        np.testing.assert_array_equal(seg[b].numpy(), reference_crop(stored_seg, draw.start, sampler._crop, -1))


def test_batch_shapes_and_crops_match_numpy(store):
    cache = CaseCache(store, list(SHAPES), mode="gpu")
    sampler = PatchSampler(cache, (16, 16, 16), batch_size=4, source_size=(20, 20, 20), seed=0)
    for _ in range(5):
        image, seg = sampler.sample()
        assert image.shape == (4, 2, 20, 20, 20) and image.dtype == torch.float32
        assert seg.shape == (4, 1, 20, 20, 20) and seg.dtype == torch.int8
        check_batch_against_reference(sampler, image, seg)


def test_small_case_is_centred_and_padded(store):
    cache = CaseCache(store, ["small"], mode="gpu")
    sampler = PatchSampler(cache, (16, 16, 16), batch_size=2, source_size=(20, 20, 20),
                           foreground=ForegroundSampling(0.5), seed=1)
    stored = np.load(store / "small.npy").astype(np.float32)
    for _ in range(3):
        image, seg = sampler.sample()
        # (10, 12, 9) in a 20^3 crop: always the single centred position
        assert all(d.start == (-5, -4, -5) for d in sampler.last_draws)
        np.testing.assert_array_equal(image[:, :, 5:15, 4:16, 5:14].numpy(), np.stack([stored] * 2))
        assert (image[:, :, :5] == 0).all() and (seg[:, :, :5] == -1).all()
        assert (seg[:, :, :, :, 14:] == -1).all()


def test_foreground_fraction_statistic(store):
    cache = CaseCache(store, ["big", "small"], mode="gpu")
    sampler = PatchSampler(cache, (12, 12, 12), batch_size=2, foreground=ForegroundSampling(0.33), seed=3)
    forced, per_batch = [], []
    for _ in range(300):
        draws = sampler.draw()
        forced += [d.forced for d in draws]
        per_batch.append(sum(d.forced for d in draws))
    assert abs(np.mean(forced) - 0.33) < 0.06
    assert set(per_batch) == {0, 1}  # floor(B f) or ceil(B f) forced per batch


def test_forced_patches_contain_their_class_and_classes_are_balanced(store):
    cache = CaseCache(store, ["big", "small"], mode="gpu")
    patch, source = (12, 12, 12), (16, 16, 16)
    sampler = PatchSampler(cache, patch, batch_size=4, foreground=ForegroundSampling(1.0), source_size=source, seed=4)
    labels = []
    for _ in range(40):
        _, seg = sampler.sample()
        centre = seg[:, :, 2:14, 2:14, 2:14]  # the final patch, where augmentation's centre crop is taken
        for b, draw in enumerate(sampler.last_draws):
            assert draw.forced and draw.label in (1, 2)
            assert (centre[b] == draw.label).any()
            labels.append(draw.label)
    # class 2 is a single voxel per case but is chosen as often as the large class 1
    assert 0.35 < np.mean(np.array(labels) == 2) < 0.65


def test_random_patches_keep_the_final_patch_inside_the_case(store):
    cache = CaseCache(store, ["big"], mode="gpu")
    sampler = PatchSampler(cache, (12, 12, 12), batch_size=8, foreground=ForegroundSampling(0.0),
                           source_size=(16, 16, 16), seed=5)
    starts = np.array([d.start for _ in range(50) for d in sampler.draw()])
    final_starts = starts + 2
    assert (final_starts >= 0).all() and (final_starts + 12 <= np.array(SHAPES["big"])).all()
    # uniform over the whole valid range: both ends are reached
    assert (final_starts.min(axis=0) == 0).all()
    assert (final_starts.max(axis=0) == np.array(SHAPES["big"]) - 12).all()


def test_case_without_foreground_gives_random_patches(store):
    cache = CaseCache(store, ["empty"], mode="gpu")
    sampler = PatchSampler(cache, (8, 8, 8), batch_size=2, foreground=ForegroundSampling(1.0), seed=6)
    image, seg = sampler.sample()
    assert all(d.label is None for d in sampler.last_draws)
    assert image.shape == (2, 2, 8, 8, 8)


def test_num_samples_groups_patches_by_case(store):
    cache = CaseCache(store, list(SHAPES), mode="gpu")
    sampler = PatchSampler(cache, (8, 8, 8), batch_size=6, num_samples=3, seed=7)
    groups = set()
    for _ in range(20):
        cases = [d.case for d in sampler.draw()]
        assert cases[0] == cases[1] == cases[2] and cases[3] == cases[4] == cases[5]
        groups.update(cases)
    assert groups == {0, 1, 2}  # case choice is uniform: every case comes up
    with pytest.raises(ConfigError, match="num_samples"):
        PatchSampler(cache, (8, 8, 8), batch_size=4, num_samples=3)


def test_regions_as_foreground_classes(store):
    cache = CaseCache(store, ["big"], mode="gpu")
    sampler = PatchSampler(cache, (8, 8, 8), batch_size=4, foreground=ForegroundSampling(1.0, regions=[[1, 2], [2]]),
                           seed=8)
    seen = set()
    for _ in range(20):
        _, seg = sampler.sample()
        for b, draw in enumerate(sampler.last_draws):
            region = [[1, 2], [2]][draw.label]
            assert np.isin(seg[b].numpy(), region).any()
            seen.add(draw.label)
    assert seen == {0, 1}


def test_cache_modes_give_identical_patches(store):
    batches = {}
    for mode in ("gpu", "pinned", "mmap"):
        cache = CaseCache(store, list(SHAPES), mode=mode)
        assert cache.mode == mode and mode in cache.describe()
        sampler = PatchSampler(cache, (16, 16, 16), batch_size=4, source_size=(18, 18, 18), seed=9)
        batches[mode] = [sampler.sample() for _ in range(4)]
    for mode in ("pinned", "mmap"):
        for (image, seg), (ref_image, ref_seg) in zip(batches[mode], batches["gpu"]):
            assert torch.equal(image, ref_image) and torch.equal(seg, ref_seg)
    assert isinstance(CaseCache(store, ["big"], mode="mmap").images[0], np.memmap)


def test_auto_mode_follows_the_budget(store):
    nbytes = sum(2 * 2 * np.prod(s) + np.prod(s) for s in SHAPES.values())
    cache = CaseCache(store, list(SHAPES), mode="auto", budget_gb=1.0)
    assert cache.mode == "gpu" and cache.nbytes == nbytes
    assert "(auto)" in cache.describe() and f"{nbytes / 2**30:.2f} GiB" in cache.describe()
    assert CaseCache(store, list(SHAPES), mode="auto", budget_gb=nbytes / 2e9).mode == "mmap"  # no CUDA: no pinned


def test_cache_budget_and_memory_model_count_bytes_in_the_same_unit(store):
    """A cache of N bytes fits a budget of exactly N / 2^30, and N bytes of parameters weigh N / 2^30 in the plan."""
    nbytes = CaseCache(store, list(SHAPES), mode="mmap").nbytes
    exact = CaseCache(store, list(SHAPES), mode="auto", budget_gb=nbytes / GIB)
    assert exact.mode == "gpu" and exact.gigabytes == pytest.approx(nbytes / 2**30, rel=1e-12)
    assert CaseCache(store, list(SHAPES), mode="auto", budget_gb=(nbytes - 1) / GIB).mode == "mmap"
    network = NetworkPlan(features=[8, 16], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    terms = estimate_memory_breakdown(network, [16, 16, 16], 1, 2, 3)
    parameter_bytes = parameter_count(network, 2, 3) * BYTES_PER_PARAMETER
    assert terms["parameters"] == pytest.approx(parameter_bytes / 2**30, rel=1e-12)
    assert GIB == 2**30


def test_2d_patches_are_slices(store):
    cache = CaseCache(store, ["big"], mode="mmap")
    sampler = PatchSampler(cache, (16, 16), batch_size=3, source_size=(20, 18), seed=10)
    image, seg = sampler.sample()
    assert image.shape == (3, 2, 20, 18) and seg.shape == (3, 1, 20, 18)
    stored = np.load(store / "big.npy").astype(np.float32)
    for b, draw in enumerate(sampler.last_draws):
        crop = reference_crop(stored, draw.start, (1, 20, 18), 0)[:, 0]
        np.testing.assert_array_equal(image[b].numpy(), crop)


@pytest.mark.parametrize("axis", [1, 2])
def test_2d_patches_are_slices_along_the_plans_axis(store, axis):
    """A 2d plan slicing along axis 1 or 2 (its coarsest axis): one-voxel-thick crops along that axis."""
    cache = CaseCache(store, ["big"], mode="mmap")
    sampler = PatchSampler(cache, (16, 16), batch_size=3, source_size=(20, 18), seed=10, slice_axis=axis)
    image, seg = sampler.sample()
    assert image.shape == (3, 2, 20, 18) and seg.shape == (3, 1, 20, 18)
    thick = (20, 1, 18) if axis == 1 else (20, 18, 1)
    stored = np.load(store / "big.npy").astype(np.float32)
    for b, draw in enumerate(sampler.last_draws):
        crop = reference_crop(stored, draw.start, thick, 0)
        np.testing.assert_array_equal(image[b].numpy(), crop[:, :, 0] if axis == 1 else crop[..., 0])
    with pytest.raises(ConfigError, match="slice_axis 3"):
        PatchSampler(cache, (16, 16), batch_size=3, slice_axis=3)


def test_prefetch_yields_the_same_batches_and_state_resumes(store):
    cache = CaseCache(store, list(SHAPES), mode="mmap")
    direct = PatchSampler(cache, (8, 8, 8), batch_size=2, seed=11)
    expected = [direct.sample() for _ in range(4)]
    got = list(BatchStream(PatchSampler(cache, (8, 8, 8), batch_size=2, seed=11).sample, 4, depth=2))
    for (image, seg), (ref_image, ref_seg) in zip(got, expected):
        assert torch.equal(image, ref_image) and torch.equal(seg, ref_seg)
    # resuming from a state dict continues the same sequence
    sampler = PatchSampler(cache, (8, 8, 8), batch_size=2, seed=11)
    sampler.sample()
    state = sampler.state_dict()
    following = sampler.sample()
    resumed = PatchSampler(cache, (8, 8, 8), batch_size=2, seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample()[0], following[0])


def test_prefetch_reraises_errors_from_the_thread(store):
    cache = CaseCache(store, ["big"], mode="gpu")

    sampler = PatchSampler(cache, (8, 8, 8), batch_size=2, seed=0)

    def broken():
        sampler.sample()
        raise RuntimeError("transform failed")

    iterator = iter(BatchStream(broken, 3, depth=2))
    with pytest.raises(RuntimeError, match="transform failed"):
        next(iterator)
    assert not _prefetch_threads()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == BatchStream.THREAD_NAME]


def test_prefetch_stops_its_thread_when_the_consumer_leaves_early(store):
    sampler = PatchSampler(CaseCache(store, list(SHAPES), mode="mmap"), (8, 8, 8), batch_size=2, seed=3)
    iterator = iter(BatchStream(sampler.sample, 100, depth=2))
    first = next(iterator)
    assert len(_prefetch_threads()) == 1 and first[0].shape == (2, 2, 8, 8, 8)
    iterator.close()  # what a `break` out of the loop does once the generator is dropped
    assert not _prefetch_threads()
    with pytest.raises(ConfigError, match="prefetch depth"):
        BatchStream(sampler.sample, 1, depth=-1)


def test_errors_name_the_problem(store, tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        CaseCache(store, ["big"], mode="fast")
    with pytest.raises(DatasetError, match="missing"):
        CaseCache(store, ["missing"])
    image, _ = make_case((8, 8, 8), 0)
    save_case(tmp_path, "nolabels", image, None, {"name": "nolabels"}, {})
    with pytest.raises(DatasetError, match="nolabels"):
        CaseCache(tmp_path, ["nolabels"])
    cache = CaseCache(store, ["big"], mode="gpu")
    with pytest.raises(ConfigError, match="source_size"):
        PatchSampler(cache, (16, 16, 16), batch_size=2, source_size=(12, 16, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["gpu", "pinned", "mmap"])
def test_cuda_sampling_without_host_sync_matches_cpu(store, mode):
    reference = PatchSampler(CaseCache(store, list(SHAPES), mode="gpu"), (16, 16, 16), batch_size=4,
                             source_size=(18, 18, 18), seed=12)
    cache = CaseCache(store, list(SHAPES), device="cuda", mode=mode)
    sampler = PatchSampler(cache, (16, 16, 16), batch_size=4, source_size=(18, 18, 18), seed=12)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # host modes stage in pinned memory and copy asynchronously
    try:
        batches = [sampler.sample() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    prefetched = list(BatchStream(PatchSampler(cache, (16, 16, 16), batch_size=4, source_size=(18, 18, 18),
                                               seed=12).sample, 3, depth=2, device="cuda"))
    for (image, seg), (image2, seg2) in zip(batches, prefetched):
        ref_image, ref_seg = reference.sample()
        assert torch.equal(image.cpu(), ref_image) and torch.equal(seg.cpu(), ref_seg)
        assert torch.equal(image2.cpu(), ref_image) and torch.equal(seg2.cpu(), ref_seg)


def test_a_ranks_rows_are_the_same_crops_and_the_generator_stays_in_step(store):
    cache = CaseCache(store, sorted(SHAPES), "cpu", mode="gpu")
    whole = PatchSampler(cache, (12, 12, 12), batch_size=4, foreground=ForegroundSampling(0.5), seed=21)
    part = PatchSampler(cache, (12, 12, 12), batch_size=4, foreground=ForegroundSampling(0.5), seed=21)
    for _ in range(3):
        image, seg = whole.sample()
        rows_image, rows_seg = part.sample(slice(2, 4))  # rank 1 of 2
        assert rows_image.shape[0] == 2
        assert torch.equal(rows_image, image[2:4]) and torch.equal(rows_seg, seg[2:4])
    assert whole.state_dict() == part.state_dict()
