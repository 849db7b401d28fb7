"""The memory model of one case's prediction and its budget (`voxseg.infer.budget`): the parts scale as the
formula in docs/INFERENCE.md says, a smaller budget shrinks the restore slab before refusing, and a refusal names
the case, the parts and the budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import voxseg.infer.budget as budget
from tests.test_predictor import tiny_plan
from voxseg.errors import MemoryBudgetError
from voxseg.infer.budget import GIB, case_memory, fit_case
from voxseg.plans import NetworkPlan

CPU = torch.device("cpu")


def _ct_plan(classes: int):
    plan = tiny_plan({"background": 0, **{f"organ_{k}": k for k in range(1, classes)}}, channels=1)
    plan.target_spacing = [2.0, 1.5, 1.5]
    plan.patch_size = [96, 128, 128]
    plan.network = NetworkPlan(features=[32, 64, 128, 256, 320, 320], kernel_sizes=[[3, 3, 3]] * 6,
                               strides=[[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]])
    return plan


def test_the_parts_of_a_ct_case():
    """512 x 512 x 300 at 1.25 x 0.8 x 0.8 mm, 41 classes, planned at 2 x 1.5 x 1.5 mm: target grid 188 x 273 x
    273; the band is 42 x 96 x 273 x 273 float32, the labels one byte per voxel (and the written copy)."""
    plan = _ct_plan(41)
    memory = case_memory(plan, (1, 300, 512, 512), (1.25, 0.8, 0.8), CPU, 1 << 26, 1, "none")
    voxels = 300 * 512 * 512
    assert memory.image == voxels * 4
    assert memory.band == 42 * 96 * 273 * 273 * 4
    assert memory.labels == 2 * voxels and memory.probabilities == 0
    assert 2.5 * GIB < memory.peak < 4.5 * GIB  # measured: 3.31 GiB for the whole process (BENCHMARKS.md)
    in_memory = case_memory(plan, (1, 300, 512, 512), (1.25, 0.8, 0.8), CPU, 1 << 26, 1, "memory")
    assert in_memory.probabilities == 41 * voxels * 4  # predict_array(return_probabilities=True) holds them
    on_disk = case_memory(plan, (1, 300, 512, 512), (1.25, 0.8, 0.8), CPU, 1 << 26, 1, "disk")
    assert on_disk.probabilities < 0.01 * in_memory.probabilities
    on_gpu = case_memory(plan, (1, 300, 512, 512), (1.25, 0.8, 0.8), torch.device("cuda"), 1 << 26, 1, "none")
    assert on_gpu.band == on_gpu.forward == on_gpu.restore == 0  # the device's, with its own fallbacks


def test_label_values_above_255_take_two_bytes():
    plan = tiny_plan({"background": 0, "a": 1, "b": 300}, channels=1)
    memory = case_memory(plan, (1, 10, 10, 10), (1.0, 1.0, 1.0), CPU, 1 << 20, 1, "none")
    assert memory.labels == 2 * 1000 * 2


def test_a_smaller_budget_shrinks_the_restore_slab_then_refuses(monkeypatch):
    plan = _ct_plan(41)
    shape, spacing = (1, 300, 512, 512), (1.25, 0.8, 0.8)
    roomy = fit_case(plan, shape, spacing, CPU, 1 << 26, "none", max_memory_gb=64)
    assert roomy.restore_values == 1 << 26 and roomy.forward_tiles == 1  # a large tile runs alone on a CPU
    tight_gb = (roomy.memory.peak - roomy.memory.restore // 2) / GIB
    tight = fit_case(plan, shape, spacing, CPU, 1 << 26, "none", max_memory_gb=tight_gb)
    assert tight.restore_values < roomy.restore_values and tight.memory.peak <= tight_gb * GIB
    with pytest.raises(MemoryBudgetError) as refused:
        fit_case(plan, shape, spacing, CPU, 1 << 26, "memory", max_memory_gb=8)
    message = str(refused.value)
    assert message.startswith("predicting 1x300x512x512 voxels with 41 outputs needs about")
    assert "probabilities 12.01" in message and "8.0 GiB allowed (--max-memory 8)" in message
    assert "--save-probabilities writes them to disk" in message
    monkeypatch.setattr(budget, "available_memory_bytes", lambda device: 2 * GIB)
    with pytest.raises(MemoryBudgetError, match=r"85% of the 2.0 GiB available; --max-memory GB sets it"):
        fit_case(plan, shape, spacing, CPU, 1 << 26, "none", max_memory_gb=None)


def test_small_tiles_take_what_the_budget_leaves():
    plan = tiny_plan()  # 16^3 tiles: batched on a CPU
    small = fit_case(plan, (2, 30, 28, 20), (1.0, 1.0, 1.0), CPU, 1 << 26, "none", max_memory_gb=0.05)
    large = fit_case(plan, (2, 30, 28, 20), (1.0, 1.0, 1.0), CPU, 1 << 26, "none", max_memory_gb=1.0)
    assert 1 <= small.forward_tiles < large.forward_tiles


def test_a_cascade_stage_counts_its_one_hot_inputs_and_its_first_stage():
    """A 41-class CT cascade: the full-resolution stage's input holds 1 + 40 channels (image and one-hot of the
    first stage's labels), and the first stage, which runs before on the same image, has its own peak plus the
    label map it leaves on this stage's grid; a budget under that peak refuses the case and names the part."""
    first = _ct_plan(41)
    first.configuration, first.target_spacing = "3d_lowres", [4.0, 3.0, 3.0]
    cascade = _ct_plan(41)
    cascade.configuration, cascade.previous_stage = "3d_cascade_fullres", "3d_lowres"
    shape, spacing = (1, 300, 512, 512), (1.25, 0.8, 0.8)
    alone = case_memory(_ct_plan(41), shape, spacing, CPU, 1 << 26, 1, "none")
    staged = case_memory(cascade, shape, spacing, CPU, 1 << 26, 1, "none", previous=first)
    target = 188 * 273 * 273
    assert alone.network_input == 2 * 1 * target * 4 and alone.first_stage == 0
    assert staged.network_input == 2 * 41 * target * 4  # one copy and its padded copy of 41 channels
    first_alone = case_memory(first, shape, spacing, CPU, 1 << 26, 1, "none")
    assert staged.first_stage == first_alone.peak + target and staged.peak > alone.peak + 4 * GIB
    with pytest.raises(MemoryBudgetError, match=r"network input 4\.28.*first stage 2\.\d\d GiB"):
        fit_case(cascade, shape, spacing, CPU, 1 << 26, "none", max_memory_gb=7.5, previous=first)
    assert fit_case(cascade, shape, spacing, CPU, 1 << 26, "none", max_memory_gb=9, previous=first).memory == staged
    assert "first stage" not in alone.describe()


def test_the_python_api_names_the_refused_case(tmp_path):
    from tests.test_predictor import make_workdir
    from voxseg.infer.predictor import Predictor

    make_workdir(tmp_path, tiny_plan())
    predictor = Predictor.from_workdir(tmp_path, device="cpu", max_memory=0.0001)
    image = np.zeros((2, 20, 20, 20), np.float32)
    refusal = r"^case 'liver_7': predicting 2x20x20x20 voxels .*\(--max-memory 0.0001\)"
    with pytest.raises(MemoryBudgetError, match=refusal):
        predictor.predict_array(image, (1.0, 1.0, 1.0), name="liver_7")
