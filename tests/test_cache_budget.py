"""The case caches' memory budget: the training and validation caches share one budget (the validation cache gets
what training left), and pinned memory is counted as the caching host allocator rounds it (powers of two)."""
from __future__ import annotations

import torch

from test_train import TRAIN, VAL, _config, _plan, make_workdir
from voxseg.train.cache import CacheBudget, pinned_bytes
from voxseg.train.feed import TrainData
from voxseg.units import GIB


def test_pinned_memory_is_counted_in_powers_of_two():
    assert pinned_bytes([3, 4, 5, 2**20 + 1, 0]) == 4 + 4 + 8 + 2**21
    assert pinned_bytes([int(2.2e9)]) == 4 * GIB  # a 2.2 GB case pins 4 GiB


def test_default_budgets_from_the_device_numbers():
    cuda = CacheBudget.for_device(torch.device("cuda"), host_total=64 * GIB, free_device=40 * GIB)
    assert (cuda.device_bytes, cuda.host_bytes) == (0.8 * 40 * GIB, 32 * GIB)
    cpu = CacheBudget.for_device(torch.device("cpu"), host_total=64 * GIB)
    assert (cpu.device_bytes, cpu.host_bytes) == (32 * GIB, 32 * GIB)
    given = CacheBudget.for_device(torch.device("cuda"), budget_gb=6.0, host_total=64 * GIB, free_device=40 * GIB)
    assert given.device_bytes == 6 * GIB


def test_validation_cache_gets_what_the_training_cache_left():
    # an 80 GB device with 40 GiB free after the model, 48 GiB of host RAM
    budget = CacheBudget.for_device(torch.device("cuda"), host_total=48 * GIB, free_device=40 * GIB)
    assert budget.place("auto", [20 * GIB, 10 * GIB], "cuda") == "gpu"  # 30 of the 32 GiB budget
    assert budget.device_bytes == 2 * GIB
    # 3 GiB of validation cases no longer fit on the device; pinned they take 4 GiB of the 24 GiB host budget
    assert budget.place("auto", [int(1.5 * GIB), int(1.5 * GIB)], "cuda") == "pinned"
    assert budget.host_bytes == 20 * GIB
    # 18 GiB as two 9 GiB tensors pin 2 x 16 GiB: more than the 20 GiB left, although 18 < 20
    assert budget.place("auto", [9 * GIB, 9 * GIB], "cuda") == "mmap"
    assert budget.place("gpu", [GIB], "cuda") == "gpu" and budget.device_bytes == GIB  # a requested mode is kept


def test_train_data_places_the_validation_cache_in_what_training_left(tmp_path):
    workdir = make_workdir(tmp_path)
    plan, config = _plan(), _config("loop.seed=0")
    probe = TrainData(workdir / "preprocessed", plan, config, TRAIN, VAL)
    train_bytes, val_bytes = probe.train_cache.nbytes, probe.val_cache.nbytes
    # room for the training cases and half the validation cases
    data = TrainData(workdir / "preprocessed", plan, config, TRAIN, VAL,
                     cache_budget_gb=(train_bytes + val_bytes / 2) / GIB)
    assert (data.train_cache.mode, data.val_cache.mode) == ("gpu", "mmap")
    roomy = TrainData(workdir / "preprocessed", plan, config, TRAIN, VAL,
                      cache_budget_gb=(train_bytes + val_bytes) / GIB)
    assert (roomy.train_cache.mode, roomy.val_cache.mode) == ("gpu", "gpu")
