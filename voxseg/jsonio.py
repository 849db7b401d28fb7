"""JSON files the way every voxseg stage reads and writes them: atomically, with errors that say what to do."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from voxseg.atomicio import write_text
from voxseg.errors import ConfigError, VoxsegError


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file next to `path`, then rename, so a crash never leaves half a file."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path, error: type[VoxsegError] = ConfigError, missing: str = "", invalid: str = "") -> Any:
    """Parse a JSON file; a missing or malformed file raises `error` naming the path plus the given hint.

    Args:
        path: the file.
        error: the VoxsegError subclass to raise.
        missing: what to do when the file does not exist, e.g. "run 'voxseg plan DATASET -o WORKDIR' first".
        invalid: what to do when it is not valid JSON, e.g. "delete it and re-run 'voxseg plan'".
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist" + (f": {missing}" if missing else ""))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})" + (f"; {invalid}" if invalid else "")) from None
