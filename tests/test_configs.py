"""nnU-Net's configurations: 3d_fullres (aspect-ratio patch), 2d (slicing along the coarsest axis), 3d_lowres
and 3d_cascade_fullres, checked against numbers worked out by hand from nnU-Net 2.8.1's rules; their storage in
a work directory and `--configuration NAME` through plan / preprocess / train / predict."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from voxseg.data.configs import config_workdir, load_index
from voxseg.data.dataset import RawDataset
from voxseg.data.io import Geometry, write_image
from voxseg.data.lowres import LOWRES_SPACING_STEP
from voxseg.data.memory import estimate_memory_gb
from voxseg.data.plan import make_plan, make_plans, plan_dataset, plan_slice_axis
from voxseg.data.splits import get_fold, load_splits
from voxseg.errors import ConfigError
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

MRI = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}
UNLIMITED_GB = 1e6  # memory never binds: every number follows from nnU-Net's rules alone


def raw_dataset(channel_names=MRI, labels=LABELS) -> RawDataset:
    meta = {"name": "Test", "channel_names": channel_names, "labels": labels, "file_ending": ".nii.gz"}
    return RawDataset(Path("/data/Test"), meta)


def fingerprint(spacing, shape, num_cases) -> dict:
    return {"spacings": [list(map(float, spacing))] * num_cases, "shapes_after_crop": [list(shape)] * num_cases,
            "median_relative_size_after_cropping": 0.5, "foreground_intensity": {}}


# ----- 3d_fullres: the aspect-ratio patch -------------------------------------------------------------------
def test_brats_like_fullres_follows_the_median_aspect_ratio_at_8gb():
    """Median brain crop 134x168x138 at 1 mm, 4 channels, 4 outputs, 8 GiB. nnU-Net's search: start at the
    median rounded up to the total stride 32 (160x192x160), then shrink the axis largest relative to the median:
    axis 0 (160/134 = 1.19) -> 128, axis 2 (160/138 = 1.16) -> 128, axis 1 (192/168 = 1.14) -> 160; at
    128x160x128 axis 0 (128/134 = 0.955 > 160/168 = 0.952) again, by the stride of 128 - 32 = 96 (4
    halvings: 16) -> 112. 112 halves 4 times (-> 7), so the last stride is [1, 2, 2]."""
    plans = make_plans(fingerprint([1, 1, 1], [134, 168, 138], 400), raw_dataset(), gpu_memory_gb=8.0)
    fullres = plans["3d_fullres"]
    assert fullres.patch_size == [112, 160, 128]  # nnU-Net 2.8.1's patch for this fingerprint
    assert fullres.network.strides == [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]]
    assert fullres.network.kernel_sizes == [[3, 3, 3]] * 6 and fullres.batch_size == 2
    # it fits the budget; the patch before the last step (128x160x128) does not
    assert fullres.estimated_memory_gb <= 8.0 < estimate_memory_gb(fullres.network, [128, 160, 128], 2, 4, 4)
    # coverage 112*160*128 / (134*168*138) = 0.74 >= 0.25: no 3d_lowres, no cascade
    assert list(plans) == ["3d_fullres", "2d"]
    two_d = plans["2d"]
    assert two_d.slice_axis == 0 and two_d.patch_size == [192, 160]  # 168x138 rounded up to the stride 32
    assert two_d.network.features == [32, 64, 128, 256, 512, 512] and two_d.configuration == "2d"


def test_cube_patch_keeps_the_previous_rule():
    fp = fingerprint([1, 1, 1], [134, 168, 138], 400)
    cube = make_plan(fp, raw_dataset(), 8.0, cube_patch=True)
    assert cube.patch_size == [128, 128, 128] and cube.network.strides[-1] == [2, 2, 2]
    # for a median of 140x170x140 nnU-Net (and the aspect rule) end at the cube too: 128/140 < 160/170
    assert make_plan(fingerprint([1, 1, 1], [140, 170, 140], 400), raw_dataset(), 8.0).patch_size == [128] * 3


# ----- 2d: the slicing axis -----------------------------------------------------------------------------------
def test_2d_slices_along_the_coarsest_axis():
    assert plan_slice_axis([1.0, 1.0, 1.0]) == 0  # a tie: the first axis
    assert plan_slice_axis([0.8, 0.8, 3.0]) == 2
    assert plan_slice_axis([1.0, 1.0, 1.0], median_spacing=[1.0, 1.0, 4.0]) == 2  # a clamped 10th percentile
    plan = make_plan(fingerprint([0.7, 0.7, 2.5], [300, 260, 90], 20), raw_dataset(), 8.0, dims=2)
    assert plan.slice_axis == 2 and plan.configuration == "2d"
    # the patch covers axes 0 and 1 (300 x 260 at 0.7 mm): 300 -> 150 -> 75 -> 38 -> 19 -> 10 -> 5 and
    # 260 -> 130 -> 65 -> 33 -> 17 -> 9 -> 5, 6 halvings each: total stride 64, padded to 320 x 320
    assert plan.network.total_stride == [64, 64] and plan.patch_size == [320, 320]
    with pytest.raises(ConfigError, match="slice_axis 3"):
        Plan.from_dict({**plan.to_dict(), "slice_axis": 3})


# ----- 3d_lowres and the cascade on a large anisotropic image ---------------------------------------------------
def test_large_anisotropic_image_gets_lowres_and_cascade_with_nnunets_numbers():
    """4 x 1 x 1 mm, median 500 x 1200 x 1200 voxels, 4 cases, memory unlimited. By hand, nnU-Net's rules:

    3d_fullres: 1/spacing (0.25, 1, 1) scaled to 256^3 voxels: x 256 * 4^(1/3) = 406.4 -> 102 x 406 x 406.
    Topology at (4, 1, 1): in plane only while 4 >= 2 x spacing (stages 1, 2: spacing 2, then 4), then all
    axes: 102 -> 51 -> 26 -> 13 -> 7 (4 halvings, 7 < 8), in plane 406 -> ... -> 7 (6 halvings); total stride
    16 x 64 x 64, padded to 112 x 448 x 448. Coverage 112*448*448 / (500*1200*1200) = 0.031 < 0.25: lowres.
    3d_lowres: the in-plane spacing (finer than half of 4) grows by 3% per step until 4 / 1.03^k <= 2: k = 24
    (1.03^23 = 1.97, 1.03^24 = 2.03); then every axis by 3% per step. From there the aspect ratio is fixed, so
    the starting patch is too: 4 : 2.03 -> 163 x 321 x 321, total stride 32 x 64 x 64 -> 192 x 384 x 384.
    Coverage after m all-axes steps: 192*384*384 / (500 * 1200^2 / 1.03^(48 + 3m)) = 0.1625 x 1.03^(3m) >= 0.25
    first at m = 5 (0.2532; m = 4: 0.2317). Spacing 4 x 1.03^5 = 4.637, 1.03^29 = 2.357; median 500 / 1.03^5 =
    431, 1200 / 1.03^29 = 509. Kept: it shrinks the median case 1.03^63 = 6.4x (>= 2x).
    """
    plans = make_plans(fingerprint([4, 1, 1], [500, 1200, 1200], 4), raw_dataset(), gpu_memory_gb=UNLIMITED_GB)
    assert list(plans) == ["3d_fullres", "2d", "3d_lowres", "3d_cascade_fullres"]
    fullres, lowres, cascade = plans["3d_fullres"], plans["3d_lowres"], plans["3d_cascade_fullres"]
    assert fullres.target_spacing == [4.0, 1.0, 1.0] and fullres.anisotropy_axis == 0
    assert fullres.patch_size == [112, 448, 448]
    assert fullres.network.strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2]] + [[2, 2, 2]] * 4
    assert fullres.network.kernel_sizes == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5
    assert fullres.batch_size == int(0.05 * 4 * 500 * 1200 * 1200 / (112 * 448 * 448)) == 6  # the 5% cap
    step = LOWRES_SPACING_STEP
    assert step == 1.03
    assert lowres.target_spacing == pytest.approx([4 * step**5, step**29, step**29])
    assert lowres.median_shape_after_resample == [round(500 / step**5), round(1200 / step**29),
                                                  round(1200 / step**29)] == [431, 509, 509]
    assert lowres.patch_size == [192, 384, 384]
    assert lowres.network.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5 + [[1, 2, 2]]
    assert lowres.batch_size == 2  # 5% of 4 x 431 x 509 x 509 voxels is < 1 patch: the minimum
    assert lowres.anisotropy_axis == 0 and lowres.normalization == fullres.normalization
    assert math.prod(lowres.patch_size) / math.prod([500 / step**5, 1200 / step**29, 1200 / step**29]) >= 0.25
    # the cascade's second stage is the full-resolution plan, after 3d_lowres
    assert cascade.previous_stage == "3d_lowres" and cascade.configuration == "3d_cascade_fullres"
    assert cascade.patch_size == fullres.patch_size and cascade.target_spacing == fullres.target_spacing
    # 2d slices along axis 0 (4 mm): 1200 halves 8 times (600, 300, 150, 75, 38, 19, 10, 5): stride 256 -> 1280
    assert plans["2d"].slice_axis == 0 and plans["2d"].patch_size == [1280, 1280]
    assert plans["2d"].network.n_stages == 9 and plans["2d"].network.features[-1] == 512


def test_large_ct_at_8gb_matches_nnunets_planner():
    """2.5 x 0.8 x 0.8 mm, 100 cases of 400x512x512, one CT channel, 3 outputs, 8 GiB. nnU-Net 2.8.1's planner
    (run on the same fingerprint) plans 3d_fullres 112x128x128 and 3d_lowres at 4.132 x 2.122 x 2.122 mm
    (median 242x193x193) with patch 160x128x112; voxseg's memory model lands on the same patches. The spacing:
    16 in-plane-only steps (2.5 / (0.8 x 1.03^15) > 2), then 17 steps of every axis: 0.8 x 1.03^33, 2.5 x 1.03^17."""
    stats = {"0": {"mean": 60.0, "std": 80.0, "percentile_00_5": -150.0, "percentile_99_5": 300.0}}
    fp = {**fingerprint([2.5, 0.8, 0.8], [400, 512, 512], 100), "foreground_intensity": stats}
    plans = make_plans(fp, raw_dataset({"0": "CT"}, {"background": 0, "liver": 1, "tumour": 2}), 8.0)
    assert list(plans) == ["3d_fullres", "2d", "3d_lowres", "3d_cascade_fullres"]
    fullres, lowres = plans["3d_fullres"], plans["3d_lowres"]
    assert fullres.patch_size == [112, 128, 128] and fullres.network.strides[1] == [1, 2, 2]
    assert lowres.target_spacing == pytest.approx([2.5 * 1.03**17, 0.8 * 1.03**33, 0.8 * 1.03**33])
    assert lowres.median_shape_after_resample == [242, 193, 193] and lowres.patch_size == [160, 128, 112]
    assert lowres.network.strides == [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[2, 2, 1]]
    assert plans["2d"].slice_axis == 0 and plans["2d"].patch_size == [512, 512]


def test_lowres_is_dropped_when_it_barely_shrinks_the_image():
    """A median just over 4x the 256^3 starting patch: one 3% step covers a quarter, but the median case then
    shrinks by 1.03^3 = 1.09x < 2x, so nnU-Net drops 3d_lowres (and the cascade)."""
    side = 410  # 256^3 / 410^3 = 0.244 < 0.25; one step: 410 / 1.03 = 398, 256^3 / 398^3 = 0.266
    plans = make_plans(fingerprint([1, 1, 1], [side] * 3, 4), raw_dataset(), gpu_memory_gb=UNLIMITED_GB)
    assert plans["3d_fullres"].patch_size == [256] * 3
    assert list(plans) == ["3d_fullres", "2d"]


def test_cascade_is_refused_for_export():
    plans = make_plans(fingerprint([4, 1, 1], [500, 1200, 1200], 4), raw_dataset(), gpu_memory_gb=UNLIMITED_GB)
    with pytest.raises(ConfigError, match="cascade.*ONNX export.*not supported.*--configuration 3d_lowres"):
        plans["3d_cascade_fullres"].check_runnable("ONNX export")
    plans["3d_lowres"].check_runnable("ONNX export")  # the first stage is a plain 3D configuration
    # the cascade's network takes the image and the first stage's segmentation, one channel per label
    assert plans["3d_cascade_fullres"].network_in_channels == 4 + 3 and plans["3d_lowres"].network_in_channels == 4


# ----- the work directory -------------------------------------------------------------------------------------
def _write_dataset(root: Path, num_cases: int = 4, spacing=(1.0, 1.0, 3.0)) -> None:
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    meta = {"name": "Mini", "channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": 1},
            "numTraining": num_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    geometry = Geometry.from_spacing(spacing)
    for i in range(num_cases + 1):
        image = rng.normal(0, 1, (20, 20, 12)).astype(np.float32)
        seg = np.zeros((20, 20, 12), np.uint8)
        seg[6:13, 5:12, 3:8] = 1
        image[seg == 1] += 3.0
        folder = "imagesTs" if i == num_cases else "imagesTr"
        write_image(root / folder / f"case{i}_0000.nii.gz", image, geometry)
        if i < num_cases:
            write_image(root / "labelsTr" / f"case{i}.nii.gz", seg, geometry)


def test_plan_dataset_stores_every_configuration_with_the_same_folds(tmp_path):
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)
    default = plan_dataset(raw, work, num_folds=2)
    assert default.configuration == "3d_fullres" and Plan.load(work / "plans.json") == default
    index = json.loads(WorkDir(work).configurations.read_text())
    assert index == {"default": "3d_fullres", "configurations": {
        "3d_fullres": {"path": "."}, "2d": {"path": "configs/2d"}}}
    two_d_dir = config_workdir(work, "2d")
    assert two_d_dir == work / "configs" / "2d" and config_workdir(work, "3d_fullres") == work
    two_d = Plan.load(two_d_dir / "plans.json")
    assert two_d.network.ndim == 2 and two_d.slice_axis == 2  # 3 mm along axis 2: the coarsest
    assert (two_d_dir / "fingerprint.json").is_file() and (two_d_dir / "dataset.json").is_file()
    assert not (two_d_dir / "splits.json").exists() and load_splits(two_d_dir) == load_splits(work)
    # a hand-edited split of the work directory is the split of every configuration
    (work / "splits.json").write_text(json.dumps([{"train": ["case0", "case1", "case2"], "val": ["case3"]}]))
    assert get_fold(two_d_dir, 0) == get_fold(work, 0) == (["case0", "case1", "case2"], ["case3"])
    with pytest.raises(ConfigError, match="unknown configuration '3d_lowres'.*Valid choices: 3d_fullres, 2d"):
        config_workdir(work, "3d_lowres")


def test_old_work_directory_without_index(tmp_path):
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)
    plan_dataset(raw, work, num_folds=2)
    WorkDir(work).configurations.unlink()
    data = json.loads((work / "plans.json").read_text())
    for key in ("configuration", "slice_axis", "previous_stage"):  # a plans.json written before these fields
        del data[key]
    (work / "plans.json").write_text(json.dumps(data))
    assert Plan.load(work / "plans.json").configuration == "3d_fullres"
    assert load_index(work) == {"default": "3d_fullres", "configurations": {"3d_fullres": {"path": "."}}}
    assert config_workdir(work, "3d_fullres") == work and config_workdir(work) == work
    with pytest.raises(ConfigError, match="unknown configuration '2d'"):
        config_workdir(work, "2d")


# ----- --configuration through the commands ---------------------------------------------------------------------
TRAIN_TINY = ["--epochs", "1", "--iterations", "2", "--device", "cpu", "--set", "logging.tensorboard=false",
              "--set", "logging.progress_png=false", "--set", "logging.progress_bar=false",
              "--set", "loop.val_iterations=1", "--set", "loop.full_val=false", "--set", "data.num_threads=1",
              "--set", "plan.batch_size=2",
              "--set", "plan.network.features=[4,8,8]", "--set", "plan.network.strides=[[1,1],[2,2],[2,2]]",
              "--set", "plan.network.kernel_sizes=[[3,3],[3,3],[3,3]]", "--set", "plan.patch_size=16,16"]


def _main(*args: object) -> int:
    from voxseg.cli import main

    return main([str(a) for a in args])


def test_configuration_flag_selects_the_2d_configuration_end_to_end(tmp_path, capsys):
    raw, work, preds = tmp_path / "Mini", tmp_path / "work", tmp_path / "preds"
    _write_dataset(raw)
    assert _main("plan", raw, "-o", work, "--folds", 2) == 0
    out = capsys.readouterr().out
    assert "configurations (select one with --configuration NAME)" in out and "slices along axis 2" in out
    assert _main("preprocess", work, "--configuration", "2d", "--quiet") == 0
    two_d = work / "configs" / "2d"
    assert len(list((two_d / "preprocessed").glob("case?.npy"))) == 4
    assert not (work / "preprocessed").exists()  # only the selected configuration was preprocessed
    assert _main("train", work, "--configuration", "2d", "--fold", 0, *TRAIN_TINY) == 0
    run_plan = Plan.load(two_d / "training" / "fold_0" / "plans.json")
    assert run_plan.configuration == "2d" and run_plan.slice_axis == 2 and run_plan.patch_size == [16, 16]
    assert _main("predict", "-m", work, "--configuration", "2d", "-i", raw / "imagesTs", "-o", preds,
                 "--device", "cpu", "--no-mirror") == 0
    from voxseg.data.io import read_image

    labels, _ = read_image(preds / "case4.nii.gz")
    assert labels.shape == (20, 20, 12)  # the input's own grid, the 2D network run slice by slice along axis 2
    capsys.readouterr()
    assert _main("train", work, "--configuration", "3d_lowres", "--fold", 0, *TRAIN_TINY) != 0
    err = capsys.readouterr().err
    assert "unknown configuration '3d_lowres'" in err and "3d_fullres, 2d" in err and "Traceback" not in err


def test_cascade_without_its_first_stage_refused_by_train_and_predict(tmp_path, capsys):
    raw, work = tmp_path / "Mini", tmp_path / "work"
    _write_dataset(raw)
    plan_dataset(raw, work, num_folds=2)
    # a cascade stage whose first stage is not planned in this work directory
    cascade_dir = work / "configs" / "3d_cascade_fullres"
    cascade_dir.mkdir(parents=True)
    plan = Plan.load(work / "plans.json")
    plan.configuration, plan.previous_stage = "3d_cascade_fullres", "3d_lowres"
    plan.save(cascade_dir / "plans.json")
    index = json.loads(WorkDir(work).configurations.read_text())
    index["configurations"]["3d_cascade_fullres"] = {"path": "configs/3d_cascade_fullres",
                                                     "previous_stage": "3d_lowres"}
    WorkDir(work).configurations.write_text(json.dumps(index))
    assert _main("train", work, "--configuration", "3d_cascade_fullres", "--fold", 0, "--device", "cpu") != 0
    err = capsys.readouterr().err
    assert "unknown configuration '3d_lowres'" in err and "Traceback" not in err
    assert _main("predict", "-m", work, "--configuration", "3d_cascade_fullres", "-i", raw / "imagesTs",
                 "-o", tmp_path / "p", "--device", "cpu") != 0  # nothing trained: told to train it first
    err = capsys.readouterr().err
    assert "3d_cascade_fullres" in err and "voxseg train" in err and "Traceback" not in err
    assert not (cascade_dir / "training").exists()  # refused before anything was written


# ----- why 3d_lowres was not planned ----------------------------------------------------------------------------
def test_plan_says_why_3d_lowres_was_not_planned():
    notes: dict[str, str] = {}
    make_plans(fingerprint([1, 1, 1], [134, 168, 138], 400), raw_dataset(), gpu_memory_gb=8.0, notes=notes)
    assert notes == {"3d_lowres": "3d_lowres and 3d_cascade_fullres not planned: the 3d_fullres patch 112x160x128 "
                                  "covers 74% of the median case 134x168x138 (>= 25%)"}
    notes.clear()  # 256^3 / 410^3 = 24%; one 3% step reaches 25% but shrinks the case 1.03^3 = 1.09x only
    make_plans(fingerprint([1, 1, 1], [410] * 3, 4), raw_dataset(), gpu_memory_gb=UNLIMITED_GB, notes=notes)
    assert notes == {"3d_lowres": "3d_lowres and 3d_cascade_fullres not planned: the 3d_fullres patch 256x256x256 "
                                  "covers 24% of the median case 410x410x410 (< 25%), but at the spacing where a patch "
                                  "covers 25% of it (1.03x1.03x1.03 mm, patch 256x256x256) the median case has only "
                                  "1.09x fewer voxels (< 2x): not worth a second stage"}
    notes.clear()
    planned = make_plans(fingerprint([4, 1, 1], [500, 1200, 1200], 4), raw_dataset(), UNLIMITED_GB, notes=notes)
    assert "3d_lowres" in planned and notes == {}
    notes.clear()
    make_plans(fingerprint([1, 1, 5], [80, 96, 1], 4), raw_dataset(), gpu_memory_gb=8.0, notes=notes)
    assert notes == {"3d_fullres": "3d configurations not planned: the median case has a single slice along axis 2 "
                                   "(a 2D dataset)"}


def test_plan_command_prints_why(tmp_path, capsys):
    from voxseg.cli import main

    root = tmp_path / "Dataset001_Tiny"
    _write_dataset(root, spacing=(1.0, 1.0, 1.0))
    assert main(["plan", str(root), "-o", str(tmp_path / "work"), "--folds", "2"]) == 0
    plan = Plan.load(tmp_path / "work" / "plans.json")
    coverage = math.prod(plan.patch_size) / math.prod(plan.median_shape_after_resample)
    median = "x".join(map(str, plan.median_shape_after_resample))
    verb = f"covers {coverage:.0%} of the" if coverage < 1 else f"has {coverage:.0%} of the voxels of the"
    assert (f"3d_lowres and 3d_cascade_fullres not planned: the 3d_fullres patch {'x'.join(map(str, plan.patch_size))} "
            f"{verb} median case {median} (>= 25%)") in capsys.readouterr().out
