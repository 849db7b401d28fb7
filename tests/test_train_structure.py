"""Design rules of voxseg/train/ made tests (issue 25): one place decides where an optimiser step falls."""
from __future__ import annotations

import ast
import inspect

import torch
from torch import nn

from voxseg.train import loop
from voxseg.train.step import TrainStep


# ----- the optimiser-step boundary: decided by the step alone -----------------------------------------------
def _modulo_operations(function) -> list[str]:
    tree = ast.parse(inspect.getsource(function).lstrip())
    return [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)]


def test_the_loop_counts_iterations_from_the_step():
    assert not _modulo_operations(loop.run_epoch), "the loop must not recompute the accumulation boundary"
    assert "optimizer_stepped" in inspect.getsource(loop.run_epoch)


class _MSE(nn.Module):
    def forward(self, output, target):
        loss = ((output - target) ** 2).mean()
        return loss, {}


def _step(grad_accum: int) -> TrainStep:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return TrainStep(model, _MSE(), torch.optim.SGD(model.parameters(), lr=0.1), "cpu", grad_accum=grad_accum,
                     grad_clip=0.0)


def test_the_step_reports_which_micro_batches_complete_an_optimiser_step():
    step = _step(3)
    x, y = torch.randn(2, 3), torch.randn(2, 1)
    stepped = []
    for _ in range(7):
        before = step.model.weight.detach().clone()
        step(x, y)
        stepped.append(step.optimizer_stepped)
        assert step.optimizer_stepped == (not torch.equal(before, step.model.weight))  # the flag is the truth
    assert stepped == [False, False, True, False, False, True, False]


def test_a_restore_starts_the_accumulation_afresh():
    """A checkpoint holds no half-accumulated gradients, so after a restore (also one with another grad_accum)
    the optimiser steps after the first `grad_accum` micro-batches, never after a leftover count."""
    x, y = torch.randn(2, 3), torch.randn(2, 1)
    single = _step(1)
    for _ in range(3):
        single(x, y)
    resumed = _step(2)
    resumed.load_state_dict(single.state_dict())
    resumed(x, y)
    assert not resumed.optimizer_stepped
    resumed(x, y)
    assert resumed.optimizer_stepped
    # a checkpoint of an earlier version counted micro-batches in "micro_steps": read and ignored
    older = _step(2)
    older.load_state_dict({**single.state_dict(), "micro_steps": 3})
    older(x, y)
    assert not older.optimizer_stepped
