"""The training loop end to end on a tiny work directory (CPU): logs, checkpoints, exact resume, early
stopping, test-only, and the validation arithmetic."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from voxseg.checkpoint import load_checkpoint
from voxseg.config import TrainConfig, apply_overrides
from voxseg.data.io import Geometry, read_image
from voxseg.data.splits import save_splits
from voxseg.data.store import sample_foreground_locations, save_case
from voxseg.errors import CheckpointError, ConfigError
from voxseg.evaluate.overlap import class_masks, dice_from_counts, overlap_counts
from voxseg.infer.config import InferConfig
from voxseg.infer.validation import full_validation
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan
from voxseg.plans import apply_overrides as apply_plan_overrides
from voxseg.train import loop
from voxseg.train.loop import TrainingInterrupted, train
from voxseg.train.prefetch import BatchStream
from voxseg.train.start import RunStart
from voxseg.train.step import RunningMeans, TrainStep
from voxseg.train.testonly import evaluate_fold

CASE_SHAPE = (24, 24, 20)
TRAIN = ["case_0", "case_1", "case_2", "case_3"]
VAL = ["case_4", "case_5"]


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two channels; label 1 a sphere, label 2 a smaller sphere inside it; intensities follow the labels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in CASE_SHAPE], indexing="ij"))
    centre = np.array([s / 2 for s in CASE_SHAPE]) + rng.uniform(-3, 3, 3)
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    seg = np.zeros(CASE_SHAPE, np.int8)
    seg[dist < 7] = 1
    seg[dist < 3.5] = 2
    image = np.stack([seg * 1.0, (seg == 2) * 1.5]).astype(np.float32) + rng.normal(0, 0.3, (2, *CASE_SHAPE))
    return image.astype(np.float32), seg[None]


def _plan() -> Plan:
    return Plan(
        dataset_name="Tiny", raw_dataset="/nowhere", channel_names={"0": "A", "1": "B"},
        labels={"background": 0, "outer": 1, "inner": 2}, file_ending=".nii.gz", target_spacing=[1.0, 1.0, 1.0],
        patch_size=[16, 16, 16], batch_size=2,
        network=NetworkPlan(features=[4, 8, 8], kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            conv_per_stage=1),
        normalization=[ChannelNormalization(), ChannelNormalization()], image_dtype="float32",
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("work"))


def make_workdir(root):
    """A work directory of 6 preprocessed tiny cases (fold 0: 4 training, 2 validation) with `_plan()`."""
    _plan().save(root / "plans.json")
    for index, name in enumerate(TRAIN + VAL):
        image, seg = _case(index)
        properties = {"name": name, "original_shape": list(CASE_SHAPE), "shape_after_crop": list(CASE_SHAPE),
                      "shape_after_resample": list(CASE_SHAPE), "crop_bbox": [[0, s] for s in CASE_SHAPE],
                      "affine": Geometry.from_spacing((1.0, 1.0, 1.0)).to_list()}
        save_case(root / "preprocessed", name, image, seg, properties, sample_foreground_locations(seg, [1, 2]))
    save_splits(root, [{"train": TRAIN, "val": VAL}])
    return root


def _config(*extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [
        "loop.epochs=2", "data.iterations_per_epoch=3", "loop.val_iterations=2", "loop.device=cpu",
        "logging.tensorboard=false", "logging.progress_png=false", "logging.progress_bar=false",
        "loop.full_val=false", "data.num_threads=2", "loop.save_freq=1", *extra,
    ])


def _clear(workdir, fold="0"):
    import shutil

    shutil.rmtree(workdir / "training" / f"fold_{fold}", ignore_errors=True)


def test_train_writes_logs_checkpoints_and_config(workdir):
    _clear(workdir)
    result = train(workdir, 0, _config("logging.progress_png=true", "logging.tensorboard=true"))
    out = workdir / "training" / "fold_0"
    assert result["epochs"] == 2 and not result["stopped_early"] and result["seconds"] > 0
    for name in ("checkpoint_latest.pt", "checkpoint_final.pt", "checkpoint_best.pt", "config.json", "progress.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert set(record["loss"]) == {"loss", "dice", "ce"} and all(np.isfinite(v) for v in record["loss"].values())
        assert set(record["pseudo_dice"]) == {"outer", "inner"}
        for key in ("val_loss", "pseudo_dice_mean", "ema_dice", "epoch_time", "batch_time", "data_time",
                    "samples_per_s", "gpu_mem_mean_gb", "gpu_mem_max_gb"):
            assert key in record, key
        assert record["gpu_mem_max_gb"] == 0.0  # CPU
        assert record["samples_per_s"] == pytest.approx(3 * 2 / record["epoch_time"])
    # poly schedule: the lr logged for each epoch
    assert records[0]["lr"] == pytest.approx(0.01) and records[1]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    # EMA with alpha 0.9 over the pseudo-Dice means
    dice = [r["pseudo_dice_mean"] for r in records]
    assert records[0]["ema_dice"] == pytest.approx(dice[0])
    assert records[1]["ema_dice"] == pytest.approx(0.9 * dice[0] + 0.1 * dice[1])
    saved = json.loads((out / "config.json").read_text())
    effective = json.loads((out / "plans.json").read_text())  # the run's effective plan, next to its config
    assert effective["patch_size"] == [16, 16, 16] and effective["batch_size"] == 2 and saved["plan"] == {}
    assert saved["loop"]["device"] == "cpu" and saved["loop"]["amp"] == "off" and saved["loop"]["compile"] == "off"
    state = load_checkpoint(out / "checkpoint_final.pt")
    assert state["progress"]["epoch"] == 2 and state["plan"] == effective and state["config"]["loop"]["epochs"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "data", "progress"} <= set(state)
    assert {"ema", "best_metric", "best_epoch"} <= set(state["progress"])


def _final_weights(workdir) -> dict[str, torch.Tensor]:
    return load_checkpoint(workdir / "training" / "fold_0" / "checkpoint_final.pt")["model"]


def test_resume_after_interrupt_matches_an_uninterrupted_run(workdir, monkeypatch):
    config = _config("loop.deterministic=true", "data.prefetch=1")
    _clear(workdir)
    train(workdir, 0, config)
    expected = _final_weights(workdir)
    expected_log = (workdir / "training" / "fold_0" / "log.jsonl").read_text().splitlines()

    _clear(workdir)
    real_run_epoch, calls = loop.run_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", interrupted)
    with pytest.raises(TrainingInterrupted, match="resume with --resume"):
        train(workdir, 0, config)
    assert load_checkpoint(workdir / "training" / "fold_0" / "checkpoint_latest.pt")["progress"]["epoch"] == 1
    monkeypatch.setattr(loop, "run_epoch", real_run_epoch)
    result = train(workdir, 0, config, RunStart(resume=True))
    assert result["epochs"] == 2
    resumed = _final_weights(workdir)
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6)
    log = (workdir / "training" / "fold_0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in log] == [0, 1]
    for a, b in zip(log, expected_log):
        a, b = json.loads(a), json.loads(b)
        assert a["loss"] == pytest.approx(b["loss"]) and a["ema_dice"] == pytest.approx(b["ema_dice"])


def test_resume_without_checkpoint_is_a_clear_error(workdir):
    _clear(workdir, "all")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(workdir, "all", _config(), RunStart(resume=True))


def test_early_stopping_and_best_checkpoint(workdir, monkeypatch):
    _clear(workdir)
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])

    def fake_pseudo_dice(model, batches, plan, loss_fn=None, amp_dtype=None):
        value = next(scores)
        return {"dice": [value, value], "dice_mean": value, "val_loss": 1.0 - value}

    monkeypatch.setattr(loop, "pseudo_dice", fake_pseudo_dice)
    result = train(workdir, 0, _config("loop.epochs=5", "loop.patience=2"))
    assert result["epochs"] == 3 and result["stopped_early"]
    out = workdir / "training" / "fold_0"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["ema_dice"] for r in records] == pytest.approx([0.5, 0.49, 0.471])
    assert load_checkpoint(out / "checkpoint_best.pt")["progress"]["epoch"] == 1  # saved after epoch 0, the best EMA
    assert load_checkpoint(out / "checkpoint_best.pt")["progress"]["best_metric"] == pytest.approx(0.5)


def test_test_only_validates_the_best_checkpoint_on_full_volumes(workdir):
    _clear(workdir)
    # the run's own cross-validation outputs, probabilities included
    train(workdir, 0, _config("loop.epochs=1", "loop.full_val=true", "loop.save_val_probabilities=true"))
    crossval = workdir / "training" / "fold_0" / "validation"
    before = {p.name: p.read_bytes() for p in crossval.iterdir()}
    assert {"summary.json", "case_4.npz", "case_4.nii.gz"} <= set(before)
    result = evaluate_fold(workdir, 0, _config(), checkpoint=True)
    out = workdir / "training" / "fold_0" / "validation_best"
    assert result["checkpoint"].endswith("checkpoint_best.pt") and result["validation_dir"] == str(out)
    # the cross-validation outputs are untouched: nothing rewritten, no probabilities deleted
    assert {p.name: p.read_bytes() for p in crossval.iterdir()} == before
    identity = json.loads((out / "checkpoint.json").read_text())  # which checkpoint file these predictions are of
    assert identity["checkpoint"] == "checkpoint_best.pt" and identity["epoch"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_case"]) == set(VAL)
    # the reported Dice is the Dice of the written predictions
    for name in VAL:
        pred, _ = read_image(out / f"{name}.nii.gz")  # identity crop and resampling in this work dir
        ref = np.load(workdir / "preprocessed" / f"{name}_seg.npy")[0]
        assert pred.shape == CASE_SHAPE
        for label, cls in ((1, "outer"), (2, "inner")):
            p, r = pred == label, ref == label
            denominator = p.sum() + r.sum()
            expected = 2 * (p & r).sum() / denominator if denominator else None
            assert summary["per_case"][name][cls] == pytest.approx(expected)
    assert result["val_dice"] == pytest.approx(summary["mean"])


def test_test_only_without_checkpoints_is_an_error(workdir):
    _clear(workdir)
    with pytest.raises(CheckpointError, match="train first"):
        evaluate_fold(workdir, 0, _config(), checkpoint=True)


class _Oracle(nn.Module):
    """Logits that reproduce channel 0 of the image as labels (image channel 0 = label value)."""

    def forward(self, x):
        labels = x[:, 0].round().long().clamp(0, 2)
        return torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 10


def test_full_validation_of_a_perfect_model_is_one(tmp_path):
    plan = _plan()
    # the stored cases were cropped out of a larger raw image: the written prediction must be pasted back
    raw_shape, box = [30, 32, 26], [[3, 3 + CASE_SHAPE[0]], [5, 5 + CASE_SHAPE[1]], [0, CASE_SHAPE[2]]]
    affine = Geometry.from_spacing((2.0, 1.0, 0.5)).to_list()
    for name, seed in (("a", 0), ("b", 1)):
        _, seg = _case(seed)
        properties = {"name": name, "original_shape": raw_shape, "affine": affine, "crop_bbox": box,
                      "shape_after_crop": list(CASE_SHAPE), "shape_after_resample": list(CASE_SHAPE)}
        save_case(tmp_path / "pre", name, seg.astype(np.float32), seg, properties)
    config = InferConfig(tile_batch=2, mirror_axes="none")
    result = full_validation(_Oracle(), plan, tmp_path / "pre", ["a", "b"], tmp_path / "val", "cpu", config)
    assert result["mean"] == {"outer": 1.0, "inner": 1.0} and result["mean_dice"] == 1.0
    written, geometry = read_image(tmp_path / "val" / "a.nii.gz")
    expected = np.zeros(raw_shape, np.uint8)
    expected[3:3 + CASE_SHAPE[0], 5:5 + CASE_SHAPE[1], :CASE_SHAPE[2]] = _case(0)[1][0]
    assert np.array_equal(written, expected) and geometry.allclose(Geometry.from_list(affine))


def test_dice_counts_softmax_regions_and_ignore():
    logits = torch.zeros(1, 3, 4, 1, 1)
    logits[0, 1, :2] = 5  # predicted label 1 at 0, 1
    logits[0, 2, 3] = 5  # predicted label 2 at 3
    seg = torch.tensor([1, 1, 1, 2]).view(1, 1, 4, 1, 1)
    counts = overlap_counts(*class_masks(logits, seg, _plan()))
    assert counts.tolist() == [[2, 1], [0, 0], [1, 0]]  # tp, fp, fn per class
    assert dice_from_counts(counts) == pytest.approx([0.8, 1.0])
    # a class absent from prediction and reference is NaN (left out of means)
    assert np.isnan(dice_from_counts(torch.zeros(3, 1))[0])
    # region-based with an ignore label: region outputs are sigmoids (logit > 0)
    region_plan = Plan.from_dict({**_plan().to_dict(), "labels": {"background": 0, "whole": [1, 2], "core": [2],
                                                                   "ignore": 3}, "regions_class_order": [1, 2]})
    logits = torch.full((1, 2, 4, 1, 1), -5.0)
    logits[0, 0] = 5  # whole everywhere
    seg = torch.tensor([1, 2, 0, 3]).view(1, 1, 4, 1, 1)  # the last voxel is ignored
    counts = overlap_counts(*class_masks(logits, seg, region_plan))
    assert counts.tolist() == [[2, 0], [1, 0], [0, 1]]


def test_batch_stream_prefetch_yields_the_same_batches():
    def source(seed):
        generator = torch.Generator().manual_seed(seed)
        return lambda: (torch.rand(2, generator=generator), torch.rand(1, generator=generator))

    inline = [b for b in BatchStream(source(3), 5, depth=0)]
    threaded_stream = BatchStream(source(3), 5, depth=2)
    threaded = list(threaded_stream)
    assert len(threaded) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(inline, threaded))
    means = RunningMeans()
    for value in (1.0, 2.0, 6.0):
        means.add({"loss": torch.tensor(value)})
    assert means.means() == {"loss": 3.0}


def test_resolve_fills_plan_values_and_machine_defaults():
    plan = _plan()
    run = loop.resolve(_config("data.iterations_per_epoch=0", "data.num_samples=2"), plan, num_train=5)
    assert run.iterations == 5  # one pass: 5 cases x 2 patches / batch 2
    assert run.amp_dtype is None and run.compile is False  # CPU: float32, no compile
    assert loop.resolve(_config("loop.amp=bf16"), plan, 4).amp_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        loop.resolve(_config("loop.amp=fp16"), plan, 4)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            loop.resolve(_config("loop.device=cuda"), plan, 4)
    with pytest.raises(ConfigError, match="not divisible"):
        apply_plan_overrides(plan, _config("plan.patch_size=10,16,16").plan)
    assert apply_plan_overrides(plan, _config("plan.network.residual=true").plan).network.residual is True


class _MSE(nn.Module):
    def forward(self, output, target):
        loss = ((output - target.float()) ** 2).mean()
        return loss, {"mse": loss.detach()}


def _linear_step(grad_accum: int, grad_clip: float = 0.0, amp_dtype=None):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, TrainStep(model, _MSE(), optimizer, "cpu", amp_dtype, grad_accum=grad_accum, grad_clip=grad_clip)


def test_gradient_accumulation_equals_one_big_batch():
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    big_model, big = _linear_step(1)
    out = big(x, y)
    assert set(out) == {"loss", "mse"} and not out["loss"].requires_grad
    small_model, small = _linear_step(2)
    small(x[:2], y[:2])
    assert torch.equal(small_model.weight, _linear_step(1)[0].weight)  # no optimiser step after 1 of 2
    small(x[2:], y[2:])
    torch.testing.assert_close(small_model.weight, big_model.weight)
    torch.testing.assert_close(small_model.bias, big_model.bias)


def test_gradient_clipping_and_bf16_on_cpu():
    x, y = torch.randn(4, 3) * 100, torch.randn(4, 1)
    model, step = _linear_step(1, grad_clip=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    step(x, y)
    assert float(step.grad_norm) > 0.5  # the norm before clipping
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert float(moved) == pytest.approx(0.1 * 0.5, rel=1e-4)  # lr x clipped norm
    model, step = _linear_step(1, amp_dtype=torch.bfloat16)
    assert not step.scaler.is_enabled()  # bf16 needs no loss scaling
    assert torch.isfinite(step(x, y)["loss"])


def test_auto_prefetch_depth_follows_the_cache_mode():
    from voxseg.train.prefetch import prefetch_depth

    assert prefetch_depth(-1, "gpu") == 0  # batches only queue device work
    assert prefetch_depth(-1, "pinned") == 2 and prefetch_depth(-1, "mmap") == 2  # host reads overlap the step
    assert prefetch_depth(3, "mmap") == 3 and prefetch_depth(0, "pinned") == 0  # an explicit setting wins
