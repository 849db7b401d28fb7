"""Parts talk through public names: no module imports another part's private (underscore) name, cross-validation
scores through `voxseg.evaluate`'s public interface, and the residual block schedule has one home beside the
network plan."""
from __future__ import annotations

import ast
from pathlib import Path

import voxseg

PACKAGE = Path(voxseg.__file__).parent


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        trees[name] = ast.parse(path.read_text(encoding="utf-8"))
    return trees


def _part(module: str) -> str:
    """voxseg.evaluate.folder -> evaluate; voxseg.plans -> plans; voxseg -> voxseg."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def _imported_names(tree: ast.Module) -> list[tuple[str, str]]:
    """(module, name) of every `from voxseg... import name`, also inside functions."""
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "voxseg"
            for alias in node.names]


def test_no_module_imports_a_private_name_of_another_part() -> None:
    crossings = [f"{module} imports {name} from {source}"
                 for module, tree in _modules().items() for source, name in _imported_names(tree)
                 if name.startswith("_") and not name.startswith("__") and _part(source) != _part(module)]
    assert not crossings, "give the owning part a public function instead: " + "; ".join(crossings)


def test_crossval_scores_through_the_public_interface_of_evaluate() -> None:
    import voxseg.evaluate

    crossval = {name: tree for name, tree in _modules().items() if _part(name) == "crossval" and name != "voxseg"}
    assert {"voxseg.crossval", "voxseg.crossval.folds", "voxseg.crossval.choice"} <= set(crossval)
    for module, tree in crossval.items():
        for source, name in _imported_names(tree):
            if _part(source) == "evaluate":
                assert name in voxseg.evaluate.__all__, f"{module} imports {source}.{name}, not in voxseg.evaluate"


def test_the_crossval_part_is_the_public_path() -> None:
    from voxseg.crossval import CrossvalResult, choose_configuration, describe_crossval, evaluate_crossval

    assert voxseg.evaluate_crossval is evaluate_crossval and voxseg.choose_configuration is choose_configuration
    assert callable(describe_crossval) and CrossvalResult._fields[0] == "summary"
    for gone in ("crossval.py", "choice.py", "stages.py"):  # moved into voxseg/crossval/ and the network plan
        assert not (PACKAGE / gone).exists(), gone


def test_the_residual_block_schedule_is_defined_once() -> None:
    from voxseg.network_plan import NetworkPlan, default_blocks_per_stage
    from voxseg.plans import NetworkPlan as PlanNetwork

    homes = [module for module, tree in _modules().items() for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef) and node.name == "default_blocks_per_stage"]
    assert homes == ["voxseg.network_plan"]
    assert PlanNetwork is NetworkPlan  # the plan schema's network section, one class
    assert default_blocks_per_stage(8) == [1, 3, 4, 6, 6, 6, 6, 6] and default_blocks_per_stage(2) == [1, 3]
