"""`voxseg serve`: one model kept warm behind an HTTP API (FastAPI + uvicorn), a job queue and a viewer page.

    voxseg serve work/synth --port 8000 --jobs-dir /var/lib/voxseg/jobs

The pieces, bottom up: `jobs` (the jobs folder: one folder per job, its record written atomically), `uploads`
(what a request may send, checked before any voxel is decoded), `worker` (one thread running jobs back to back
on the loaded Predictor), `metrics` (Prometheus text), `app` (the routes). FastAPI, uvicorn and
python-multipart are the optional extra `voxseg[serve]`; they are imported only here, when serving.
"""
from __future__ import annotations

import importlib.util

from voxseg.errors import ConfigError

__all__ = ["SERVE_PACKAGES", "require_serve_extra"]

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}


def require_serve_extra() -> None:
    """ConfigError naming `pip install voxseg[serve]` when a package of the serving extra is missing."""
    missing = [package for module, package in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}, not installed: pip install 'voxseg[serve]'")
