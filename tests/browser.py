"""Headless Chromium for the tests that look at a page as a person would: the DOM after its scripts ran, and a
screenshot. `.ci/run` installs Debian's `chromium`; where it is missing and the tests run as root on Debian, the
first test installs it (apt-get), else these tests fail saying how to install it."""
from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from debian import ensure

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _installed() -> str | None:
    return next((found for found in map(shutil.which, BROWSERS) if found), None)


@lru_cache(maxsize=1)
def chromium() -> str:
    return ensure(_installed, ("chromium",))


def _run(page: Path | str, *flags: str) -> subprocess.CompletedProcess:
    """Chromium on a file (a Path) or an address (a str, e.g. a test server's http://127.0.0.1:PORT/)."""
    target = page if isinstance(page, str) else page.resolve().as_uri()
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--allow-file-access-from-files", "--virtual-time-budget=10000", *flags, target]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def dom(page: Path | str) -> str:
    """The page's DOM once it loaded and its scripts ran."""
    result = _run(page, "--dump-dom")
    assert result.returncode == 0 and "<body" in result.stdout, result.stderr[-2000:]
    return result.stdout


def screenshot(page: Path | str, out: Path, width: int = 1200, height: int = 1600) -> np.ndarray:
    """A screenshot of the page's first `height` pixels as (H, W, 3) uint8."""
    from PIL import Image

    result = _run(page, f"--window-size={width},{height}", f"--screenshot={out}")
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12, at_least: int = 20) -> bool:
    """Whether `at_least` pixels are within `tolerance` of `colour` in every channel."""
    close = np.all(np.abs(pixels.astype(np.int16) - np.asarray(colour, dtype=np.int16)) <= tolerance, axis=-1)
    return int(close.sum()) >= at_least
