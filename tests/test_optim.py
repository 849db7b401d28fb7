"""Optimisers and per-epoch schedules: every combination builds and steps; the lr follows each formula."""
from __future__ import annotations

import math

import pytest
import torch

from voxseg.config import OptimConfig, ScheduleConfig
from voxseg.optim import build_optimizer, build_scheduler

OPTIMIZERS = ["sgd", "adam", "adamw"]
SCHEDULES = ["poly", "cosine", "step", "exponential", "plateau"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


@pytest.mark.parametrize("optim_name", OPTIMIZERS)
@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_every_optimizer_and_schedule_steps(optim_name, schedule_name):
    model = _model()
    optimizer = build_optimizer(model.parameters(), OptimConfig(name=optim_name, lr=0.1))
    scheduler = build_scheduler(optimizer, ScheduleConfig(name=schedule_name), total_epochs=10)
    before = model.weight.detach().clone()
    for _ in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(0.5)
    assert not torch.equal(before, model.weight)
    assert scheduler.get_last_lr()[0] <= 0.1 + 1e-12
    # state round trip gives the same lr
    state = scheduler.state_dict()
    other_opt = build_optimizer(_model().parameters(), OptimConfig(name=optim_name, lr=0.1))
    other = build_scheduler(other_opt, ScheduleConfig(name=schedule_name), total_epochs=10)
    other.load_state_dict(state)
    assert other.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def _lrs(config: ScheduleConfig, epochs: int, base: float = 0.01, metrics=None) -> list[float]:
    optimizer = build_optimizer(_model().parameters(), OptimConfig(lr=base))
    scheduler = build_scheduler(optimizer, config, total_epochs=epochs)
    out = []
    for epoch in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(None if metrics is None else metrics[epoch])
    return out


def test_optimizer_settings_reach_torch():
    sgd = build_optimizer(_model().parameters(), OptimConfig())
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99 and sgd.defaults["weight_decay"] == 3e-5
    adamw = build_optimizer(_model().parameters(), OptimConfig(name="adamw", lr=3e-4, betas=[0.8, 0.9]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)


def test_poly_formula():
    lrs = _lrs(ScheduleConfig(name="poly"), epochs=100)
    for epoch in (0, 1, 50, 99):
        assert lrs[epoch] == pytest.approx(0.01 * (1 - epoch / 100) ** 0.9)


def test_cosine_with_warmup():
    lrs = _lrs(ScheduleConfig(name="cosine", warmup_epochs=4, min_lr=1e-4), epochs=24)
    assert lrs[:4] == pytest.approx([1e-4 + (0.01 - 1e-4) * (e + 1) / 5 for e in range(4)])  # ramp, never 0
    assert lrs[4] == pytest.approx(0.01)
    mid = 4 + 10  # half-way through the cosine
    assert lrs[mid] == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_step_and_exponential():
    lrs = _lrs(ScheduleConfig(name="step", step_size=3, gamma=0.5), epochs=10)
    assert lrs == pytest.approx([0.01 * 0.5 ** (e // 3) for e in range(10)])
    lrs = _lrs(ScheduleConfig(name="exponential"), epochs=5)  # default gamma 0.99
    assert lrs == pytest.approx([0.01 * 0.99**e for e in range(5)])
    floored = _lrs(ScheduleConfig(name="exponential", gamma=0.1, min_lr=1e-4), epochs=5)
    assert floored[-1] == pytest.approx(1e-4)


def test_plateau_decays_after_patience_validations():
    metrics = [0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]
    lrs = _lrs(ScheduleConfig(name="plateau", patience=2, factor=0.5), epochs=10, metrics=metrics)
    # improvement at epochs 0, 1, 5; the third validation without improvement (epoch 4) decays the lr
    assert lrs[:5] == pytest.approx([0.01] * 5)
    assert lrs[5] == pytest.approx(0.005)
    assert lrs[6:9] == pytest.approx([0.005] * 3)
    assert lrs[9] == pytest.approx(0.0025)  # epochs 6, 7, 8 without improvement: the second decay
    optimizer = build_optimizer(_model().parameters(), OptimConfig(lr=0.01))
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="plateau", patience=0), total_epochs=5)
    scheduler.step(None)  # epochs without validation never decay
    scheduler.step(None)
    assert scheduler.get_last_lr() == [0.01]
