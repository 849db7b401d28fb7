"""Loss options: per-class weights (CE, focal, Dice, Tversky; softmax and regions), focal gamma/alpha, Tversky
alpha/beta against hand-computed values, default values unchanged, validation naming the option, deep
supervision and the distributed normalisers with weights, the options through config, flags and a short
training run, and the hints for other scripts' flag spellings."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from test_losses import LABELS, LABELS_IGNORE, NAMES, REGIONS, make_plan
from voxseg.cli import build_parser, main
from voxseg.cli.common import unknown_option_hint
from voxseg.config import TrainConfig, apply_overrides
from voxseg.errors import ConfigError
from voxseg.losses import build_loss, downsample_target

LN2 = math.log(2)
THREE_CLASSES = {"background": 0, "a": 1, "b": 2}


def four_voxels() -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities chosen for hand computation: logits = log(p), shape (1, 3, 4, 1, 1).

    voxel:   0            1            2            3
    target:  0            1            2            1
    p:       .5 .25 .25   .25 .5 .25   .25 .5 .25   .5 .25 .25
    p_true:  .5           .5           .25          .25
    Batch Dice (smooth 0): class a: tp .75, sum p 1.5, 2 voxels -> 1.5 / 3.5 = 3/7; class b: tp .25, sum p 1,
    1 voxel -> .5 / 2 = 1/4.
    """
    probs = torch.tensor([[.5, .25, .25], [.25, .5, .25], [.25, .5, .25], [.5, .25, .25]]).T
    target = torch.tensor([0, 1, 2, 1], dtype=torch.int8).view(1, 1, 4, 1, 1)
    return probs.log().view(1, 3, 4, 1, 1), target


def value(name: str, plan, logits, target, **options) -> float:
    total, _ = build_loss(name, plan, deep_supervision=False, smooth=0.0, **options)(logits, target)
    return total.item()


# ----- hand-computed values ----------------------------------------------------------------------------------
def test_class_weights_softmax_hand_computed():
    plan, (logits, target) = make_plan(THREE_CLASSES), four_voxels()
    weights = [1.0, 2.0, 4.0]
    # CE: (1 ln2 + 2 ln2 + 4 ln4 + 2 ln4) / (1 + 2 + 4 + 2) = 15 ln2 / 9
    assert value("ce", plan, logits, target, class_weights=weights) == pytest.approx(15 * LN2 / 9, rel=1e-6)
    assert value("ce", plan, logits, target) == pytest.approx((2 * LN2 + 2 * 2 * LN2) / 4, rel=1e-6)
    # the same as torch's weighted cross-entropy
    torch_ce = F.cross_entropy(logits, target.long()[:, 0], weight=torch.tensor(weights)).item()
    assert value("ce", plan, logits, target, class_weights=weights) == pytest.approx(torch_ce, rel=1e-6)
    # Dice: weighted mean over the labels a, b (weights 2, 4; background has no Dice): (2 3/7 + 4 1/4) / 6
    assert value("dice", plan, logits, target, class_weights=weights) == pytest.approx(1 - 13 / 42, rel=1e-6)
    assert value("dice", plan, logits, target) == pytest.approx(1 - (3 / 7 + 1 / 4) / 2, rel=1e-6)
    # focal (gamma 2): (1-p)^2 -ln p = .25 ln2, .25 ln2, .5625 ln4, .5625 ln4, weighted 1, 2, 4, 2 over 9
    expected = (0.25 + 2 * 0.25 + 4 * 1.125 + 2 * 1.125) * LN2 / 9
    assert value("focal", plan, logits, target, class_weights=weights) == pytest.approx(expected, rel=1e-6)
    # the sum of terms: each term weighted
    assert value("dice_ce", plan, logits, target, class_weights=weights) == pytest.approx(
        1 - 13 / 42 + 15 * LN2 / 9, rel=1e-6)
    # only ratios matter; equal weights are the unweighted loss
    for name in ("ce", "dice", "focal", "tversky"):
        assert value(name, plan, logits, target, class_weights=[10, 20, 40]) == pytest.approx(
            value(name, plan, logits, target, class_weights=weights), rel=1e-6)
        assert value(name, plan, logits, target, class_weights=[3, 3, 3]) == pytest.approx(
            value(name, plan, logits, target), rel=1e-6)


