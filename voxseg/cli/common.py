"""What every command shares: the sub-parser factory, hints for unknown flags, value types for flags, the
device check."""
from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from voxseg.errors import ConfigError
from voxseg.registry import closest_name

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


@dataclass(frozen=True)
class Spelling:
    """What to give instead of another tool's flag: `use`, a flag of the command ("--lr") or a dotted config
    option ("optim.weight_decay", given with --set), then `note`."""

    use: str
    note: str = ""


def _dashed(flag: str) -> str:
    return flag.replace("_", "-")


def _given_options(extras: list[str]) -> list[tuple[str, list[str]]]:
    """The unknown options among argparse's leftovers, each with the values that follow it
    (['--loss_weights', '1.0', '2.0'] -> [('--loss_weights', ['1.0', '2.0'])]; '--x=1' -> ('--x', ['1']))."""
    found: list[tuple[str, list[str]]] = []
    for token in extras:
        if token.startswith("-") and not re.fullmatch(r"-\d[\d.eE+-]*", token):
            name, sep, value = token.partition("=")
            found.append((name, [value] if sep else []))
        elif found:
            found[-1][1].append(token)
    return found


def _replacement(parser: argparse.ArgumentParser, use: str, values: list[str]) -> str:
    """`use` as typed with the given values: '--lr 3e-4', '--residual', '--set optim.weight_decay=1e-4'."""
    value = ",".join(values)
    if not use.startswith("-"):
        return f"--set {use}={value or 'VALUE'}"
    action = parser._option_string_actions.get(use)
    takes_value = action is not None and action.nargs != 0
    return f"{use} {value}" if takes_value and value else use


def unknown_option_hint(parser: argparse.ArgumentParser, extras: list[str],
                        spellings: dict[str, Spelling] | None = None) -> str | None:
    """A message for the first unknown option of `extras` that has a likely meaning, else None (argparse's
    own error follows). In order: `spellings` (another tool's names, matched with '_' or '-'), the underscore
    spelling of a flag (--batch_size -> --batch-size), a close typo of a flag."""
    table = {_dashed(name): spelling for name, spelling in (spellings or {}).items()}
    flags = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    for given, values in _given_options(extras):
        spelling = table.get(_dashed(given))
        if spelling is not None:
            note = f" {spelling.note}" if spelling.note else ""
            return f"{given} is not an option; use {_replacement(parser, spelling.use, values)}{note}"
        if _dashed(given) in flags:
            return f"{given} is not an option; use {_replacement(parser, _dashed(given), values)}"
        close = closest_name(_dashed(given), flags)
        if close is not None:
            return f"{given} is not an option; did you mean {close}?"
    return None


class DeferredParser(argparse.ArgumentParser):
    """A sub-command parser whose `setup` adds its arguments when it is first used (parsing, --help), so that
    building the whole parser imports nothing heavy: the config tree and the checkpoint names import torch,
    which `voxseg --help` or `voxseg check` never need.

    An unknown flag gets a hint naming what to give instead (`unknown_option_hint`, with `spellings`, this
    command's table of other tools' names) in place of argparse's "unrecognized arguments"."""

    def __init__(self, *args: Any, setup: Callable[[argparse.ArgumentParser], None] | None = None,
                 spellings: dict[str, Spelling] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup = setup
        self.spellings = spellings or {}

    def complete(self) -> "DeferredParser":
        """Add the deferred arguments now (once); returns the parser."""
        setup, self._setup = self._setup, None
        if setup is not None:
            setup(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.complete()
        namespace, extras = super().parse_known_args(args, namespace)
        hint = unknown_option_hint(self, extras, self.spellings)
        if hint is not None:
            self.error(hint)  # usage, "voxseg COMMAND: error: HINT", exit 2
        return namespace, extras


def add_command(sub: Subparsers, name: str, handler: Handler, help_text: str, example_text: str,
                setup: Callable[[argparse.ArgumentParser], None] | None = None,
                spellings: dict[str, Spelling] | None = None) -> argparse.ArgumentParser:
    """A sub-command with its help, examples and handler; `setup`, if given, adds its arguments on first use;
    `spellings` maps other tools' flags to this command's (the sub-parsers must be `DeferredParser`s)."""
    extra = {key: value for key, value in (("setup", setup), ("spellings", spellings)) if value}
    parser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=examples(example_text),
        formatter_class=argparse.RawDescriptionHelpFormatter, **extra,
    )
    parser.set_defaults(handler=handler)
    return parser


def csv_ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,64,64, got '{value}'") from None


def csv_floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,1,1, got '{value}'") from None


def device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{value}'")
    return value


def usable_device(name: str) -> str:
    """Resolve "auto"; refuse a GPU this machine does not have before any work starts (torch would fail later,
    with a traceback)."""
    from voxseg.devices import resolve_device

    return str(resolve_device(name))


def key_values(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set '{pair}': expected KEY=VALUE, e.g. --set batch_size=4")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def fold(value: str) -> int | str:
    if value == "all":
        return "all"
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"--fold expects a fold number like 0 or 'all', got '{value}'")
    return int(value)


def folds(value: str) -> list[int] | str:
    if value == "all":
        return "all"
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--folds expects e.g. 0 or 0,1,2 or all, got '{value}'") from None


def add_configuration_flag(parser: argparse.ArgumentParser) -> None:
    """--configuration NAME: which planned configuration of the work directory (voxseg.data.configs)."""
    parser.add_argument("--configuration", metavar="NAME",
                        help="planned configuration to use: 3d_fullres (the default), 2d, 3d_lowres, "
                             "3d_cascade_fullres; WORKDIR/configurations.json lists those planned")


def configuration_workdir(workdir: str, name: str | None) -> str:
    """The work directory a command runs on: WORKDIR itself, or its configuration NAME's folder."""
    if name is None:
        return workdir
    from voxseg.data.configs import config_workdir

    return str(config_workdir(workdir, name))
