"""No host-device sync in the hot loops, checked on the CPU.

A CUDA sync cannot be observed without a GPU, but the operations that cause one can: `SyncGuard` intercepts,
at the torch-function and the dispatcher level, every call that on a CUDA tensor makes the host wait for the
GPU — reading a value (`.item()`, `float(t)`, `bool(t)`, `if t:`, `.tolist()`, `.numpy()`, `.cpu()`, printing),
shapes that depend on values (boolean-mask indexing, `nonzero`, one-argument `torch.where`, `masked_select`,
`unique`, `repeat_interleave` without `output_size`), comparisons returning a Python bool (`equal`,
`allclose`), and `torch.tensor(..., device=...)` (a blocking host-to-device copy). Run on CPU tensors, the guard
sees the same calls the code would make on the GPU, so a sync added to a hot loop fails these tests.

The guard covers the calling thread only (prefetch threads are not checked; these tests prefetch nothing).
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from voxseg.augment import AugmentConfig, augment_batch, source_size
from voxseg.config import TrainConfig, apply_overrides
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.infer.config import Tiling
from voxseg.infer.sliding_window import sliding_window_inference
from voxseg.losses import build_loss
from voxseg.models import build_network
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.train import loop
from voxseg.train.cache import CaseCache
from voxseg.train.feed import TrainData
from voxseg.train.logger import TrainLogger
from voxseg.train.step import RunningMeans, TrainStep
from voxseg.train.validate import pseudo_dice

# ----- the guard ----------------------------------------------------------------------------------------------
# dispatcher ops that make the host wait for the device whatever their arguments
_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t), if t:, f"{t:.3f}"
    "aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::equal", "aten::allclose",
    "aten::bincount",
}
_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
# Tensor methods that copy to the host (on a CPU tensor they are no-ops below the dispatcher, so catch them here)
_HOST_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__repr__",
                 "__str__", "__format__"}
_FACTORIES_FROM_DATA = {"tensor", "as_tensor", "asarray"}


def _is_bool(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8)


def _dispatch_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    name = func._schema.name
    if name in _SYNC_OPS:
        return name
    if name in _INDEX_OPS and any(_is_bool(i) for i in (args[1] or [])):
        return f"{name} with a boolean mask (the result's shape depends on the values)"
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
        return "aten::repeat_interleave without output_size"
    if name in ("aten::masked_fill", "aten::masked_fill_") and isinstance(args[2], torch.Tensor):
        return f"{name} with a tensor value (read with .item() on CUDA)"
    return None


def _function_reason(func: Any, kwargs: dict) -> str | None:
    name = getattr(func, "__name__", "")
    if name in _HOST_METHODS:
        return f"Tensor.{name}"
    if name in _FACTORIES_FROM_DATA and kwargs.get("device") is not None:
        return f"torch.{name}(..., device=...) (a blocking host-to-device copy)"
    return None


class SyncGuard:
    """Context manager recording (or raising on) every would-be host-device sync in the calling thread.

    `guard.paused()` lets a documented sync point through (e.g. the end-of-epoch loss read).
    """

    def __init__(self, raise_on_sync: bool = True) -> None:
        self.raise_on_sync = raise_on_sync
        self.syncs: list[tuple[str, str]] = []
        self._paused = 0
        self._stack = contextlib.ExitStack()

    def _hit(self, reason: str | None) -> None:
        if reason is None or self._paused:
            return
        frames = traceback.extract_stack()[:-2]  # without _hit and the mode's handler
        ours = [f for f in frames if "site-packages" not in f.filename and "/lib/python" not in f.filename]
        where = "".join(traceback.format_list(ours[-8:]))
        self.syncs.append((reason, where))
        if self.raise_on_sync:
            raise AssertionError(f"host-device sync in a hot loop: {reason}\n{where}")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self) -> "SyncGuard":
        guard = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                guard._hit(_function_reason(func, kwargs))
                return func(*args, **kwargs)

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                guard._hit(_dispatch_reason(func, args, kwargs))
                return func(*args, **kwargs)

        self._stack.enter_context(_Functions())
        self._stack.enter_context(_Dispatch())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    @property
    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.syncs]


def _caught(fn) -> list[str]:
    with SyncGuard(raise_on_sync=False) as guard:
        fn()
    return guard.reasons


SYNCS = {
    "item": lambda t: t[0].item(),
    "float": lambda t: float(t[0]),
    "int": lambda t: int(t[0]),
    "bool": lambda t: bool(t[0] > 0),
    "if": lambda t: 1 if t.sum() > 0 else 0,
    "index": lambda t: [0, 1, 2][t.long()[0]],
    "format": lambda t: f"{t.sum():.3f}",
    "print": lambda t: str(t),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "cpu": lambda t: t.cpu(),
    "tensor on device": lambda t: torch.tensor([1.0, 2.0], device=t.device),
    "mask index": lambda t: t[t > 0],
    "mask assign": lambda t: t.clone().__setitem__(t > 0, 0.0),
    "nonzero": lambda t: t.nonzero(),
    "where one arg": lambda t: torch.where(t > 0),
    "masked_select": lambda t: t.masked_select(t > 0),
    "unique": lambda t: torch.unique(t),
    "repeat_interleave": lambda t: torch.repeat_interleave(torch.arange(3)),
    "equal": lambda t: torch.equal(t, t),
    "allclose": lambda t: torch.allclose(t, t),
    "masked_fill tensor": lambda t: t.masked_fill(t > 0, t.sum()),
}
NO_SYNCS = {
    "arithmetic": lambda t: (t * 2 + 1).exp().sum(),
    "where three args": lambda t: torch.where(t > 0, t, 0.0),
    "long index": lambda t: t[torch.tensor([0, 2])],
    "masked_fill scalar": lambda t: t.masked_fill(t > 0, 0.0),
    "host constant": lambda t: torch.tensor([1.0, 2.0]).to(t.device, non_blocking=True),
    "repeat_interleave sized": lambda t: torch.repeat_interleave(torch.arange(3), 2, output_size=6),
    "reductions": lambda t: (t.amax(), t.argmax(), (t > 0).any(), t.clamp(min=t.amin())),
}


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_guard_catches_each_kind_of_sync(name):
    assert _caught(lambda: SYNCS[name](torch.randn(5))), f"{name} was not caught"


@pytest.mark.parametrize("name", sorted(NO_SYNCS))
def test_guard_lets_sync_free_code_through(name):
    assert _caught(lambda: NO_SYNCS[name](torch.randn(5))) == []


def test_guard_raises_and_can_be_paused():
    t = torch.randn(3)
    with pytest.raises(AssertionError, match="Tensor.item"):
        with SyncGuard():
            t.sum().item()
    with SyncGuard() as guard:
        with guard.paused():
            t.sum().item()
    assert guard.syncs == []


# ----- a tiny training setup --------------------------------------------------------------------------------
SHAPE = (22, 20, 18)
TRAIN, VAL = ["a", "b", "c"], ["d"]
ALL_AUGMENT = ["rotation_p", "scale_p", "elastic_p", "mirror_p", "rot90_p", "noise_p", "blur_p", "brightness_p",
               "contrast_p", "low_res_p", "gamma_p", "inverted_gamma_p"]


def _plan(regions: bool) -> Plan:
    labels = ({"background": 0, "whole": [1, 2], "core": [2], "ignore": 3} if regions
              else {"background": 0, "outer": 1, "inner": 2})
    return Plan(
        dataset_name="Tiny", raw_dataset="/nowhere", channel_names={"0": "A", "1": "B"}, labels=labels,
        file_ending=".nii.gz", target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], batch_size=2,
        network=NetworkPlan(features=[4, 8, 8], kernel_sizes=[[3, 3, 3]] * 3,
                            strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], conv_per_stage=1),
        normalization=[ChannelNormalization(), ChannelNormalization()], image_dtype="float32",
        foreground_oversampling=0.5,
    )


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("preprocessed")
    rng = np.random.default_rng(0)
    for index, name in enumerate(TRAIN + VAL):
        seg = np.zeros((1, *SHAPE), np.int8)
        seg[0, 4:14, 5:15, 3 + index:12 + index] = 1
        seg[0, 7:10, 8:11, 6:9] = 2
        seg[0, 0] = -1
        seg[0, -1, :3, :3] = 3  # the ignore label of the region plan (a third class of the label plan's data)
        image = (np.concatenate([seg, seg == 2]) + rng.normal(0, 0.3, (2, *SHAPE))).astype(np.float32)
        save_case(directory, name, image, seg, {"name": name}, sample_foreground_locations(seg, [1, 2]),
                  image_dtype="float16")
    return directory


def _config(*extra: str) -> TrainConfig:
    augment = [f"augment.{name}=0.5" for name in ALL_AUGMENT]
    return apply_overrides(TrainConfig(), [
        "loop.device=cpu", "data.iterations_per_epoch=2", "data.prefetch=0", "logging.tensorboard=false",
        "logging.progress_png=false", "logging.progress_bar=false", *augment, *extra,
    ])


def _training(preprocessed, plan: Plan, config: TrainConfig, loss: str = "dice_ce"):
    torch.manual_seed(0)
    model = build_network(plan, deep_supervision=True)
    loss_fn = build_loss(loss, plan, deep_supervision=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    step = TrainStep(model, loss_fn, optimizer, torch.device("cpu"), grad_clip=12.0)
    data = TrainData(preprocessed, plan, apply_overrides(config, ["loop.seed=3"]), TRAIN, VAL)
    return model, loss_fn, step, data


@pytest.mark.parametrize("regions, loss, cache", [(False, "dice_ce", "gpu"), (True, "dice_focal", "pinned"),
                                                  (False, "tversky", "mmap")])
def test_training_iterations_do_not_sync(preprocessed, monkeypatch, regions, loss, cache):
    """sample -> augment -> forward + loss -> backward -> clip -> optimiser -> running means, twice."""
    if cache != "gpu":  # take the host-staging path that pinned / mmap caches use with a CUDA device
        monkeypatch.setattr(CaseCache, "on_device", property(lambda self: False))
    _, _, step, data = _training(preprocessed, _plan(regions), _config(f"data.cache={cache}"), loss)
    running = RunningMeans()
    with SyncGuard():
        for _ in range(2):
            image, seg = data.next_batch()
            running.add(step(image, seg))
    assert image.shape == (2, 2, 16, 16, 16) and seg.shape == (2, 1, 16, 16, 16)
    assert running.count == 2 and set(running.sums) >= {"loss"}
    assert np.isfinite(running.means()["loss"])


@pytest.mark.parametrize("log_every", [0, 1])
def test_an_epoch_reads_the_losses_once(preprocessed, tmp_path, monkeypatch, log_every):
    """run_epoch's only sync is the end-of-epoch read (the bar is off, so the log interval must not read)."""
    config = _config(f"logging.log_every_iter={log_every}")
    _, _, step, data = _training(preprocessed, _plan(False), config)
    setup = loop.RunSetup(torch.device("cpu"), None, False, 3)
    logger = TrainLogger(tmp_path, config.logging, 1)
    reads = []
    guard = SyncGuard()
    means = RunningMeans.means

    def counted_means(self):
        reads.append(self.count)
        with guard.paused():
            return means(self)

    monkeypatch.setattr(RunningMeans, "means", counted_means)
    with guard:
        record = loop.run_epoch(step, data, logger, 0, setup, 2)
    logger.close()
    assert reads == [3]  # once, after all 3 iterations
    assert record["iterations"] == 3 and np.isfinite(record["loss"]["loss"])