def test_focal_gamma_and_alpha_hand_computed():
    plan, (logits, target) = make_plan(THREE_CLASSES), four_voxels()
    # (1 - p_t)^gamma * -ln p_t with p_t = .5, .5, .25, .25
    assert value("focal", plan, logits, target) == pytest.approx((0.25 + 0.25 + 1.125 + 1.125) / 4 * LN2)
    assert value("focal", plan, logits, target, focal_gamma=3.0) == pytest.approx(
        (0.125 + 0.125 + 0.421875 * 2 * 2) / 4 * LN2, rel=1e-6)
    assert value("focal", plan, logits, target, focal_gamma=0.0) == pytest.approx(value("ce", plan, logits, target))
    # alpha 0.25: foreground voxels x 0.25, background x 0.75 (gamma 2)
    expected = (0.75 * 0.25 + 0.25 * 0.25 + 0.25 * 1.125 + 0.25 * 1.125) / 4 * LN2
    assert value("focal", plan, logits, target, focal_alpha=0.25) == pytest.approx(expected, rel=1e-6)
    assert value("focal", plan, logits, target, focal_alpha=[0.75, 0.25, 0.25]) == pytest.approx(expected, rel=1e-6)
    # alpha scales (not normalised), class weights normalise: both together
    both = value("focal", plan, logits, target, focal_alpha=[0.75, 0.25, 0.25], class_weights=[1, 2, 4])
    expected = (1 * 0.75 * 0.25 + 2 * 0.25 * 0.25 + 4 * 0.25 * 1.125 + 2 * 0.25 * 1.125) / 9 * LN2
    assert both == pytest.approx(expected, rel=1e-6)


def test_tversky_alpha_beta_hand_computed():
    plan, (logits, target) = make_plan(THREE_CLASSES), four_voxels()
    # class a: tp .75, fp .75, fn 1.25; class b: tp .25, fp .75, fn .75
    # alpha .3 / beta .7: .75 / (.75 + .225 + .875) = 15/37, .25 / (.25 + .225 + .525) = 1/4
    assert value("tversky", plan, logits, target) == pytest.approx(1 - (15 / 37 + 1 / 4) / 2, rel=1e-6)
    # alpha .7 / beta .3: .75 / (.75 + .525 + .375) = 5/11, .25 / (.25 + .525 + .225) = 1/4
    assert value("tversky", plan, logits, target, tversky_alpha=0.7, tversky_beta=0.3) == pytest.approx(
        1 - (5 / 11 + 1 / 4) / 2, rel=1e-6)
    assert value("tversky", plan, logits, target, tversky_alpha=0.5, tversky_beta=0.5) == pytest.approx(
        value("dice", plan, logits, target), rel=1e-6)
    assert value("tversky", plan, logits, target, class_weights=[1, 2, 4]) == pytest.approx(
        1 - (2 * 15 / 37 + 4 / 4) / 6, rel=1e-6)


