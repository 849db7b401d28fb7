"""Worker processes that die with their parent.

A process pool's workers outlive a parent killed with SIGKILL (kill -9, the OOM killer): they keep running
and holding memory, files and GPUs. `exit_with_parent` is a pool initializer that ends the worker when the
parent goes: on Linux the kernel sends SIGTERM on the parent's death (prctl PR_SET_PDEATHSIG); everywhere a
daemon thread checks once per `poll_s` whether the parent process id changed (the worker was re-parented) and
exits then. Use it for every pool: `ProcessPoolExecutor(n, initializer=exit_with_parent)`.

Linux sends the death signal when the *thread* that started the worker exits; ProcessPoolExecutor starts
workers from the thread that submits, which lives (in its `with` block) as long as the pool.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def _set_parent_death_signal() -> bool:
    """Ask the Linux kernel to send SIGTERM to this process when its parent dies; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)  # the parent is gone: nobody reads this worker's results


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """Pool initializer: end this worker when the process that started it dies (see the module docstring)."""
    parent_pid = os.getppid()
    _set_parent_death_signal()
    if parent_pid == 1:
        return  # already orphaned at start-up: no parent to watch
    threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="voxseg-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
