"""Folders that two processes must not write at once: a training run's fold folder, a case store.

    with folder_lock(fold_dir, "training this fold"):
        ...                      # a second `voxseg train` of the same fold is refused, naming this process

The lock is an exclusive `flock` on a hidden file next to the folder (`training/.fold_0.lock` for
`training/fold_0`; next to, not in it, because a forced retrain moves the fold folder aside), which also records who
holds it (process id, command, host, time) for the refusal message. The operating system releases it when the
process ends, however it ends (kill -9 included), so a lock is never left stale; the file itself stays and is
reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from voxseg.errors import InputError


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: .NAME.lock next to it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(handle: int) -> str:
    """Who holds the lock, from what it wrote into the file."""
    try:
        os.lseek(handle, 0, os.SEEK_SET)
        record = json.loads(os.read(handle, 4096) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("since", 0))))
        return (f"process {record.get('pid', '?')} on {record.get('host', '?')}, '{record.get('command', '?')}', "
                f"since {since}")
    except (OSError, ValueError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold FOLDER's lock for `what` (e.g. "training this fold"); InputError naming the holder when another
    process has it. The folder's parent is created if needed (the folder itself is not)."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{folder} is in use: {_holder(handle)} is {what} there. Wait for it to finish or stop "
                             "it; two processes writing the same folder would mix their files") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join(["voxseg", *sys.argv[1:]])[:300]}
        os.ftruncate(handle, 0)
        os.lseek(handle, 0, os.SEEK_SET)
        os.write(handle, json.dumps(record).encode())
        yield path
    finally:
        os.close(handle)  # releases the lock