def test_class_weights_regions_hand_computed():
    """Two voxels, labels 1 and 2; regions whole = {1, 2} (targets 1, 1) and core = {2} (targets 0, 1);
    sigmoid probabilities whole .8 .5, core .2 .8."""
    plan = make_plan({"background": 0, "whole": [1, 2], "core": [2]})
    target = torch.tensor([1, 2], dtype=torch.int8).view(1, 1, 2, 1, 1)
    probs = torch.tensor([[0.8, 0.5], [0.2, 0.8]]).view(1, 2, 2, 1, 1)
    logits = torch.log(probs / (1 - probs))
    ln125 = math.log(1.25)
    # BCE per region: whole (ln 1.25 + ln 2) / 2, core ln 1.25; weights 1, 3
    expected = (1 * (ln125 + LN2) / 2 + 3 * ln125) / 4
    assert value("ce", plan, logits, target, class_weights=[1, 3]) == pytest.approx(expected, rel=1e-6)
    # Dice per region: whole 2.6 / 3.3, core 1.6 / 2
    assert value("dice", plan, logits, target, class_weights=[1, 3]) == pytest.approx(
        1 - (26 / 33 + 3 * 0.8) / 4, rel=1e-6)
    assert value("dice", plan, logits, target) == pytest.approx(1 - (26 / 33 + 0.8) / 2, rel=1e-6)
    # focal gamma 0 is the weighted BCE
    assert value("focal", plan, logits, target, class_weights=[1, 3], focal_gamma=0.0) == pytest.approx(
        expected, rel=1e-6)


def test_class_weights_with_ignore_label():
    """Ignored voxels count neither in the loss nor in the normaliser."""
    plan = make_plan({"background": 0, "a": 1, "b": 2, "ignore": 3})
    logits, target = four_voxels()
    with_ignored = torch.cat([target, torch.full_like(target, 3)], 2)  # 4 more voxels, all ignored
    logits8 = torch.cat([logits, 50 * torch.randn_like(logits)], 2)
    for name in ("ce", "focal", "dice_ce"):
        assert value(name, plan, logits8, with_ignored, class_weights=[1, 2, 4]) == pytest.approx(
            value(name, plan, logits, target, class_weights=[1, 2, 4]), rel=1e-6)


