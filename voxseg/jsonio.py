"""JSON files the way every voxseg stage reads and writes them: atomically, with errors that say what to do.

Every JSON text voxseg reads (dataset.json, plans.json, splits, configs, archive manifests, the metadata of
weights and ONNX files, nnU-Net's files) goes through `parse_json`, which refuses before anything uses the data:
- a file larger than `MAX_JSON_BYTES` (no file of ours comes near it);
- a key that appears twice in one object (JSON parsers keep the last one silently: a dataset.json with two
  "0" channels would be planned as the second);
- nesting deeper than `MAX_JSON_DEPTH` levels (it would otherwise end in Python's recursion limit);
- text that is not JSON or not UTF-8.
Each refusal names the file and what to do. Whether a value is finite where a number must be is the schema's
business (`voxseg.schema`, run by `voxseg.plans`), as is every field's type.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from voxseg.atomicio import write_text
from voxseg.errors import ConfigError, VoxsegError
from voxseg.units import GIB

MAX_JSON_BYTES = GIB // 4
MAX_JSON_DEPTH = 64


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file next to `path`, then rename, so a crash never leaves half a file."""
    write_text(path, json.dumps(data, indent=2) + "\n")


class _DuplicateKey(ValueError):
    def __init__(self, key: str, keys: list[str]) -> None:
        super().__init__(key)
        self.key, self.keys = key, keys


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, [k for k, _ in pairs])
        out[key] = value
    return out


def _depth(data: Any) -> int:
    """How deeply lists and objects nest (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str | bytes, where: str | Path, error: type[VoxsegError] = ConfigError, invalid: str = "") -> Any:
    """Parse JSON text read from `where` (a file, or e.g. "archive member M"); `error` names it when the text is
    not JSON, has a key twice in one object, or nests deeper than MAX_JSON_DEPTH."""
    hint = f"; {invalid}" if invalid else ""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        shown = ", ".join(exc.keys[:8]) + (", ..." if len(exc.keys) > 8 else "")
        raise error(f"{where}: key '{exc.key}' appears twice in one object (keys: {shown}); JSON readers keep only "
                    f"the last one, so voxseg will not guess which is meant: keep one{hint}") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be a file voxseg reads (more than {MAX_JSON_DEPTH} levels)"
                    f"{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{where} is not valid JSON ({exc}){hint}") from None
    depth = _depth(data)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{where}: nested {depth} levels deep, more than the {MAX_JSON_DEPTH} a file voxseg reads can "
                    f"have{hint}")
    return data


def read_json(path: str | Path, error: type[VoxsegError] = ConfigError, missing: str = "", invalid: str = "",
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file (`parse_json`); a missing, unreadable, oversized or malformed file raises `error` naming
    the path plus the given hint.

    Args:
        path: the file.
        error: the VoxsegError subclass to raise.
        missing: what to do when the file does not exist, e.g. "run 'voxseg plan DATASET -o WORKDIR' first".
        invalid: what to do when it is not valid JSON, e.g. "delete it and re-run 'voxseg plan'".
        max_bytes: the largest file read.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist" + (f": {missing}" if missing else ""))
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path} is {size} bytes, more than the {max_bytes} a JSON file voxseg reads may have"
                    + (f"; {invalid}" if invalid else ""))
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise error(f"{path} cannot be read: permission denied; give your user read access (chmod u+r) or run as "
                    "the user who owns it") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from None
    return parse_json(raw, path, error, invalid)
