"""The planner: spacing, normalisation, topology, patch/batch from the memory model, overrides, plan_dataset."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from voxseg.data.dataset import RawDataset
from voxseg.data.io import Geometry, write_image
from voxseg.data.memory import CUDA_CONTEXT_GB, activation_elements, estimate_memory_gb, parameter_count
from voxseg.data.plan import derive_topology, describe_plan, make_plan, plan_dataset, plan_target_spacing
from voxseg.errors import ConfigError, DatasetError
from voxseg.models.measure import measure_peak_memory_gb, measure_saved_activation_elements
from voxseg.plans import NetworkPlan, Plan

MRI = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}  # 4 outputs (softmax)


def raw_dataset(channel_names=MRI, labels=LABELS) -> RawDataset:
    meta = {"name": "Test", "channel_names": channel_names, "labels": labels, "file_ending": ".nii.gz"}
    return RawDataset(Path("/data/Test"), meta)


def fingerprint(spacings, shapes, relative=0.45, intensity=None) -> dict:
    return {"spacings": [list(map(float, s)) for s in spacings], "shapes_after_crop": [list(s) for s in shapes],
            "median_relative_size_after_cropping": relative, "foreground_intensity": intensity or {}}


def brats_like(num_cases=1250) -> dict:
    return fingerprint([[1.0, 1.0, 1.0]] * num_cases, [[140, 170, 140]] * num_cases)


def strides_along(network: NetworkPlan, axis: int) -> int:
    return sum(1 for s in network.strides if s[axis] == 2)


# ----- isotropic / BraTS-like ---------------------------------------------------------------------------------
def test_brats_like_8gb():
    plan = make_plan(brats_like(), raw_dataset(), gpu_memory_gb=8.0)
    assert plan.target_spacing == [1.0, 1.0, 1.0] and plan.anisotropy_axis is None
    assert plan.median_shape_after_resample == [140, 170, 140]
    assert plan.patch_size == [128, 128, 128]
    assert plan.batch_size == 2
    assert plan.network.features == [32, 64, 128, 256, 320, 320]
    assert plan.network.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert plan.network.kernel_sizes == [[3, 3, 3]] * 6
    assert 6.0 < plan.estimated_memory_gb <= 8.0
    # the next larger patch the search visited would not have fitted
    assert estimate_memory_gb(plan.network, [128, 128, 160], 2, 4, 4) > 8.0
    assert plan.network.deep_supervision and plan.foreground_oversampling == 0.33 and plan.image_dtype == "float16"
    assert all(n.scheme == "zscore" and n.use_nonzero_mask for n in plan.normalization)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_bigger_budget_gives_bigger_batch_and_patch():
    small = make_plan(brats_like(), raw_dataset(), gpu_memory_gb=8.0)
    big = make_plan(brats_like(), raw_dataset(), gpu_memory_gb=40.0)
    assert big.batch_size > small.batch_size
    assert math.prod(big.patch_size) > math.prod(small.patch_size)
    # never larger than the median case rounded up to the total stride (32)
    assert big.patch_size == [160, 192, 160]
    assert big.estimated_memory_gb <= 40.0
    assert estimate_memory_gb(big.network, big.patch_size, big.batch_size + 1, 4, 4) > 40.0


def test_batch_capped_at_five_percent_of_dataset():
    plan = make_plan(brats_like(num_cases=60), raw_dataset(), gpu_memory_gb=80.0)
    cap = int(0.05 * 60 * 140 * 170 * 140 / math.prod(plan.patch_size))
    assert plan.batch_size == max(2, cap) < 8  # the memory alone would allow ~11
    tiny = make_plan(brats_like(num_cases=8), raw_dataset(), gpu_memory_gb=80.0)
    assert tiny.batch_size == 2  # never below 2


def test_tiny_budget_falls_back_to_smallest_patch_batch_2():
    plan = make_plan(brats_like(), raw_dataset(), gpu_memory_gb=0.5)
    assert plan.batch_size == 2
    assert plan.patch_size == [8, 8, 8]
    assert plan.network.total_stride == [2, 2, 2]


# ----- anisotropic ----------------------------------------------------------------------------------------------
def test_anisotropic_target_spacing_and_topology():
    spacings = [[5.0, 0.8, 0.8]] * 8 + [[3.0, 0.8, 0.8], [3.6, 0.8, 0.8]]
    plan = make_plan(fingerprint(spacings, [[20, 320, 320]] * 10, relative=0.9), raw_dataset(), 8.0)
    assert plan.anisotropy_axis == 0
    expected = np.percentile([s[0] for s in spacings], 10)
    assert expected < 5.0  # the median would have been 5
    assert plan.target_spacing == pytest.approx([expected, 0.8, 0.8])
    assert plan.network.kernel_sizes[0] == [1, 3, 3]
    # no stage limit (as nnU-Net): in plane 320 halves 6 times (-> 5), axis 0 twice (20 -> 5)
    assert strides_along(plan.network, 0) == 2 < strides_along(plan.network, 1) == 6
    assert plan.patch_size[0] <= 32 and plan.patch_size[1] >= 128
    for p, t in zip(plan.patch_size, plan.network.total_stride):
        assert p % t == 0
    assert all(not n.use_nonzero_mask for n in plan.normalization)  # cropping barely shrank the cases


def test_anisotropic_spacing_not_finer_than_other_axes():
    spacings = np.array([[4.0, 1.0, 1.0]] * 8 + [[0.5, 1.0, 1.0]] * 2)
    few_slices = np.array([[40, 200, 200]] * 10)  # 40 x 3 < 200: anisotropic in voxels too
    target, axis = plan_target_spacing(spacings, few_slices)
    assert axis == 0 and target == [1.0, 1.0, 1.0]  # 10th percentile 0.5 clamped to the in-plane 1.0
    target, axis = plan_target_spacing(np.array([[2.5, 1.0, 1.0]] * 5), few_slices[:5])
    assert axis is None and target == [2.5, 1.0, 1.0]  # ratio 2.5 <= 3: plain median


def test_anisotropic_target_needs_spacing_and_voxel_counts():
    """nnU-Net's rule: the 10th percentile only when the coarse axis is > 3x coarser than every other axis
    AND has > 3x fewer voxels than every other axis; the separate resampling axis needs the spacing only."""
    spacings = np.array([[5.0, 0.8, 0.8]] * 9 + [[3.0, 0.8, 0.8]])
    p10 = 3.0 + 0.9 * (5.0 - 3.0)  # numpy's linear 10th percentile of [3, 5 x 9]: 4.8
    target, axis = plan_target_spacing(spacings, np.array([[40, 320, 320]] * 10))  # 40 x 3 = 120 < 320
    assert axis == 0 and target == pytest.approx([p10, 0.8, 0.8])
    target, axis = plan_target_spacing(spacings, np.array([[110, 320, 320]] * 10))  # 110 x 3 = 330 >= 320
    assert axis == 0 and target == [5.0, 0.8, 0.8]  # the median: enough slices
    # 3.0 mm against (0.5, 1.1): > 3x the finest (separate resampling) but not > 3x the coarser other axis
    target, axis = plan_target_spacing(np.array([[3.0, 0.5, 1.1]] * 4), np.array([[20, 400, 200]] * 4))
    assert axis == 0 and target == [3.0, 0.5, 1.1]


def test_topology_rules():
    net = derive_topology([20, 320, 320], [5.0, 0.8, 0.8])
    # by hand: 5 >= 2 x 0.8 -> in plane only ([1,2,2]) at spacings 0.8 and 1.6; 5 < 2 x 3.2 -> all axes for
    # two stages (20 -> 10 -> 5); axis 0 at 5 < 8 voxels stops, in plane goes on 20 -> 10 -> 5
    assert net.strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert net.kernel_sizes[:2] == [[1, 3, 3], [1, 3, 3]] and net.kernel_sizes[2:] == [[3, 3, 3]] * 5
    small = derive_topology([96, 96, 96], [1.0, 1.0, 1.0])  # 96 -> 6 after 4 halvings; 6 < 8 stops
    assert small.n_stages == 5 and small.total_stride == [16, 16, 16]
    assert small.features == [32, 64, 128, 256, 320]
    brats = derive_topology([112, 160, 128], [1.0, 1.0, 1.0])  # 112 -> 7 after 4 halvings: the last is [1,2,2]
    assert brats.strides == [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]] and brats.total_stride == [16, 32, 32]
    # spacing exactly 2x the finest is not "within 2x": that axis waits (kernel 1) for one stage
    assert derive_topology([64, 64, 64], [2.0, 1.0, 1.0]).strides[1] == [1, 2, 2]
    # a single axis left is halved only while it has >= 12 voxels: 48 -> 24 -> 12 -> 6, not 6 -> 3
    lone = derive_topology([4, 48, 4], [1.0, 1.0, 1.0])
    assert lone.strides == [[1, 1, 1], [1, 2, 1], [1, 2, 1], [1, 2, 1]] and lone.kernel_sizes[-1] == [3, 3, 3]
    assert derive_topology([4, 11, 4], [1.0, 1.0, 1.0]).strides == [[1, 1, 1]]  # 11 < 12


# ----- normalisation -------------------------------------------------------------------------------------------
def test_ct_channel_uses_dataset_percentiles():
    stats = {"1": {"mean": 99.4, "std": 39.4, "median": 101.0, "min": -900.0, "max": 3000.0,
                   "percentile_00_5": -17.0, "percentile_99_5": 201.0}}
    fp = fingerprint([[2.5, 0.8, 0.8]] * 4, [[100, 200, 200]] * 4, relative=0.9, intensity=stats)
    plan = make_plan(fp, raw_dataset({"0": "T2", "1": "ct"}, {"background": 0, "liver": 1}), 8.0)
    t2, ct = plan.normalization
    assert t2.scheme == "zscore" and not t2.use_nonzero_mask
    assert (ct.scheme, ct.clip_low, ct.clip_high, ct.mean, ct.std) == ("ct", -17.0, 201.0, 99.4, 39.4)
    with pytest.raises(DatasetError, match="CT"):
        make_plan(fingerprint([[1.0] * 3] * 4, [[64] * 3] * 4), raw_dataset({"0": "CT"}, {"background": 0, "a": 1}))


# ----- memory model ----------------------------------------------------------------------------------------------
def test_memory_model_monotone_in_batch_and_patch():
    net = derive_topology([128, 128, 128], [1.0, 1.0, 1.0])
    by_batch = [estimate_memory_gb(net, [128] * 3, b, 4, 4) for b in (1, 2, 3, 4)]
    assert all(a < b for a, b in zip(by_batch, by_batch[1:]))
    assert by_batch[2] - by_batch[1] == pytest.approx(by_batch[1] - by_batch[0])  # linear in batch
    patches = [[64] * 3, [96] * 3, [128, 128, 96], [128] * 3, [128, 128, 160], [160] * 3]
    by_patch = [estimate_memory_gb(net, p, 2, 4, 4) for p in patches]
    assert all(a < b for a, b in zip(by_patch, by_patch[1:]))
    assert estimate_memory_gb(net, [128] * 3, 2, 4, 4, dtype_bytes=4) > by_batch[1]


TOPOLOGIES = [
    dict(features=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    dict(features=[4, 8, 16, 16], kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
         strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], conv_per_stage=3),
    dict(features=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], residual=True),
]


def _tiny_plan(network: dict, patch: list[int]) -> Plan:
    return Plan(dataset_name="t", raw_dataset="/t", channel_names={"0": "a", "1": "b"}, labels=LABELS,
                file_ending=".nii.gz", target_spacing=[1.0, 1.0, 1.0], patch_size=patch, batch_size=1,
                network=NetworkPlan(**network), normalization=[{"scheme": "zscore"}] * 2)


@pytest.mark.parametrize("network", TOPOLOGIES)
def test_activation_count_matches_real_network(network):
    pytest.importorskip("voxseg.models")
    from voxseg.models import build_network, count_parameters

    plan = _tiny_plan(network, [16, 16, 16])
    measured = measure_saved_activation_elements(plan)
    analytic = activation_elements(plan.network, plan.patch_size, plan.num_channels)
    assert analytic == pytest.approx(measured, rel=0.25)
    real = count_parameters(build_network(plan))
    assert parameter_count(plan.network, 2, plan.num_outputs) == pytest.approx(real, rel=0.1)


@pytest.mark.gpu
def test_memory_model_against_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plan = make_plan(brats_like(), raw_dataset(), gpu_memory_gb=8.0)
    measured = measure_peak_memory_gb(plan, "cuda")
    estimated = plan.estimated_memory_gb - CUDA_CONTEXT_GB
    assert measured == pytest.approx(estimated, rel=0.3)


# ----- overrides -----------------------------------------------------------------------------------------------
def test_overrides_applied_and_plan_valid():
    plan = make_plan(brats_like(), raw_dataset(), 8.0, overrides={
        "batch_size": "4", "patch_size": "96,96,96", "network.residual": "true", "target_spacing": [1, 1, 1],
        "foreground_oversampling": 0.5})
    assert plan.batch_size == 4 and plan.patch_size == [96, 96, 96] and plan.network.residual
    assert plan.foreground_oversampling == 0.5
    assert plan.network.n_stages == 5 and plan.network.total_stride == [16, 16, 16]  # re-derived for 96^3
    assert plan.estimated_memory_gb == pytest.approx(estimate_memory_gb(plan.network, [96] * 3, 4, 4, 4), abs=1e-3)
    Plan.from_dict(plan.to_dict())  # still validates


def test_patch_override_refits_batch_and_target_spacing_changes_shape():
    plan = make_plan(brats_like(), raw_dataset(), 40.0, overrides={"patch_size": [64, 64, 64]})
    assert plan.batch_size > 10 and plan.estimated_memory_gb <= 40.0
    coarse = make_plan(brats_like(), raw_dataset(), 8.0, overrides={"target_spacing": "2,2,2"})
    assert coarse.median_shape_after_resample == [70, 85, 70]


def test_network_override_kept_with_patch_override():
    plan = make_plan(brats_like(), raw_dataset(), 8.0, overrides={
        "patch_size": [64, 64, 64], "network.features": "[16,32,64]",
        "network.strides": "[[1,1,1],[2,2,2],[2,2,2]]", "network.kernel_sizes": "[[3,3,3],[3,3,3],[3,3,3]]",
        "network.conv_per_stage": "3"})
    assert plan.network.features == [16, 32, 64] and plan.network.conv_per_stage == 3
    assert plan.network.total_stride == [4, 4, 4]


def test_override_errors():
    with pytest.raises(ConfigError, match="did you mean 'patch_size'"):
        make_plan(brats_like(), raw_dataset(), overrides={"patch_sise": [96, 96, 96]})
    with pytest.raises(ConfigError, match="did you mean 'network.residual'"):
        make_plan(brats_like(), raw_dataset(), overrides={"network.residul": True})
    with pytest.raises(ConfigError, match="patch_size\\[0\\]=100 .* use a multiple of 16"):
        make_plan(brats_like(), raw_dataset(), overrides={"patch_size": [100, 96, 96]})
    with pytest.raises(ConfigError, match="batch_size"):
        make_plan(brats_like(), raw_dataset(), overrides={"batch_size": "four"})


# ----- 2D ------------------------------------------------------------------------------------------------------
def test_2d_plan():
    plan = make_plan(brats_like(), raw_dataset(), 8.0, dims=2)
    assert plan.network.ndim == 2 and len(plan.patch_size) == 2
    assert plan.patch_size == [192, 160]  # in-plane median 170x140 rounded up to the stride 32
    assert plan.network.kernel_sizes[0] == [3, 3] and plan.network.features[-1] == 512
    assert plan.batch_size > 20 and plan.estimated_memory_gb <= 8.0
    assert len(plan.target_spacing) == 3


def test_describe_plan():
    text = describe_plan(make_plan(brats_like(), raw_dataset(), 8.0))
    assert "128x128x128 x 2" in text and "6 stages" in text and "budget 8 GB" in text


# ----- plan_dataset ----------------------------------------------------------------------------------------------
def _write_dataset(root: Path, num_cases: int = 6) -> None:
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"name": "Mini", "channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": 1},
            "numTraining": num_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0))
    for i in range(num_cases):
        image = np.zeros((24, 24, 24), np.float32)
        image[2:22, 3:21, 4:20] = rng.normal(50, 10, (20, 18, 16))
        seg = np.zeros((24, 24, 24), np.uint8)
        seg[8:14, 8:14, 8:14] = 1
        write_image(root / "imagesTr" / f"case{i}_0000.nii.gz", image, geometry)
        write_image(root / "labelsTr" / f"case{i}.nii.gz", seg, geometry)


def test_plan_dataset_writes_workdir_and_keeps_custom_splits(tmp_path):
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)
    plan = plan_dataset(raw, work, gpu_memory_gb=8.0, num_folds=3)
    for name in ("fingerprint.json", "plans.json", "splits.json", "dataset.json"):
        assert (work / name).is_file()
    assert Plan.load(work / "plans.json") == plan
    assert plan.median_shape_after_resample == [20, 18, 16] and plan.patch_size == [20, 20, 16]  # stride 4 per axis
    assert len(json.loads((work / "splits.json").read_text())) == 3
    custom = [{"train": ["case0", "case1"], "val": ["case2"]}]
    (work / "splits.json").write_text(json.dumps(custom))
    plan_dataset(raw, work, gpu_memory_gb=8.0, val_fraction=0.5)
    assert json.loads((work / "splits.json").read_text()) == custom


def test_plan_dataset_refuses_broken_dataset(tmp_path):
    raw = tmp_path / "Mini"
    _write_dataset(raw, num_cases=3)
    (raw / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(DatasetError):
        plan_dataset(raw, tmp_path / "work")
    assert not (tmp_path / "work" / "plans.json").exists()


def test_the_planner_never_imports_the_network_code():
    """data/ sits beside models/: the memory model shares `voxseg.network_plan` with the network, not its code."""
    import ast

    import voxseg.data

    for path in Path(voxseg.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" if node.module == "voxseg" else node.module or ""
                         for a in node.names]
            assert not any(n == "voxseg.models" or n.startswith("voxseg.models.") for n in names), path.name


def test_nnunet_dataset_conventions_plain_number_regions_and_splits_final(tmp_path):
    from voxseg.data.synth import make_synthetic_dataset

    raw = make_synthetic_dataset(tmp_path / "Dataset002_Regions", num_cases=4, shape=(16, 16, 16), regions=True)
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"]["enhancing_tumor"] = 3  # a one-value region as a plain number, as nnU-Net accepts
    (raw / "dataset.json").write_text(json.dumps(meta))
    folds = [{"train": ["SYN_000", "SYN_001", "SYN_002"], "val": ["SYN_003"]},
             {"train": ["SYN_001", "SYN_002", "SYN_003"], "val": ["SYN_000"]}]
    (raw / "splits_final.json").write_text(json.dumps(folds))
    plan = plan_dataset(raw, tmp_path / "work", gpu_memory_gb=8.0)
    assert plan.is_region_based and plan.regions == [[1, 2, 3], [2, 3], [3]] and plan.num_outputs == 3
    assert json.loads((tmp_path / "work" / "splits.json").read_text()) == folds  # nnU-Net's folds, as they are
    folds[1]["val"] = ["SYN_999"]
    (raw / "splits_final.json").write_text(json.dumps(folds))
    with pytest.raises(ConfigError,
                       match=r"splits_final.json: fold 1 names case\(s\) that are not in the dataset: SYN_999"):
        plan_dataset(raw, tmp_path / "work2", gpu_memory_gb=8.0)
    assert not (tmp_path / "work2").exists()  # refused before anything was written