# ----- defaults unchanged ------------------------------------------------------------------------------------
def fixed_inputs(num_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic logits (a sine, no random generator) and labels 0..3, (2, K, 4, 4, 4)."""
    shape = (2, num_outputs, 4, 4, 4)
    n = torch.arange(torch.Size(shape).numel(), dtype=torch.float64)
    logits = (torch.sin(n * 0.7) * 3).float().view(shape)
    return logits, (torch.arange(2 * 64) * 7 % 4).view(2, 1, 4, 4, 4).to(torch.int8)


# the values the losses gave on `fixed_inputs` before the loss options existed
BEFORE = {
    "labels": {"ce": 2.412625, "dice": 0.769371, "dice_ce": 3.181996, "dice_focal": 2.864706, "focal": 2.095335,
               "tversky": 0.774239},
    "regions": {"ce": 1.14314, "dice": 0.519353, "dice_ce": 1.662493, "dice_focal": 1.351145, "focal": 0.831793,
                "tversky": 0.516514},
    "ignore": {"ce": 1.774961, "dice": 0.687237, "dice_ce": 2.462198, "dice_focal": 2.099981, "focal": 1.412745,
               "tversky": 0.692206},
}


@pytest.mark.parametrize("labels", ["labels", "regions", "ignore"])
def test_default_values_unchanged(labels):
    plan = make_plan({"labels": LABELS, "regions": REGIONS, "ignore": LABELS_IGNORE}[labels])
    logits, target = fixed_inputs(plan.num_outputs)
    for name in NAMES:
        default, _ = build_loss(name, plan, deep_supervision=False)(logits, target)
        assert default.item() == pytest.approx(BEFORE[labels][name], abs=2e-6), name
    if labels == "labels":
        outputs = [logits, logits[:, :, ::2, ::2, ::2], logits[:, :, ::4, ::4, ::4]]
        assert build_loss("dice_ce", plan)(outputs, target)[0].item() == pytest.approx(3.223433, abs=2e-6)
        per_sample = build_loss("dice", plan, deep_supervision=False, batch_dice=False)(logits, target)[0]
        assert per_sample.item() == pytest.approx(0.769393, abs=2e-6)


def test_config_defaults_are_the_loss_defaults():
    plan = make_plan(LABELS_IGNORE)
    logits, target = fixed_inputs(plan.num_outputs)
    options = TrainConfig().loss.term_options()
    assert options == dict(class_weights=None, focal_gamma=2.0, focal_alpha=None, tversky_alpha=0.3,
                           tversky_beta=0.7)
    for name in NAMES:
        default, _ = build_loss(name, plan, deep_supervision=False)(logits, target)
        from_config, _ = build_loss(name, plan, deep_supervision=False, **options)(logits, target)
        assert from_config.item() == default.item(), name


# ----- deep supervision, distributed normalisers, no sync ------------------------------------------------------
def test_deep_supervision_weights_every_level():
    plan = make_plan(LABELS)
    logits, target = fixed_inputs(4)
    outputs = [logits, logits[:, :, ::2, ::2, ::2], logits[:, :, ::4, ::4, ::4]]
    options = dict(class_weights=[0.5, 1, 2, 3], focal_gamma=1.5)
    total, parts = build_loss("dice_focal", plan, **options)(outputs, target)
    single = build_loss("dice_focal", plan, deep_supervision=False, **options)
    level = [single(o, downsample_target(target, o.shape[2:])) for o in outputs]
    torch.testing.assert_close(total, (level[0][0] + 0.5 * level[1][0]) / 1.5)  # weights 1, 1/2, 0
    torch.testing.assert_close(parts["focal"], (level[0][1]["focal"] + 0.5 * level[1][1]["focal"]) / 1.5)
    unweighted = build_loss("dice_focal", plan, focal_gamma=1.5)(outputs, target)[0]
    assert abs(total.item() - unweighted.item()) > 1e-3  # the weights reach every level


def test_weighted_loss_does_not_sync():
    from test_no_sync import SyncGuard

    plan = make_plan(LABELS_IGNORE)
    logits, target = fixed_inputs(3)
    logits.requires_grad_(True)
    loss = build_loss("dice_ce", plan, class_weights=[1, 2, 3], sync_batch_dice=True)
    with SyncGuard():
        total, _ = loss([logits, logits[:, :, ::2, ::2, ::2]], target)
        total.backward()


def unbalanced_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """`fixed_inputs` with half of sample 0 background: the samples' class-weight sums differ."""
    logits, target = fixed_inputs(4)
    target[0, :, :2] = 0
    return logits, target


def _rank_losses(rank: int, world_size: int, init_file: str, queue) -> None:
    """One rank of a Gloo group: its half of the batch, loss and gradient with sync_batch_dice."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, target = unbalanced_inputs()
        mine = logits[rank:rank + 1].clone().requires_grad_(True)
        loss = build_loss("dice_ce", make_plan(LABELS), deep_supervision=False, class_weights=[0.5, 1, 2, 4],
                          sync_batch_dice=True)
        total, _ = loss(mine, target[rank:rank + 1])
        total.backward()
        queue.put((rank, total.item(), mine.grad.numpy().copy()))  # plain data: the queue outlives the process
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_global_batch_weighted_loss(tmp_path):
    """Each rank's gradient / 2 (DDP's average) and the mean of the ranks' losses are the single process's."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_rank_losses, args=(rank, 2, str(tmp_path / "init"), queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    results = dict((rank, (total, grad)) for rank, total, grad in (queue.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(60)
    logits, target = unbalanced_inputs()
    logits.requires_grad_(True)
    loss = build_loss("dice_ce", make_plan(LABELS), deep_supervision=False, class_weights=[0.5, 1, 2, 4])
    total, _ = loss(logits, target)
    total.backward()
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(total.item(), rel=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(torch.from_numpy(results[rank][1]) / 2, logits.grad[rank:rank + 1], rtol=1e-4,
                                   atol=1e-7)


# ----- validation --------------------------------------------------------------------------------------------
def test_per_output_counts_are_checked_against_the_plan():
    with pytest.raises(ConfigError, match=r"loss.class_weights has 2 entries; the network has 4 outputs "
                                          r"\(softmax: background first\): background, edema, core, enhancing"):
        build_loss("dice_ce", make_plan(LABELS), class_weights=[1, 2])
    with pytest.raises(ConfigError, match=r"loss.class_weights has 4 entries; the network has 3 outputs \(one "
                                          r"sigmoid per region\): whole_tumor, tumor_core, enhancing_tumor"):
        build_loss("dice_ce", make_plan(REGIONS), class_weights=[1, 2, 2, 2])
    with pytest.raises(ConfigError, match="loss.focal_alpha has 2 entries; the network has 3 outputs"):
        build_loss("focal", make_plan(LABELS_IGNORE), focal_alpha=[0.5, 0.5])
    # Dice averages over the labels: weights only on background leave it nothing; CE alone is fine
    with pytest.raises(ConfigError, match="loss.class_weights=.*every label weight 0"):
        build_loss("dice_ce", make_plan(THREE_CLASSES), class_weights=[1, 0, 0])
    build_loss("ce", make_plan(THREE_CLASSES), class_weights=[1, 0, 0])


@pytest.mark.parametrize("override, message", [
    ("loss.class_weights=1,-2", "loss.class_weights must be >= 0 with at least one > 0"),
    ("loss.class_weights=0,0", "loss.class_weights must be >= 0 with at least one > 0"),
    ("loss.focal_gamma=-1", "loss.focal_gamma must be >= 0"),
    ("loss.focal_alpha=1.5", r"loss.focal_alpha=1.5: a single alpha must be in \[0, 1\]"),
    ("loss.focal_alpha=0.5,-1", "loss.focal_alpha factors must be >= 0"),
    ("loss.tversky_alpha=-0.1", "loss.tversky_alpha must be >= 0"),
    ("loss.tversky_beta=inf", "loss.tversky_beta must be a finite number"),
])
def test_config_validation_names_the_option(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_config_options_parse_and_round_trip(tmp_path):
    config = apply_overrides(TrainConfig(), ["loss.class_weights=1,2,2,2", "loss.focal_gamma=3",
                                             "loss.focal_alpha=0.25,0.75,0.75,0.75", "loss.tversky_alpha=0.4",
                                             "loss.tversky_beta=0.6"])
    assert config.loss.class_weights == [1.0, 2.0, 2.0, 2.0] and config.loss.focal_gamma == 3.0
    assert config.loss.focal_alpha == [0.25, 0.75, 0.75, 0.75]
    assert apply_overrides(TrainConfig(), ["loss.focal_alpha=0.25"]).loss.focal_alpha == 0.25
    config.save(tmp_path / "config.json")
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    with pytest.raises(ConfigError, match="'loss.tversky_alpha'"):
        apply_overrides(TrainConfig(), ["loss.tversky_alpha=high"])


# ----- command line ------------------------------------------------------------------------------------------
def test_flags_set_the_loss_options_and_list_them(capsys):
    args = build_parser().parse_args(["train", "w", "--class-weights", "1,2,2", "--focal-gamma", "3",
                                      "--focal-alpha", "0.25", "--tversky-alpha", "0.4", "--tversky-beta", "0.6"])
    from voxseg.cli.train import train_request

    assert train_request(args)["overrides"] == ["loss.class_weights=1,2,2", "loss.focal_gamma=3",
                                                "loss.focal_alpha=0.25", "loss.tversky_alpha=0.4",
                                                "loss.tversky_beta=0.6"]
    with pytest.raises(SystemExit):
        main(["train", "--list-options"])
    listed = capsys.readouterr().out
    for name in ("loss.class_weights", "loss.focal_gamma", "loss.focal_alpha", "loss.tversky_alpha",
                 "loss.tversky_beta"):
        assert f"\n  {name} (" in listed, name


@pytest.mark.parametrize("given, hint", [
    (["--loss_weights", "1.0", "2.0"], "--loss_weights is not an option; use --set loss.class_weights=1.0,2.0 "
                                       "(per-class weights) or --loss-weights dice=1,ce=1 (per-term weights)"),
    (["--class_weights", "1", "2", "2"], "--class_weights is not an option; use --class-weights 1,2,2"),
    (["--learning_rate", "3e-4"], "--learning_rate is not an option; use --lr 3e-4"),
    (["--learning-rate=3e-4"], "--learning-rate is not an option; use --lr 3e-4"),
    (["--num_epochs", "100"], "--num_epochs is not an option; use --epochs 100"),
    (["--batch_size", "4"], "--batch_size is not an option; use --batch-size 4"),
    (["--weight_decay", "1e-4"], "--weight_decay is not an option; use --set optim.weight_decay=1e-4"),
    (["--no_deep_supervision"], "--no_deep_supervision is not an option; use --no-deep-supervision"),
    (["--patiance", "5"], "--patiance is not an option; did you mean --patience?"),
])
def test_other_scripts_spellings_get_a_hint(capsys, given, hint):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "work", "--fold", "0", *given])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"voxseg train: error: {hint}"


