"""The acceptance suite's tools: run a voxseg command as a user does (a new process, this checkout), measure its
wall time and the peak memory of its whole process tree, and record both.

Peak memory is the largest sum, over the process and every descendant (torchrun's workers, preprocessing
workers), of the proportional set size (PSS: shared pages split between the processes sharing them, so torch's
libraries loaded by two workers count once), sampled every 0.2 s from /proc; where PSS cannot be read, the
resident set size. Each measured command is recorded under its name in ACCEPTANCE_RESULTS (default
benchmarks/results/acceptance.json), with the machine it ran on, for BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("ACCEPTANCE_RESULTS", ROOT / "benchmarks" / "results" / "acceptance.json"))
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def environment(threads: int | None = None) -> dict[str, str]:
    """The environment of a user's shell with this checkout importable (no torchrun variables)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def voxseg(*args: str) -> list[str]:
    """The command line `voxseg ARGS` (the installed entry point is `python -m voxseg`)."""
    return [sys.executable, "-m", "voxseg", *map(str, args)]


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node NPROC -m voxseg ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "voxseg", *map(str, args)]


# ----- process-tree memory ------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _memory_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pids(root: int) -> list[int]:
    """Process `root` and all its descendants now."""
    tree, todo, found = _children(), [root], []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += tree.get(pid, [])
    return found


def tree_memory_bytes(root: int) -> int:
    """The memory of process `root` and all its descendants now (PSS, else RSS)."""
    return sum(_memory_kib(pid) for pid in tree_pids(root)) * 1024


def wait_sampling(process: subprocess.Popen, start: float, timeout: float, sample: Callable[[], None]) -> int | None:
    """Wait for `process`, calling `sample()` every 0.2 s; past `timeout` seconds since `start` its process group
    is killed and None is returned, else its exit code."""
    while True:
        sample()
        try:
            return process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if time.perf_counter() - start > timeout:
                os.killpg(process.pid, 9)
                process.wait()
                return None


@dataclass
class Measured:
    """A finished command: exit code (None: stopped at its timeout), output, wall seconds, peak tree memory."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def run(command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None,
        watch: Callable[[str, subprocess.Popen], None] | None = None) -> Measured:
    """Run `command`, sampling its process tree's memory; `watch(stderr_so_far, process)` is called as stderr
    arrives (to kill the run at a chosen moment). Output is read in threads, so a chatty process never blocks."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env or environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    peak = [0]

    def read(stream, sink, on_data=None):
        # whatever has arrived, at once (a buffered read would wait for a full buffer)
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            sink.append(chunk.decode(errors="replace"))
            if on_data is not None:
                on_data("".join(sink), process)

    readers = [threading.Thread(target=read, args=(process.stdout, out), daemon=True),
               threading.Thread(target=read, args=(process.stderr, err, watch), daemon=True)]
    for reader in readers:
        reader.start()
    code = wait_sampling(process, start, timeout,
                         lambda: peak.__setitem__(0, max(peak[0], tree_memory_bytes(process.pid))))
    for reader in readers:
        reader.join(timeout=10)
    return Measured(code, "".join(out), "".join(err), time.perf_counter() - start, peak[0])


def require_success(measured: Measured, what: str) -> Measured:
    assert measured.returncode == 0, (f"{what}: exit {measured.returncode} after {measured.seconds:.0f} s\n"
                                      f"{measured.stdout[-2000:]}\n{measured.stderr[-5000:]}")
    return measured


def _shown(argument: str) -> str:
    """A command-line argument as a user would type it: `python`, paths below the test's folder shortened."""
    if argument == sys.executable:
        return "python"
    marker = re.search(r"/pytest-\d+/[^/]+/", argument)
    return argument[marker.end():] if marker else argument


def record(name: str, measured: Measured, command: list[str], **extra) -> None:
    """Keep `name`'s wall time and peak memory in the results file (one entry per name, the latest run)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    shown = [_shown(str(c)) for c in command]
    results[name] = {"seconds": round(measured.seconds, 1), "peak_tree_gib": round(measured.peak_gib, 2),
                     "command": " ".join(shown), "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                     "date": time.strftime("%Y-%m-%d %H:%M"), **extra}
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)
