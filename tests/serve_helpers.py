"""A real `voxseg serve` process on a free localhost port, for the serving tests; and tiny cases for it."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

from voxseg.data.io import Geometry, write_image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m voxseg serve MODEL --port P --jobs-dir JOBS ...` started and waited for (GET /healthz)."""

    def __init__(self, model: Path, jobs_dir: Path, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = jobs_dir.parent / f"server-{self.port}.log"
        # one thread, as the tests' own predictions run (`one_thread`): a busy 2-core machine runs tiny cases
        # several times faster so, and the same thread count keeps the summation order the same
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "voxseg", "serve", str(model), "--port", str(self.port), "--device", "cpu",
                   "--jobs-dir", str(jobs_dir), *flags]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the server did not answer in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread in this process for the block (the server's thread count, `Server`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_cases(folder: Path, count: int, channels: int = 2, seed: int = 0) -> list[tuple[str, list[Path]]]:
    """`count` cases of random images, each of its own shape (so a mixed-up result has the wrong shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        shape = (10 + index % 7, 9 + index % 5, 8 + index // 7 % 7)  # one 16^3 tile each: quick
        image = rng.normal(size=(channels, *shape)).astype(np.float32)
        name = f"case{index:03d}"
        files = [folder / f"{name}_{c:04d}.nii.gz" for c in range(channels)]
        for channel, path in enumerate(files):
            write_image(path, image[channel], Geometry(np.diag([1.0, 1.2, 0.9, 1.0])))
        cases.append((name, files))
    return cases
