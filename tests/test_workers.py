"""Pool workers die with their parent: kill -9 of a `preprocess -j 2` leaves no orphaned worker running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")

SCRIPT = textwrap.dedent("""
    import sys, time
    import voxseg.data.preprocess as preprocess
    import voxseg.workers

    if sys.argv[2] == "watchdog":  # without the kernel's death signal, only the watchdog thread is left
        voxseg.workers._set_parent_death_signal = lambda: False
    from voxseg.data.plan import plan_dataset
    from voxseg.data.synth import make_synthetic_dataset

    root = make_synthetic_dataset(sys.argv[1] + "/Dataset001_Syn", num_cases=4, shape=(16, 16, 16), seed=0)
    plan_dataset(root, sys.argv[1] + "/work", num_folds=2)

    def slow_case(case, *args):  # a case that takes long, so the workers are busy when the parent is killed
        time.sleep(120)
        return case.name, 0, None

    preprocess._preprocess_one = slow_case  # forked workers see the patched module
    print("preprocessing", flush=True)
    preprocess.preprocess_dataset(sys.argv[1] + "/work", num_workers=2, progress=False)
""")


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return children


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child not yet reaped by whoever inherited it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mechanism", ["death signal", "watchdog"])
def test_workers_exit_when_the_parent_is_killed(tmp_path, mechanism):
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("kernel without /proc/PID/task/TID/children")
    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path), mechanism], cwd=repo,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(repo)})
    workers: set[int] = set()
    try:
        assert parent.stdout.readline().strip() == b"preprocessing"
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = {pid for pid in _children(parent.pid) if _running(pid)}
            time.sleep(0.1)
        assert len(workers) == 2, f"expected 2 workers, found {workers}"
        time.sleep(1.0)  # the workers run their initializer, then the slow case
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _running(pid)], "workers outlived their killed parent"
    finally:
        parent.kill()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)

