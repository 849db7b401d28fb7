"""kill -9 of a real `voxseg serve` with jobs queued, then a restart on the same jobs folder: every job is done
or queued again and completes, with the same segmentation as the Predictor's."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from serve_helpers import Server, one_thread, write_cases
from test_predictor import make_workdir, tiny_plan
from voxseg.client import result, status, submit
from voxseg.data.io import Geometry, read_image, write_image
from voxseg.infer.predictor import Predictor

pytest.importorskip("fastapi")


def _bigger_cases(folder, count):
    """Cases of 24^3 (8 tiles each, mirrored): slow enough that jobs are still queued when the server is killed."""
    cases = write_cases(folder, count)
    rng = np.random.default_rng(1)
    for _, files in cases:
        for path in files:
            write_image(path, rng.normal(size=(24, 24, 24)).astype(np.float32), Geometry(np.eye(4)))
    return cases


def test_kill_9_with_jobs_queued_then_restart_completes_every_job(tmp_path):
    model = make_workdir(tmp_path / "model", tiny_plan(), folds=(0,))
    cases = _bigger_cases(tmp_path / "cases", 10)
    jobs_dir = tmp_path / "jobs"
    server = Server(model, jobs_dir)
    try:
        ids = {submit(server.url, files)["id"]: name for name, files in cases}
    finally:
        server.kill()
    states = {job_id: json.loads((jobs_dir / job_id / "job.json").read_text())["state"] for job_id in ids}
    assert len(states) == 10 and sum(state in ("queued", "running") for state in states.values()) >= 1, states

    restarted = Server(model, jobs_dir)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            answers = {job_id: status(restarted.url, job_id) for job_id in ids}
            if all(answer["state"] == "done" for answer in answers.values()):
                break
            assert not any(answer["state"] in ("failed", "cancelled") for answer in answers.values()), answers
            time.sleep(0.2)
        assert all(answer["state"] == "done" for answer in answers.values()), answers
        got = {ids[job_id]: read_image(result(restarted.url, job_id, tmp_path / f"{job_id}.nii.gz"))[0]
               for job_id in ids}
    finally:
        restarted.stop()
    with one_thread():
        Predictor.from_workdir(model, device="cpu").predict_files(cases, tmp_path / "predicted")
    for name, labels in got.items():
        assert np.array_equal(labels, read_image(tmp_path / "predicted" / f"{name}.nii.gz")[0]), name
    assert not [p for p in jobs_dir.iterdir() if p.name.startswith(".") and "upload" in p.name]
