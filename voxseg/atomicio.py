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
import errno
import glob
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from voxseg.errors import ConfigError, DiskFullError

__all__ = ["atomic_open", "atomic_path", "copy_file", "make_output_folder", "staging_folder", "sweep_stale_staging",
           "sweep_stale_temporaries", "temporary_path", "write_bytes", "write_text"]

# what torch.save's C++ writer says when a write comes up short (it raises RuntimeError, not OSError)
_SHORT_WRITE_MARKERS = ("file write failed", "unexpected pos", "No space left on device")
# what numpy's tofile/save say when a write comes up short (an OSError without an errno)
_NUMPY_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
# `.NAME.tmp<pid>-<hex><suffixes>`, as `temporary_path` names them
_TEMPORARY_NAME = re.compile(r"^\.[^.].*?\.tmp(?P<pid>\d+)-[0-9a-f]+(\..*)?$")


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
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(f"{target}: no space left on device while writing it ({_free_bytes(target.parent)} "
                            "bytes free); free some space and run again (an existing file was left unchanged)") from exc
    finally:
        # after a successful rename there is nothing left to remove
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def make_output_folder(folder: str | Path, option: str = "output folder") -> Path:
    """Create `folder` (and its parents); ConfigError naming `option` when it exists as a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder}: exists and is a file, not a folder; give a folder (or remove the file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{option} {folder}: a part of the path is a file, not a folder; give another path") from None
    return folder


def is_disk_full(exc: BaseException) -> bool:
    """True for an error that means the disk (or the user's quota) is full, torch.save's and numpy's short writes
    included."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and bool(_NUMPY_SHORT_WRITE.search(
            str(exc))))
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _SHORT_WRITE_MARKERS)


_OS_CAUSES = {
    errno.EACCES: "permission denied: give your user access to it (or to its folder), or choose another location",
    errno.EPERM: "operation not permitted: give your user access to it (or to its folder), or choose another location",
    errno.EROFS: "the file system is read-only: choose a location on a writable disk",
    errno.ENOENT: "it does not exist (or a folder above it does not): check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file is expected: check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n) or use fewer workers",
    errno.EIO: "an input/output error on the disk: check the disk (dmesg) and run again",
}


def os_error_message(exc: OSError) -> str:
    """An OSError as one line that names the path and the cause and says what to do (the CLI's last resort for
    the errors the operating system raises)."""
    path = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None) or "a file"
    if is_disk_full(exc):
        folder = Path(exc.filename).parent if exc.filename else Path.cwd()
        return (f"{path}: no space left on device ({_free_bytes(folder)} bytes free); free some space and run "
                "again")
    cause = _OS_CAUSES.get(exc.errno) if exc.errno is not None else None
    return f"{path}: {cause or (exc.strerror or str(exc))}"


def _free_bytes(folder: Path) -> int | str:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return "unknown"


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


def staging_folder(target: str | Path, purpose: str) -> Path:
    """A fresh hidden folder next to `target` to build it in, then rename into place (`.NAME.PURPOSE-PID-XXXX`):
    stale ones of killed runs are found by the process id in the name (`sweep_stale_staging`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-{os.getpid()}-", dir=target.parent))


def sweep_stale_staging(target: str | Path) -> list[Path]:
    """Remove the staging folders of `target` (`staging_folder`) left by runs that were killed; returns them.

    A folder is stale when the process in its name is not running or started after the folder was made."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z]+-(?P<pid>\d+)-")
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = pattern.match(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        try:
            made = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if _writer_gone(int(match.group("pid")), made):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _writer_gone(pid: int, written: float) -> bool:
    """Whether the process `pid` that wrote something at time `written` is gone: not running, or started after it
    (its id reused; 1 s of slack: /proc start times are in clock ticks)."""
    started = _process_start_time(pid)
    return started is None or started > written + 1.0


def _process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None when it is not running.

    Where /proc is missing (not Linux) a running process gets 0.0 (its temporary files are kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # running, owned by someone else
    except OSError:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return 0.0


def sweep_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove temporary files left in `folder` by writers that were killed mid-write; returns those removed.

    A temporary file (named by `temporary_path`) is stale when the process id in its name is not running, or
    when that process started after the file was last written (the id was reused). Files of running writers,
    this process's included, are left alone. Run it when a command starts using a folder (train: the fold
    folder, predict: the output folder, preprocess: the case store).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or not (path.is_file() or path.is_symlink()):
            continue
        try:
            written = path.lstat().st_mtime
        except FileNotFoundError:
            continue  # its writer renamed or removed it meanwhile
        if _writer_gone(int(match.group("pid")), written):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
