"""Command-line flags derived from the config tree: one definition of every option's type, default, choices and
help, read from the dataclass field it names.

A field's documentation is the string literal right under the field (`field_docs`); its choices are
`metadata={"choices": ...}` (`voxseg.configtree.field_choices`). Plan overrides (`plan.batch_size`,
`plan.network.residual`, ...) are described by the `Plan` / `NetworkPlan` field they override.

To give an option a short flag, add `flag -> dotted option` to an alias table (`voxseg.cli.train.TRAIN_FLAGS`);
to change its help, type or choices, change the field.

Example:
    >>> aliases = {"--lr": "optim.lr", "--residual": "plan.network.residual"}
    >>> parser = argparse.ArgumentParser()
    >>> add_flags(parser, aliases)
    >>> flag_overrides(parser.parse_args(["--lr", "3e-4", "--no-residual"]), aliases)
    ['optim.lr=3e-4', 'plan.network.residual=false']
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from voxseg.config import TrainConfig
from voxseg.configtree import dataclass_fields, field_choices, parse_value
from voxseg.errors import ConfigError
from voxseg.plans import TRAINING_OVERRIDES, NetworkPlan, Plan

PLAN_DEFAULT = "the plan's"  # what a plan override defaults to: the work directory's planned value


@dataclass(frozen=True)
class Option:
    """One dotted option of the training config, with everything a flag or a doc table says about it."""

    name: str
    """dotted name as `--set` takes it, e.g. "optim.lr", "plan.network.residual"."""
    hint: Any
    """the field's type hint."""
    default: Any
    """the default value; PLAN_DEFAULT for plan overrides."""
    help: str
    """the field's documentation, on one line."""
    choices: list[str] | None
    """the allowed values, or None."""

    @property
    def section(self) -> str:
        """'optim' for optim.lr, 'plan' for plan.network.residual, '' for a top-level field."""
        return self.name.split(".")[0] if "." in self.name else ""

    @property
    def shown_default(self) -> str:
        return self.default if self.default is PLAN_DEFAULT else as_text(self.default)

    @property
    def type_name(self) -> str:
        return type_name(self.hint)


