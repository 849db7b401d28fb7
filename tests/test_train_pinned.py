"""The numbers of a short deterministic CPU run, pinned: any change to the training code that changes the losses,
the pseudo-Dice or the final weights by a single bit fails here.

The values were recorded from the code before the train/ restructuring (issue 25) and must stay the same through
refactors: a change that means to alter the numbers updates them here on purpose, in its own commit, saying why.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from test_train import _config, make_workdir
from voxseg.checkpoint import load_checkpoint
from voxseg.train.loop import train

# 2 epochs x 3 iterations, batch 2, patch 16^3, loop.deterministic=true, data.num_threads=2 (tests/test_train.py)
PINNED = {
    "plain": {
        "loss": [{"loss": 2.011455535888672, "dice": 0.8144931793212891, "ce": 1.1969623565673828},
                 {"loss": 1.533158302307129, "dice": 0.7568959395090739, "ce": 0.7762624422709147}],
        "val_loss": [1.6025515794754028, 1.3720977306365967],
        "pseudo_dice": [{"outer": 0.09773260359655982, "inner": 0.2650818569185916},
                        {"outer": 0.14625992478061012, "inner": 0.33814333814333813}],
        "weights": "0dbf3cd019e6dd6e329b52036dc5324e24d1da3331346562cac08441b6ccb6be",
    },
    # two micro-batches per optimiser step (3 iterations = 6 micro-batches an epoch), prepared by the prefetch thread
    "accumulated": {
        "loss": [{"loss": 2.021325429280599, "dice": 0.820755402247111, "ce": 1.2005701065063477},
                 {"loss": 1.5054945945739746, "dice": 0.7515285809834799, "ce": 0.7539660135904948}],
        "val_loss": [1.6037765741348267, 1.3761286735534668],
        "pseudo_dice": [{"outer": 0.08945812807881773, "inner": 0.2659167604049494},
                        {"outer": 0.14079799456862335, "inner": 0.3363899613899614}],
        "weights": "736bdb0d0c3f7ac25a5f7b360ebc0c4046cdb631df6998acc85a5fd004f44f55",
    },
}
EXTRA = {"plain": (), "accumulated": ("loop.grad_accum=2", "data.prefetch=1")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("pinned"))


def _weights_digest(path) -> str:
    weights = load_checkpoint(path)["model"]
    return hashlib.sha256(b"".join(weights[name].numpy().tobytes() for name in sorted(weights))).hexdigest()


@pytest.mark.parametrize("variant", sorted(PINNED))
def test_deterministic_run_reproduces_the_pinned_numbers_bit_for_bit(workdir, variant):
    shutil.rmtree(workdir / "training", ignore_errors=True)
    train(workdir, 0, _config("loop.deterministic=true", *EXTRA[variant]))
    out = workdir / "training" / "fold_0"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    expected = PINNED[variant]
    assert [r["iterations"] for r in records] == [3, 3]
    assert [r["loss"] for r in records] == expected["loss"]  # exact floats, no tolerance
    assert [r["val_loss"] for r in records] == expected["val_loss"]
    assert [r["pseudo_dice"] for r in records] == expected["pseudo_dice"]
    assert _weights_digest(out / "checkpoint_final.pt") == expected["weights"]
