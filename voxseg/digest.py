"""SHA-256 digests of files and bytes, and the `NAME.sha256` file written next to a file to check it later."""
from __future__ import annotations

import hashlib
from pathlib import Path

from voxseg.atomicio import write_text

__all__ = ["digest_file_path", "sha256_bytes", "sha256_file", "write_digest_file", "verify_digest_file"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def digest_file_path(path: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.sha256`."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_digest_file(path: str | Path) -> Path:
    """Write `PATH.sha256` in the `sha256sum` format ("HEX  NAME"), so `sha256sum -c` checks it too."""
    path = Path(path)
    sidecar = digest_file_path(path)
    write_text(sidecar, f"{sha256_file(path)}  {path.name}\n")
    return sidecar


def verify_digest_file(path: str | Path) -> str | None:
    """None when `PATH.sha256` is absent or matches; otherwise what differs (expected and actual digests)."""
    path = Path(path)
    sidecar = digest_file_path(path)
    if not sidecar.is_file():
        return None
    expected = sidecar.read_text().split()[0].lower() if sidecar.read_text().split() else ""
    actual = sha256_file(path)
    if expected == actual:
        return None
    return f"its SHA-256 is {actual} but {sidecar.name} says {expected or '(empty)'}"
