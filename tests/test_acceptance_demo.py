"""Acceptance: `voxseg demo` exactly as the README's first command runs it, with its defaults, in a new folder."""
from __future__ import annotations

import re

import pytest

from acceptance import record, require_success, run, voxseg

pytestmark = pytest.mark.acceptance


def test_demo_with_its_defaults(tmp_path):
    command = voxseg("demo")
    measured = require_success(run(command, tmp_path, 3600), "voxseg demo")
    record("voxseg demo", measured, command)
    assert all(f"[{i}/6]" in measured.stdout for i in range(1, 7)) and "demo finished" in measured.stdout
    validation = float(re.search(r"validation Dice (\d\.\d+)", measured.stdout).group(1))
    assert validation > 0.7  # about 0.86 on the development machine (README)
    assert len(list((tmp_path / "voxseg_work" / "demo" / "predictions").glob("*.nii.gz"))) == 4
    # the training saw the defaults: a bar, the expected duration, a checkpoint per epoch
    assert "expected duration: " in measured.stderr
    assert (tmp_path / "voxseg_work" / "demo" / "model" / "training" / "fold_0" / "checkpoint_latest.pt").is_file()
