"""Debian packages some tests need (Chromium for the report's pages, Orthanc for the PACS round trip): installed
with apt-get on first use when missing and the tests run as root, as on CI and a fresh development machine
(`.ci/run` installs them beforehand too). Elsewhere the test fails saying what to install."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, TypeVar

Found = TypeVar("Found")
_updated = False


def ensure(find: Callable[[], Found | None], packages: tuple[str, ...]) -> Found:
    """What `find` finds, installing `packages` first when it finds nothing; AssertionError naming them if still
    nothing."""
    global _updated
    found = find()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not _updated:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900, check=False,
                           env=environment)
            _updated = True
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], capture_output=True, timeout=900,
                       check=False, env=environment)
        found = find()
    if found is None:
        raise AssertionError(f"this test needs the Debian package(s) {' '.join(packages)}: "
                             f"apt-get install -y {' '.join(packages)} (.ci/run does)")
    return found
