"""The tables of docs/TRAINING.md that are derived from the parser and the config tree, and their upkeep.

    python -m voxseg.cli.docs docs/TRAINING.md           # rewrite the derived blocks
    python -m voxseg.cli.docs --check docs/TRAINING.md   # exit 1 if they are out of date (a test runs this)

A derived block sits between `<!-- derived:NAME -->` and `<!-- /derived:NAME -->`; NAME is a key of `BLOCKS`.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from voxseg.cli.derive import Option, sections, train_options
from voxseg.cli.train import TRAIN_FLAGS


def train_parser() -> argparse.ArgumentParser:
    from voxseg.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"].complete()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flag_table() -> str:
    """Every `voxseg train` flag: the option it sets, its default and what it does, as the parser has them."""
    parser, options = train_parser(), train_options()
    formatter = parser._get_formatter()
    rows = ["| flag | config option | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = formatter._format_action_invocation(action).replace(", ", " / ")
        option = options[action.dest] if action.dest in TRAIN_FLAGS.values() else None
        if option is not None:
            rows.append(f"| `{flag}` | `{option.name}` | `{option.shown_default}` | {_cell(option.help)} |")
        else:
            default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
            rows.append(f"| `{flag}` | – | {default} | {_cell((action.help or '').replace('%%', '%'))} |")
    return "\n".join(rows)


def _option_row(option: Option) -> str:
    choices = f" One of: {', '.join(option.choices)}." if option.choices else ""
    return (f"| `{option.name}` | {_cell(option.type_name)} | `{option.shown_default}` | "
            f"{_cell(option.help)}{choices} |")


def option_tables() -> str:
    """One table per config section: option, type, default (as `--set` takes it), documentation."""
    out = []
    for section, group in sections(train_options()).items():
        title = {"": "top-level fields", "plan": "`plan.*`: overrides of the plan"}.get(section, f"`{section}`")
        out += [f"#### {title}", "", "| option | type | default | meaning |", "|---|---|---|---|"]
        out += [_option_row(option) for option in group] + [""]
    return "\n".join(out).rstrip()


BLOCKS: dict[str, Callable[[], str]] = {"flags": flag_table, "options": option_tables}


def render(text: str) -> str:
    """`text` with every derived block replaced by its current content."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- derived:{name} -->\n)(?:.*?\n)?(<!-- /derived:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no '<!-- derived:{name} -->' ... '<!-- /derived:{name} -->' block")
        text = pattern.sub(lambda m: f"{m.group(1)}{make()}\n{m.group(2)}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voxseg.cli.docs", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default="docs/TRAINING.md")
    parser.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    args = parser.parse_args(argv)
    path = Path(args.file)
    text = path.read_text(encoding="utf-8")
    fresh = render(text)
    if args.check:
        print(f"{path}: {'up to date' if fresh == text else 'out of date; run python -m voxseg.cli.docs ' + str(path)}")
        return 0 if fresh == text else 1
    path.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
