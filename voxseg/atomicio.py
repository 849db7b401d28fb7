"""Atomic file writes: write a temporary file next to the target, fsync it, then rename it onto the target.

A reader (or a crashed, resumed run) sees the previous file or the complete new one, never half a file: the
rename is atomic because the temporary file lives in the target's own folder (same file system). On any
failure inside the block the temporary file is removed and an existing target is left untouched.

The temporary name keeps the target's suffixes, because nibabel, SimpleITK and matplotlib choose the file
format from the ending: `case.nii.gz` is written as `.case.tmp<pid>-<token>.nii.gz`.

```
with atomic_path("pred/case.nii.gz") as tmp:   # any writer that takes a path
    nib.save(image, str(tmp))
with atomic_open("store/case.npy") as handle:  # any writer that takes an open binary file
    np.save(handle, array)
write_text("summary.csv", text)
```
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "atomic_path", "copy_file", "temporary_path", "write_bytes", "write_text"]


def temporary_path(target: str | Path) -> Path:
    """A fresh temporary name in the target's folder that ends like the target.

    Example: `out/case_0001.nii.gz` -> `out/.case_0001.tmp4242-9f3a1c.nii.gz`. The process id and a random
    token keep concurrent writers (processes or threads) of the same target apart. The leading dot marks it
    hidden: code that lists a folder skips names starting with "." (a process killed mid-write can leave one).
    """
    target = Path(target)
    head, dot, suffixes = target.name.lstrip(".").partition(".")
    return target.with_name(f".{head}.tmp{os.getpid()}-{secrets.token_hex(3)}{dot}{suffixes}")


def _fsync(path: Path) -> None:
    """Flush a written file to disk; a symbolic link (to an existing file) needs nothing."""
    if path.is_symlink() or not path.is_file():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(target: str | Path, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path for `target`; when the block succeeds, fsync it and rename it onto `target`.

    The target's folder is created if needed. If the block raises, or writes nothing, the temporary file is
    removed and `target` (if it existed) keeps its previous content.

    Args:
        target: the file to write.
        sync: fsync the temporary file before the rename (durable across a power loss, not only a crash).

    Raises:
        FileNotFoundError: the block did not create the temporary file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        os.replace(tmp, target)
    finally:
        # after a successful rename there is nothing left to remove
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Yield an open handle on a temporary file that replaces `target` once the block succeeds.

    Args:
        target: the file to write.
        mode: a write mode of `open` ("wb", "w"; not append, which would start from an empty file).
        open_args: passed to `open` (e.g. encoding="utf-8", newline="").
    """
    if not mode.startswith(("w", "x")):
        raise ValueError(f"atomic_open needs a write mode ('w', 'wb'), got '{mode}'")
    with atomic_path(target, sync=False) as tmp:
        with open(tmp, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_bytes(target: str | Path, data: bytes) -> None:
    """Atomically replace `target` with `data`."""
    with atomic_open(target, "wb") as handle:
        handle.write(data)


def write_text(target: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Atomically replace `target` with `text` (no newline translation: what you give is what is written)."""
    with atomic_open(target, "w", encoding=encoding, newline="") as handle:
        handle.write(text)


def copy_file(source: str | Path, target: str | Path) -> None:
    """Atomically replace `target` with a copy of the contents of `source` (not its permissions or times)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
