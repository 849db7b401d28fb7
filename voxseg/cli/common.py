"""What every command shares: the sub-parser factory, value types for flags, the device check."""
from __future__ import annotations

import argparse
import re
import textwrap
from typing import Any, Callable

from voxseg.errors import ConfigError

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


class DeferredParser(argparse.ArgumentParser):
    """A sub-command parser whose `setup` adds its arguments when it is first used (parsing, --help), so that
    building the whole parser imports nothing heavy: the config tree and the checkpoint names import torch,
    which `voxseg --help` or `voxseg check` never need."""

    def __init__(self, *args: Any, setup: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup = setup

    def complete(self) -> "DeferredParser":
        """Add the deferred arguments now (once); returns the parser."""
        setup, self._setup = self._setup, None
        if setup is not None:
            setup(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.complete()
        return super().parse_known_args(args, namespace)


def add_command(sub: Subparsers, name: str, handler: Handler, help_text: str, example_text: str,
                setup: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """A sub-command with its help, examples and handler; `setup`, if given, adds its arguments on first use
    (the sub-parsers must be `DeferredParser`s)."""
    parser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=examples(example_text),
        formatter_class=argparse.RawDescriptionHelpFormatter, **({"setup": setup} if setup else {}),
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
