"""Config fields are documented one way: a string literal right under each field, which `voxseg.cli.derive`
reads into `--help`, `--list-options` and docs/TRAINING.md. An "Attributes:" section in a config class's
docstring would be a second style that nothing reads, so it fails here too."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import voxseg
from voxseg.cli.derive import field_docs

PACKAGE = Path(voxseg.__file__).parent
# the plan schema and the loss terms' options are config too, though not named *Config
CONFIG_CLASSES = {"Plan", "NetworkPlan", "ChannelNormalization", "TermOptions"}


def _is_dataclass(node: ast.ClassDef) -> bool:
    def name(decorator: ast.expr) -> str:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")

    return any(name(d) == "dataclass" for d in node.decorator_list)


def _config_classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.ClassDef) and _is_dataclass(node)
                    and (node.name.endswith("Config") or node.name in CONFIG_CLASSES)):
                found.append((f"{path.relative_to(PACKAGE.parent)}:{node.name}", node))
    return found


def _undocumented(node: ast.ClassDef) -> list[str]:
    body = node.body
    missing = []
    for index, item in enumerate(body):
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        after = body[index + 1] if index + 1 < len(body) else None
        documented = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                      and isinstance(after.value.value, str) and after.value.value.strip())
        if not documented:
            missing.append(item.target.id)
    return missing


CLASSES = _config_classes()


def test_the_config_classes_are_found() -> None:
    names = {node.name for _, node in CLASSES}
    assert {"TrainConfig", "OptimConfig", "ScheduleConfig", "LossConfig", "DataConfig", "LoopConfig",
            "LoggingConfig", "AugmentConfig"} | CONFIG_CLASSES <= names


@pytest.mark.parametrize("where, node", CLASSES, ids=[where for where, _ in CLASSES])
def test_every_config_field_has_a_string_under_it(where: str, node: ast.ClassDef) -> None:
    assert not _undocumented(node), f"{where}: document these fields with a string right under each"
    docstring = ast.get_docstring(node) or ""
    assert "Attributes:" not in docstring, f"{where}: move the 'Attributes:' entries under their fields"


def test_field_docs_reads_the_string_under_each_field() -> None:
    @dataclasses.dataclass
    class Documented:
        """Settings.

        Attributes:
            alpha: not read: the one style is a string under the field.
        """

        alpha: int = 1
        beta: float = 0.5
        """Under the field:
        two lines."""

    assert field_docs(Documented) == {"beta": "Under the field: two lines."}
    from voxseg.augment import AugmentConfig
    from voxseg.plans import Plan

    docs = field_docs(AugmentConfig)
    assert docs["rot90_p"].startswith("Probability of 1-3 quarter turns")
    assert set(docs) == {f.name for f in dataclasses.fields(AugmentConfig)}
    assert set(field_docs(Plan)) == {f.name for f in dataclasses.fields(Plan)}
