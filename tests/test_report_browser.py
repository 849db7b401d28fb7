"""The report as a person sees it: headless Chromium opens the pages written for the demo's predictions, every
picture loads with a size, and the label colours are on the screen."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from browser import dom, has_colour, screenshot
from voxseg.cli import main
from voxseg.demo import QUICK_DEMO, run_demo
from voxseg.report.overlay import label_colour


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    run_demo(root, quick=True, device="cpu")
    return root


def _loaded(page: Path) -> tuple[int, int, int]:
    """(pictures in the page, loaded with a size, broken) as the page's own check counted them after loading."""
    text = dom(page)
    body = re.search(r"<body[^>]*>", text).group(0)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    broken = int(re.search(r'data-images-broken="(\d+)"', body).group(1))
    return len(re.findall(r"<img ", text)), loaded, broken


def test_evaluate_report_of_the_demo_opens_in_a_browser(demo: Path, tmp_path: Path, capsys):
    dataset = demo / "Dataset001_Synth"
    assert main(["evaluate", str(demo / "predictions"), str(dataset / "labelsTs"), "--dataset-json",
                 str(dataset / "dataset.json"), "--report"]) == 0
    page = demo / "predictions" / "report.html"
    assert f"report: {page}" in capsys.readouterr().out
    pictures, loaded, broken = _loaded(page)
    assert pictures == loaded == QUICK_DEMO.test_cases + 2 and broken == 0  # thumbnails and two plots
    text = page.read_text()
    assert text.count("<tr><td><a href=") == QUICK_DEMO.test_cases and "foreground mean" in text
    pixels = screenshot(page, tmp_path / "main.png")
    assert has_colour(pixels, label_colour(1))  # the reference outline in the thumbnails, as drawn

    case_page = next((demo / "predictions" / "report_files" / "cases").glob("*/index.html"))
    pictures, loaded, broken = _loaded(case_page)
    assert pictures == loaded and broken == 0 and pictures >= 3 * 4  # three planes, image and three layers
    pixels = screenshot(case_page, tmp_path / "case.png")
    assert has_colour(pixels, label_colour(1), at_least=50)


def test_the_demo_report_shows_the_training_run(demo: Path):
    page = demo / "report.html"
    text = page.read_text()
    assert "Training: fold 0" in text and "training_fold_0.png" in text and "effective plan" in text
    pictures, loaded, broken = _loaded(page)
    assert pictures == loaded and broken == 0
    assert main(["report", str(demo / "model"), "--fold", "0"]) == 0
    fold_page = demo / "model" / "training" / "fold_0" / "report.html"
    pictures, loaded, broken = _loaded(fold_page)
    assert pictures == loaded >= 3 and broken == 0
    assert main(["evaluate", "--crossval", str(demo / "model"), "--report"]) == 0
    crossval_page = demo / "model" / "training" / "crossval" / "report.html"
    text = crossval_page.read_text()
    assert "cross-validation report" in text and "Training: fold 0" in text
    pictures, loaded, broken = _loaded(crossval_page)
    assert pictures == loaded >= 3 and broken == 0
