"""The evaluation's settings have one home: `EvaluationSettings` (how a folder is scored) over `MetricOptions`
(how one case's distances are computed); every other function takes them, and unknown names are refused."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from voxseg.errors import ConfigError
from voxseg.evaluate import EvaluationSettings, MetricOptions

ROOT = Path(__file__).resolve().parents[1]
SCORING = ("tolerance_mm", "convention", "one_empty_hd95")
HOMES = {"voxseg/evaluate/settings.py", "voxseg/evaluate/metrics.py"}  # the settings and the metric primitives


def test_no_function_outside_the_homes_spells_a_scoring_default():
    found = []
    for path in sorted((ROOT / "voxseg").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative in HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg in SCORING and isinstance(default, ast.Constant):
                        found.append(f"{relative}:{node.lineno} {node.name}({arg.arg}={default.value!r})")
    assert not found, "scoring defaults outside EvaluationSettings: " + "; ".join(found)


def test_settings_validate_and_take_single_fields():
    settings = EvaluationSettings.build(tolerance_mm=2, convention="brats")
    assert (settings.tolerance_mm, settings.convention, settings.num_workers) == (2.0, "brats", 1)
    assert EvaluationSettings.build(settings, num_workers=3).tolerance_mm == 2.0
    with pytest.raises(ConfigError, match=r"unknown evaluation option 'tolerance'; did you mean 'tolerance_mm'\?"):
        EvaluationSettings.build(tolerance=2)
    with pytest.raises(ConfigError, match="tolerance_mm=-1"):
        EvaluationSettings(tolerance_mm=-1)
    with pytest.raises(ConfigError, match="convention 'itk' is unknown"):
        EvaluationSettings(convention="itk")
    with pytest.raises(ConfigError, match="one_empty_hd95='zero'"):
        EvaluationSettings(one_empty_hd95="zero")
    assert MetricOptions().tolerance_mm == EvaluationSettings().tolerance_mm  # one default, read from MetricOptions
