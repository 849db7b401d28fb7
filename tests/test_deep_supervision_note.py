"""Deep supervision on a network with fewer than 3 stages does nothing: training says so."""
from __future__ import annotations

from tests.test_predictor import tiny_plan
from voxseg.models.factory import warn_noop_deep_supervision


def test_two_stage_network_with_deep_supervision_warns():
    plan = tiny_plan()  # features [4, 8]: two stages
    messages: list[str] = []
    assert warn_noop_deep_supervision(plan, messages.append)
    assert "2 stage(s)" in messages[0] and "no effect" in messages[0]
    plan.network.deep_supervision = False
    assert not warn_noop_deep_supervision(plan, messages.append) and len(messages) == 1
    plan.network.deep_supervision = True
    plan.network.features = [4, 8, 16]
    assert not warn_noop_deep_supervision(plan, messages.append)