# ----- reading the dataclasses --------------------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    '''Documentation of each field of dataclass `cls`: the string literal right under the field, on one line.

    The one style config fields are documented in (tests/test_config_docs.py holds every config dataclass to it):

        lr: float = 1e-2
        """initial learning rate (the schedule scales it per epoch)."""
    '''
    return {name: " ".join(text.split()) for name, text in _field_literals(cls).items()}


def _field_literals(cls: type) -> dict[str, str]:
    """`field: T = default` followed by a string literal: that literal documents the field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (built in an interpreter)
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None if item.default is dataclasses.MISSING else item.default


def _options_of(cls: type, prefix: str) -> list[Option]:
    hints, docs = dataclass_fields(cls), field_docs(cls)
    out = []
    for item in (f for f in dataclasses.fields(cls) if f.init):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            out += _options_of(hint, f"{prefix}{item.name}.")
        elif not (cls is TrainConfig and item.name == "plan"):  # the plan dict: one option per plan key below
            out.append(Option(prefix + item.name, hint, _default(item), docs.get(item.name, ""),
                              field_choices(cls, item.name)))
    return out


def _plan_option(key: str) -> Option:
    cls, name = (NetworkPlan, key[len("network."):]) if key.startswith("network.") else (Plan, key)
    return Option(f"plan.{key}", dataclass_fields(cls)[name], PLAN_DEFAULT, field_docs(cls).get(name, ""),
                  field_choices(cls, name))


@functools.cache
def config_options(cls: type) -> dict[str, Option]:
    """Every option of config dataclass `cls` (e.g. `voxseg.infer.config.InferConfig`), by dotted name, in the
    tree's order."""
    return {option.name: option for option in _options_of(cls, "")}


@functools.cache
def train_options() -> dict[str, Option]:
    """Every option of `TrainConfig`, by dotted name, in the tree's order, then the plan overrides
    (`voxseg.plans.TRAINING_OVERRIDES`)."""
    options = _options_of(TrainConfig, "") + [_plan_option(key) for key in TRAINING_OVERRIDES]
    return {option.name: option for option in options}


# ----- text -----------------------------------------------------------------------------------------------------
def as_text(value: Any) -> str:
    """A value as it is typed after `--set name=`: sgd, 0.01, true, none, [0.9,0.999]."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def type_name(hint: Any) -> str:
    """'int', 'float or None', 'list[int]', 'tuple[float, float]'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(hint))
    if hint is Any:
        return "any"
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def _base_hint(hint: Any) -> Any:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    others = [a for a in args if a is not type(None)]
    return others[0] if len(others) == 1 else hint


def _metavar(option: Option) -> str:
    hint = _base_hint(option.hint)
    origin = typing.get_origin(hint) or hint
    if origin is str:  # free text: named after the field (--device DEVICE)
        return option.name.rsplit(".", 1)[-1].upper()
    return {int: "N", float: "X", list: "A,B,...", tuple: "A,B,...", dict: "K=V,..."}.get(origin, "VALUE")


# ----- argparse -----------------------------------------------------------------------------------------------
def _value_check(option: Option) -> Callable[[str], str]:
    """argparse `type`: refuses text the field cannot hold, keeps the text (it becomes a `--set` override)."""

    def check(text: str) -> str:
        try:
            parse_value(text.strip(), option.hint, option.name)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text.strip()

    check.__name__ = type_name(option.hint)  # argparse names it in "invalid <type> value"
    return check


def flag_help(option: Option) -> str:
    """The field's documentation, then the option it sets and its default ('%' escaped for argparse)."""
    text = f"{option.help} [{option.name}; default: {option.shown_default}]"
    return text.replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, aliases: dict[str, str],
              options: dict[str, Option] | None = None) -> None:
    """Add one flag per `aliases` entry (flag -> dotted option), everything about it derived from the option.

    Bools become `--x/--no-x`; an unset flag leaves the attribute out of the namespace (argparse.SUPPRESS), so
    it never overrides a config file's or a resumed run's value.
    """
    options = options or train_options()
    for flag, name in aliases.items():
        if name not in options:
            raise KeyError(f"flag {flag} names '{name}', which is no config option")
        option = options[name]
        common = dict(dest=name, default=argparse.SUPPRESS, help=flag_help(option))
        if _base_hint(option.hint) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(flag, type=_value_check(option), choices=option.choices,
                                metavar=None if option.choices else _metavar(option), **common)


def flag_overrides(args: argparse.Namespace, aliases: dict[str, str]) -> list[str]:
    """The flags given on the command line as dotted `name=value` overrides, in the order of `aliases`."""
    given = vars(args)
    return [f"{name}={as_text(given[name])}" for name in aliases.values() if name in given]


def blame_flag(error: ConfigError, aliases: dict[str, str], args: argparse.Namespace) -> ConfigError:
    """A config error about an option that a given flag set, reworded to name the flag like argparse does."""
    given = vars(args)
    for flag, name in aliases.items():
        if name in given and re.match(rf"(option ')?{re.escape(name)}\b", str(error)):
            return ConfigError(f"argument {flag}: {error}")
    return error


# ----- listings ---------------------------------------------------------------------------------------------
def sections(options: dict[str, Option]) -> dict[str, list[Option]]:
    """Options grouped by section, in the tree's order ('' = top-level fields)."""
    grouped: dict[str, list[Option]] = {}
    for option in options.values():
        grouped.setdefault(option.section, []).append(option)
    return grouped


def _leaf(option: Option) -> str:
    return option.name[len(option.section) + 1:] if option.section else option.name


def options_epilog(options: dict[str, Option] | None = None, width: int = 110) -> str:
    """Every option grouped by section with its default, for `--help`."""
    lines = ["config options (any of them: --set SECTION.FIELD=VALUE; --list-options describes each):"]
    for section, group in sections(options or train_options()).items():
        if section == "plan":
            entries = [_leaf(o) for o in group]
            head = f"  plan (default: {PLAN_DEFAULT} value):"
        else:
            entries = [f"{_leaf(o)}={o.shown_default}" for o in group]
            head = f"  {section or '(top level)'}:"
        lines.append(textwrap.fill(" ".join(entries), width, initial_indent=head.ljust(14) + " ",
                                   subsequent_indent=" " * 15, break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines)


def describe_options(options: dict[str, Option] | None = None, width: int = 110) -> str:
    """Every option with its type, default, choices and documentation, for `--list-options`."""
    lines = []
    for section, group in sections(options or train_options()).items():
        lines.append(f"{section or '(top level)'}:")
        for option in group:
            choices = f", one of {', '.join(option.choices)}" if option.choices else ""
            head = f"{option.name} ({option.type_name}, default {option.shown_default}{choices})"
            lines.append(textwrap.fill(f"{head}: {option.help}", width, initial_indent="  ",
                                       subsequent_indent="      "))
    return "\n".join(lines)


class ListOptions(argparse.Action):
    """`--list-options`: print every config option and exit (like --help; no other argument is needed)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(describe_options())
        parser.exit()
