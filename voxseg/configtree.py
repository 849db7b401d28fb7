"""Generic machinery for a tree of config dataclasses: build from JSON dicts, list and locate dotted options,
parse command-line text by a field's type hint.

`voxseg.config` defines the training tree (`TrainConfig`) on top of this; nothing here knows its fields.

Choices convention: a field with a fixed set of values declares them once, in its dataclass field metadata,
as a `Registry` (anything with `.names()`) or a tuple of strings:

    name: str = field(default="sgd", metadata={"choices": OPTIMIZERS})
    cache: str = field(default="auto", metadata={"choices": ("auto", "gpu", "pinned", "mmap")})

`field_choices(cls, "name")` gives the names (the CLI's choices read it) and `check_choice(self, "optim.name")`
in `__post_init__` validates against the same list.

Example:
    >>> parse_value("96,96,96", list[int], "plan.patch_size")
    [96, 96, 96]
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from voxseg.errors import ConfigError
from voxseg.jsonio import parse_json
from voxseg.registry import closest_name, unknown_name_message

__all__ = ["build_dataclass", "check", "check_choice", "dataclass_fields", "dotted_names", "field_choices",
           "locate_option", "parse_value"]


def field_choices(cls: type, name: str) -> list[str] | None:
    """The allowed values of field `name` of dataclass `cls` (from its `choices` metadata), or None if free."""
    for item in dataclasses.fields(cls):
        if item.name == name:
            choices = item.metadata.get("choices")
            if choices is None:
                return None
            return list(choices.names()) if hasattr(choices, "names") else [str(c) for c in choices]
    raise KeyError(f"{cls.__name__} has no field '{name}'")


def check_choice(config: Any, where: str) -> None:
    """Raise ConfigError unless field `where` ('section.field') of `config` holds one of its declared choices."""
    name = where.rpartition(".")[2]
    allowed = field_choices(type(config), name) or []
    value = getattr(config, name)
    if value not in allowed:
        close = closest_name(str(value), allowed)
        hint = f" (did you mean '{close}'?)" if close else ""
        raise ConfigError(f"{where}='{value}' is not allowed{hint}; use one of: {', '.join(allowed)}")


def check(condition: bool, where: str, message: str) -> None:
    """Raise ConfigError '{where} {message}' unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{where} {message}")


def dotted_names(cls: type, prefix: str = "") -> list[str]:
    """Every dotted option name under dataclass `cls`, e.g. 'optim.lr', 'augment.rotation_p'."""
    names = []
    for name, hint in dataclass_fields(cls).items():
        names += dotted_names(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return names


def dataclass_fields(cls: type) -> dict[str, Any]:
    """Init fields of dataclass `cls` with their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def replace_fields(base: Any, kind: str, **fields: Any) -> Any:
    """A copy of dataclass instance `base` with single fields replaced (validated again by its __post_init__);
    an unknown name is refused as an unknown `kind`, with the nearest valid name."""
    names = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ConfigError(unknown_name_message(kind, unknown[0], names))
    return dataclasses.replace(base, **fields)


def build_dataclass(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where.rstrip('.') or 'root'}' must be an object, got {data!r}")
    hints = dataclass_fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"config {where.rstrip('.') or 'root'}: " + unknown_name_message(
                "option", where + key, [where + n for n in hints]))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = build_dataclass(hint, value, f"{where}{key}.")
        elif isinstance(value, list) and _accepts_tuple(hint):
            value = tuple(value)  # JSON has no tuples
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a value of the wrong type reached a comparison in validation
        raise ConfigError(f"config {where.rstrip('.') or 'root'}: invalid value ({exc})") from None


def locate_option(root: type, key: str, data: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    """Type hint, parent dict and leaf name of dotted option `key` in `data` (the dict form of dataclass `root`).

    Unknown names raise ConfigError suggesting the nearest valid name; a section name without a field lists
    the section's fields.
    """
    cls: Any = root
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = dataclass_fields(cls)
        prefix = ".".join(parts[:depth])
        if part not in hints:
            valid = [f"{prefix}.{n}" if prefix else n for n in hints]
            if depth == 0:
                valid = dotted_names(root)
            raise ConfigError(unknown_name_message("option", key, valid))
        hint = hints[part]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(hint) != (not last):
            options = ", ".join(n for n in dotted_names(root) if n.startswith(key + ".")) if last else ""
            raise ConfigError(f"option '{key}' is a section; set one of its fields: {options}" if last
                              else f"option '{'.'.join(parts[:depth + 1])}' has no sub-options")
        if last:
            return hint, data, part
        data = data[part]
        cls = hint
    raise AssertionError("unreachable")


def _origin(hint: Any) -> Any:
    return typing.get_origin(hint)


def _accepts_tuple(hint: Any) -> bool:
    options = _union_args(hint) or (hint,)
    return any(_origin(o) is tuple for o in options) and not any(_origin(o) is list for o in options)


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if _origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse the text of an override by the field's type hint."""
    args = _union_args(hint)
    if args is not None:
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return parse_value(text, option, key)
            except ConfigError:
                if option is options[-1]:
                    raise
    if hint is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"option '{key}' expects true or false, got '{text}'")
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"option '{key}' expects a{'n integer' if hint is int else ' number'}, got '{text}'") \
            from None
    if hint is str:
        return text
    if hint is Any or dataclasses.is_dataclass(hint):  # free-form or structured: JSON, else the text itself
        return _parse_json(text, key) if text[:1] in "[{" else text
    origin = _origin(hint)
    if origin in (list, tuple):
        items = _parse_json(text, key) if text.startswith("[") else [t for t in text.split(",") if t.strip()]
        if not isinstance(items, list):
            raise ConfigError(f"option '{key}' expects a list like [1,2,3] or 1,2,3, got '{text}'")
        item_hint = (typing.get_args(hint) or (str,))[0]  # list[int], tuple[int, ...], tuple[float, float]
        values = [parse_value(json.dumps(v) if not isinstance(v, str) else v.strip(), item_hint, key)
                  for v in items]
        return tuple(values) if origin is tuple else values
    if origin is dict or hint is dict:
        return _parse_dict(text, hint, key)
    raise ConfigError(f"option '{key}' cannot be set from the command line")


def _parse_dict(text: str, hint: Any, key: str) -> dict[str, Any]:
    """JSON (`{"dice": 1, "ce": 0.5}`) or comma-separated pairs (`dice=1,ce=0.5`)."""
    if text.startswith("{"):
        value = _parse_json(text, key)
        if not isinstance(value, dict):
            raise ConfigError(f"option '{key}' expects an object like dice=1,ce=0.5, got '{text}'")
        return value
    value_hint = (typing.get_args(hint) or (str, str))[1]
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, item = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"option '{key}' expects name=value pairs like dice=1,ce=0.5, got '{text}'")
        out[name.strip()] = parse_value(item.strip(), value_hint, key)
    return out


def _parse_json(text: str, key: str) -> Any:
    return parse_json(text, f"option '{key}': '{text}'", ConfigError)
