"""`voxseg serve` with the demo's trained model: every demo test case segmented through the server is `voxseg
predict`'s segmentation voxel for voxel, and the viewer page shows it in headless Chromium."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from browser import has_colour, screenshot
from browser_session import BrowserSession
from serve_helpers import REPO, Server
from voxseg.client import segment, submit
from voxseg.data.io import read_image
from voxseg.demo import run_demo

pytest.importorskip("fastapi")
# the demo trains a model (~10 s alone, about a minute on two busy cores), then Chromium draws the viewer
pytestmark = pytest.mark.slow
PALETTE = {1: (230, 25, 75), 2: (60, 180, 75), 3: (255, 225, 25)}  # viewer.js's colours of labels 1-3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo folder, its test cases, a server of its model)."""
    root = tmp_path_factory.mktemp("demo")
    run_demo(root, quick=True, device="cpu")
    images = root / "Dataset001_Synth" / "imagesTs"
    names = sorted({path.name[: -len("_0000.nii.gz")] for path in images.glob("*_0000.nii.gz")})
    cases = {name: sorted(images.glob(f"{name}_*.nii.gz")) for name in names}
    server = Server(root / "model", root / "jobs", "--folds", "0")
    yield root, cases, server
    server.stop()


def test_every_demo_test_case_is_voxseg_predicts_segmentation(demo, tmp_path):
    root, cases, server = demo
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the server's thread count
    predicted = subprocess.run([sys.executable, "-m", "voxseg", "predict", "-m", str(root / "model"), "-i",
                                str(root / "Dataset001_Synth" / "imagesTs"), "-o", str(tmp_path / "predict"),
                                "--folds", "0", "--device", "cpu"], env=env, capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    assert len(cases) == 2
    for name, files in cases.items():
        served = read_image(segment(server.url, files, output=tmp_path / f"{name}.nii.gz"))
        expected = read_image(tmp_path / "predict" / f"{name}.nii.gz")
        assert served[0].dtype == expected[0].dtype and np.array_equal(served[0], expected[0]), name
        assert np.allclose(served[1].affine, expected[1].affine)
        assert len(np.unique(served[0])) >= 2  # a real segmentation, not an empty map


def test_the_viewer_shows_the_overlay_in_the_label_colour(demo, tmp_path):
    """The page opens a finished job through its ?job= parameter (driving a file input is not possible with
    Chromium's command-line screenshot); the label colour is in the canvas only when the overlay is shown."""
    _, cases, server = demo
    name, files = next(iter(cases.items()))
    labels, _ = segment(server.url, files)
    job = next(job for job in _jobs(server) if job["name"] == name and job["state"] == "done")
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    colour = PALETTE[int(values[counts.argmax()])]
    shown = screenshot(f"{server.url}/?job={job['id']}&opacity=1", tmp_path / "shown.png", 1200, 800)[120:]
    hidden = screenshot(f"{server.url}/?job={job['id']}&opacity=0", tmp_path / "hidden.png", 1200, 800)[120:]
    assert has_colour(shown, colour, at_least=200)
    assert not has_colour(hidden, colour, at_least=20)
    assert shown.std() > 10  # the image is drawn too, not only a flat colour


def _jobs(server):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/v1/jobs", timeout=10) as answer:
        return json.loads(answer.read())["jobs"]


def test_submit_refuses_a_case_with_the_wrong_channel_count(demo):
    _, cases, server = demo
    from voxseg.client import ServerError

    with pytest.raises(ServerError) as refused:
        submit(server.url, next(iter(cases.values()))[:2])
    assert refused.value.status == 422 and "the model expects 4" in refused.value.message


def test_the_viewer_uploads_a_case_and_overlays_its_segmentation(demo):
    """A person's steps, driven over the DevTools protocol: choose the four channel files, press Segment, wait
    for the job; the label colour is in the canvas, and the shown job's result is the server's segmentation."""
    _, cases, server = demo
    name, files = next(iter(cases.items()))
    with BrowserSession(f"{server.url}/?opacity=1") as page:
        page.wait_for("document.getElementById('legend').children.length === 3", 30)
        assert page.evaluate("document.getElementById('legend').innerText").split() == \
            ["1", "edema", "2", "necrosis", "3", "enhancing"]
        page.choose_files("#files", files)
        page.evaluate("document.getElementById('segment').click()")
        job_id = page.wait_for("document.body.dataset.shown", 120)
        time.sleep(1.0)  # the first frames after loading
        pixels = page.screenshot()[120:]
        status_line = page.evaluate("document.getElementById('status').textContent")
    job = next(job for job in _jobs(server) if job["id"] == job_id)
    assert job["name"] == name and job["state"] == "done" and name in status_line
    labels, _ = segment(server.url, files)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    assert has_colour(pixels, PALETTE[int(values[counts.argmax()])], at_least=200)