def test_hints_leave_known_flags_and_positionals_alone():
    parser = build_parser()
    assert parser.parse_args(["train", "work", "--resume"]).resume is True
    train = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    train_parser = train.choices["train"].complete()
    assert unknown_option_hint(train_parser, ["checkpoint.pt"]) is None  # a stray value: argparse's own error
    assert unknown_option_hint(train_parser, ["--zzzzzz"]) is None  # nothing like it


# ----- a short training run ----------------------------------------------------------------------------------
def test_training_uses_the_class_weights(tmp_path, monkeypatch, capsys):
    """`voxseg train --class-weights ... --focal-gamma ...`: the run's config.json and the loss it trains with
    hold them; a count that does not fit the plan fails before anything is written."""
    from test_train import make_workdir
    from voxseg.train import loop

    workdir = make_workdir(tmp_path)
    built = []

    def spy(*args, **kwargs):
        built.append(build_loss(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_loss", spy)
    common = ["train", str(workdir), "--fold", "0", "--epochs", "1", "--iterations", "2", "--device", "cpu",
              "--loss", "dice_focal", "--focal-gamma", "3"]
    for item in ("loop.val_iterations=1", "logging.tensorboard=false", "logging.progress_png=false",
                 "logging.progress_bar=false", "loop.full_val=false", "data.num_threads=1"):
        common += ["--set", item]
    assert main(common + ["--class-weights", "1,2"]) != 0  # the plan has 3 outputs
    assert ("voxseg train: error: argument --class-weights: loss.class_weights has 2 entries; the network has 3 "
            "outputs (softmax: background first): background, outer, inner") in capsys.readouterr().err
    assert not (workdir / "training" / "fold_0" / "config.json").exists()

    assert main(common + ["--class-weights", "1,2,4"]) == 0
    saved = json.loads((workdir / "training" / "fold_0" / "config.json").read_text())["loss"]
    assert saved["class_weights"] == [1.0, 2.0, 4.0] and saved["focal_gamma"] == 3.0 and saved["name"] == "dice_focal"
    inner = built[-1].loss  # the deep-supervision wrapper's loss
    torch.testing.assert_close(inner.class_weights, torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(inner.overlap_weights, torch.tensor([2.0, 4.0]))
    assert inner.focal_gamma == 3.0 and set(inner.terms) == {"dice", "focal"}
    log = [json.loads(line) for line in (workdir / "training" / "fold_0" / "log.jsonl").read_text().splitlines()]
    assert set(log[0]["loss"]) == {"loss", "dice", "focal"} and math.isfinite(log[0]["loss"]["loss"])