def test_pseudo_dice_syncs_once_per_validation_whatever_the_batch_count(preprocessed):
    plan = _plan(False)
    model, loss_fn, _, data = _training(preprocessed, plan, _config())
    counts = []
    for batches in (1, 3):
        with SyncGuard(raise_on_sync=False) as guard:
            result = pseudo_dice(model, data.val_batches(batches), plan, loss_fn)
        counts.append(len(guard.syncs))
        assert len(result["dice"]) == 2 and np.isfinite(result["val_loss"])
    assert counts[0] == counts[1]  # the reads are at the end, none per batch


@pytest.mark.parametrize("ndim", [2, 3])
def test_augmentation_does_not_sync(ndim):
    patch = (12, 16, 10)[:ndim] if ndim == 3 else (16, 12)
    for p in (0.5, 1.0):
        config = AugmentConfig(**{name: p for name in ALL_AUGMENT})
        size = source_size(patch, config)
        generator = torch.Generator().manual_seed(1)
        image = torch.randn(3, 2, *size, generator=generator)
        seg = torch.randint(-1, 3, (3, 1, *size), generator=generator, dtype=torch.int8)
        with SyncGuard():
            out_image, out_seg = augment_batch(image, seg, config, np.random.default_rng(1), patch)
        assert out_image.shape == (3, 2, *patch) and out_seg.shape == (3, 1, *patch)


# ----- inference ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulator", [None, "cpu"])
def test_sliding_window_does_not_sync(accumulator):
    """Tiles x mirrors x two folds, a partial last tile batch and an axis shorter than the patch."""
    plan = _plan(False)
    torch.manual_seed(0)
    folds = [build_network(plan, deep_supervision=True).eval() for _ in range(2)]
    image = torch.randn(1, 2, 30, 21, 12)
    with SyncGuard():
        tiling = Tiling.default(tile_batch=3, mirror_axes=(0, 1, 2), accumulator_device=accumulator)
        logits = sliding_window_inference(folds, image, (16, 16, 16), plan.num_outputs, tiling)
    assert logits.shape == (3, 30, 21, 12) and torch.isfinite(logits).all()


def test_2d_sliding_window_does_not_sync():
    net = torch.nn.Conv2d(2, 3, 3, padding=1).eval()
    with SyncGuard():
        logits = sliding_window_inference(net, torch.randn(1, 2, 4, 20, 9), (8, 8), 3,
                                          Tiling.default(tile_batch=5, mirror_axes=(0, 1)))
    assert logits.shape == (3, 4, 20, 9)
