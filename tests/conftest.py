"""Shared by every test: measured choices (voxseg.infer.cpu_forward) go to a cache of this test session, not to
the user's ~/.cache/voxseg; subprocesses inherit it through the environment."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    previous = os.environ.get("VOXSEG_CACHE_DIR")
    os.environ["VOXSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("voxseg-cache"))
    yield
    if previous is None:
        os.environ.pop("VOXSEG_CACHE_DIR", None)
    else:
        os.environ["VOXSEG_CACHE_DIR"] = previous
