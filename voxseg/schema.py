"""The type check of a JSON record against a dataclass's annotations: the one schema check of the records voxseg
reads (plans.json and its network and normalisation entries), run before any value is used.

    check_fields(Plan, data, "work/plans.json")   # ConfigError: "work/plans.json: target_spacing[1] is NaN, ..."

Numbers where a `float` is annotated must be finite (an int is a float there); `int` takes no float or bool;
`list[...]`, `dict[...]`, unions with None and nested dataclasses (checked when they are built) are followed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

from voxseg.errors import ConfigError

_NONE = type(None)


def describe(hint: Any) -> str:
    """A type annotation in words: "a list of numbers", "a whole number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is _NONE else describe(a) for a in args)
    if origin is list:
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin is dict:
        return "an object"
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a text"}
    if hint in names:
        return names[hint]
    if dataclasses.is_dataclass(hint):
        return "an object"
    return getattr(hint, "__name__", str(hint))


def _plural(text: str) -> str:
    """"a whole number" -> "whole numbers", "a list of whole numbers" -> "lists of whole numbers"."""
    text = text.removeprefix("a ").removeprefix("an ")
    head, sep, tail = text.partition(" of ")
    return f"{head}s{sep}{tail}" if sep else (text if text.endswith("s") else text + "s")


def _fits(value: Any, hint: Any) -> str | None:
    """None when `value` fits `hint`; otherwise the dotted path inside `value` ("" for itself) and why."""
    if hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        reasons = [_fits(value, a) for a in args if a is not _NONE]
        if any(reason is None for reason in reasons):
            return None
        return next((reason for reason in reasons if reason), "")  # the deepest finding, else the value itself
    if hint is bool:
        return None if isinstance(value, bool) else ""
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else ""
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ""
        return None if math.isfinite(value) else ""
    if hint is str:
        return None if isinstance(value, str) else ""
    if origin is list:
        if not isinstance(value, list):
            return ""
        for index, item in enumerate(value):
            inner = _fits(item, args[0]) if args else None
            if inner is not None:
                return f"[{index}]{inner}"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return ""
        for key, item in value.items():
            inner = _fits(item, args[1]) if len(args) == 2 else None
            if inner is not None:
                return f".{key}{inner}"
        return None
    if dataclasses.is_dataclass(hint):  # checked field by field when it is built from the record
        return None if isinstance(value, (dict, hint)) else ""
    return None


def _item(value: Any, path: str) -> Any:
    """The value at `path` ("[1]", ".a[0]") inside `value`."""
    for key, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        value = value[int(index)] if index else value[key]
    return value


def check_fields(cls: type, data: dict[str, Any], where: str) -> None:
    """Refuse a record whose fields do not have the types `cls` annotates (module docstring); the message names
    the file (`where`), the field and the value."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name not in hints:
            continue
        path = _fits(value, hints[name])
        if path is None:
            continue
        found = _item(value, path) if path else value
        shown = "NaN" if isinstance(found, float) and math.isnan(found) else repr(found)
        raise ConfigError(f"{where}: {name}{path} is {shown[:80]}, but {name} must be {describe(hints[name])}; fix "
                          "it, or write the file again with the command that made it")
