"""Every option and positional of every `voxseg` command has a help string, and a defaulted option's help shows
its default (the commands' arguments are set up lazily: the walk sets every one of them up)."""
from __future__ import annotations

import argparse
from typing import Any, Iterator

import pytest

from voxseg.cli import build_parser
from voxseg.cli.common import DeferredParser

# actions whose default is the absence of the flag, which needs no mention
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                 argparse._CountAction, argparse._HelpAction, argparse._VersionAction)


def walk(parser: argparse.ArgumentParser, path: str = "voxseg") -> Iterator[tuple[str, argparse.Action, str]]:
    """(command path, action, its rendered help) of every argument of `parser` and its sub-commands."""
    if isinstance(parser, DeferredParser):
        parser.complete()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        text = formatter._expand_help(action) if action.help and action.help != argparse.SUPPRESS else ""
        yield path, action, text


def _spellings(value: Any) -> set[str]:
    """Ways a help string may show `value`: 0.5, 1 for 1.0, 64,64,64 or 64x64x64 for a list."""
    if isinstance(value, (list, tuple)):
        items = [sorted(_spellings(v), key=len)[0] for v in value]
        return {sep.join(items) for sep in (",", "x", " ", ", ")}
    if isinstance(value, float):
        return {str(value), f"{value:g}"}
    return {str(value)}


def shows_default(action: argparse.Action, text: str) -> bool:
    default = action.default
    if default is None or default == argparse.SUPPRESS or isinstance(action, _FLAG_ACTIONS):
        return True
    after = text[text.find("default"):] if "default" in text else ""
    return any(spelling in after for spelling in _spellings(default))


def _arguments() -> list[tuple[str, argparse.Action, str]]:
    return list(walk(build_parser()))


def _name(path: str, action: argparse.Action) -> str:
    return f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_the_walk_sets_up_every_command():
    arguments = _arguments()
    commands = {path for path, _, _ in arguments}
    assert {"voxseg predict", "voxseg export", "voxseg estimate", "voxseg train", "voxseg import", "voxseg demo",
            "voxseg install", "voxseg convert", "voxseg evaluate", "voxseg benchmark"} <= commands
    names = {_name(path, action) for path, action, _ in arguments}
    assert {"voxseg predict -o/--output", "voxseg export --onnx", "voxseg convert src",
            "voxseg train --epochs"} <= names


def test_every_argument_has_help():
    missing = [_name(path, action) for path, action, text in _arguments() if not text.strip()]
    assert not missing, f"arguments without a help string: {missing}"


def test_every_default_is_shown():
    hidden = [f"{_name(path, action)} (default {action.default!r}): {text!r}"
              for path, action, text in _arguments() if text.strip() and not shows_default(action, text)]
    assert not hidden, "options whose help does not show their default:\n" + "\n".join(hidden)


@pytest.mark.parametrize("help_text, default, shown", [
    ("tile step (default 0.5)", 0.5, True), ("GPU memory in GB (default 8)", 8.0, True),
    ("D,H,W voxels (default 64,64,64)", [64, 64, 64], True), ("tile step", 0.5, False),
    ("tiles per call (default 2)", 4, False), ("4 tiles per call (default: the plan's)", 4, False),
])
def test_the_default_check_itself(help_text, default, shown):
    action = argparse.ArgumentParser().add_argument("--x", default=default, help=help_text)
    assert shows_default(action, help_text) is shown
