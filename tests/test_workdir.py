"""The work directory's layout has one home, voxseg/workdir.py: the names it gives, the guard that no other module
spells a path of the layout, and its docstring tree = the one in docs/ARCHITECTURE.md."""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

from voxseg import workdir as workdir_module
from voxseg.workdir import FoldDir, WorkDir, checkpoint_tag

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "voxseg"
HOME = PACKAGE / "workdir.py"

# Path components of the work-directory layout. "dataset.json" is left out on purpose: the raw dataset and an
# nnU-Net model folder have a file of that name too (their layouts live in voxseg/data/dataset.py and
# voxseg/infer/nnunet_folder.py); the work directory's copy is `WorkDir.dataset_json`.
LAYOUT_NAMES = (
    "training", "validation", "preprocessed", "configs", "crossval", "postprocessed", "ensembles", "tensorboard",
    "predicted_next_stage", "plans.json", "splits.json", "config.json", "postprocessing.json",
    "inference_choice.json", "configurations.json", "fingerprint.json", "log.jsonl", "progress.png",
    "checkpoint.json", "model.onnx", "nnunet_source.json", "benchmark.json", "estimate.json", "voxseg_archive.json",
)
LAYOUT_PATTERNS = (
    r"fold_(\{\}|\*|\d+|all)?",  # fold_F, fold_*, the prefix itself
    r"checkpoint_.*(\.pt|\.pth|\{\}|\*)|checkpoint_",  # checkpoint_{tag}.pt, checkpoint_*.pt, the prefix
    r"validation_(\{\}|\*|final|best|latest)",  # validation_{tag}/
    r"model_.*\.safetensors|\.safetensors",  # model_{tag}.safetensors, the suffix
)
# (module, literal) -> why it may spell a layout name. Each entry must still be used (see the test).
ALLOWED = {
    ("infer/nnunet_folder.py", "plans.json"): "an nnU-Net v2 model folder's own layout, not a voxseg work directory",
    ("infer/nnunet_folder.py", "fold_"): "an nnU-Net v2 model folder's own layout",
    ("infer/nnunet_folder.py", "validation"): "an nnU-Net v2 model folder's own layout",
    ("infer/nnunet_folder.py", "checkpoint_final.pth"): "an nnU-Net v2 model folder's own layout",
    ("infer/nnunet_folder.py", "checkpoint_best.pth"): "an nnU-Net v2 model folder's own layout",
    ("plans.py", "plans.json"): "the schema's name in messages about a plan's fields, wherever it was read from",
    ("data/convert.py", "training"): "the key of an MSD dataset.json that lists its training cases",
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for statement in node.body:
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                    found.add(id(statement.value))
    return found


def _keys(tree: ast.AST) -> set[int]:
    """Dict keys and subscripts (`record["training"]`): keys of JSON records, not paths; and `__all__` lists."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            found.update(id(key) for key in node.keys if key is not None)
        elif isinstance(node, ast.Subscript):
            found.add(id(node.slice))
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            found.update(id(element) for element in ast.walk(node.value))
    return found


def string_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in code, docstrings, dict keys and subscripts left out; an f-string's
    values read as {}."""
    tree = ast.parse(source)
    skipped, parts, found = _docstrings(tree) | _keys(tree), set(), []
    for node in ast.walk(tree):
        if id(node) in skipped or id(node) in parts:
            continue
        if isinstance(node, ast.JoinedStr):
            parts.update(id(value) for value in node.values)
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            found.append((node.lineno, node.col_offset, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.col_offset, node.value))
    return [(line, text) for line, _, text in sorted(found)]


def is_layout_path(text: str) -> bool:
    """Whether a string names a part of the work-directory layout: one of its path components is a layout
    name. Prose (with spaces) is a message or help text, never a path built in code."""
    if re.search(r"\s", text):
        return False
    return any(part in LAYOUT_NAMES or any(re.fullmatch(p, part) for p in LAYOUT_PATTERNS)
               for part in text.split("/"))


def layout_literals() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HOME:
            continue
        module = path.relative_to(PACKAGE).as_posix()
        found += [(module, line, text) for line, text in string_literals(path.read_text())
                  if is_layout_path(text)]
    return found


def test_no_module_but_workdir_spells_a_path_of_the_layout():
    stray = [f"voxseg/{module}:{line}: {text!r}" for module, line, text in layout_literals()
             if (module, text) not in ALLOWED]
    assert not stray, ("paths of the work directory come from voxseg.workdir.WorkDir / FoldDir (add a property "
                       "there), not from literals:\n" + "\n".join(stray))


def test_every_allowance_is_still_needed():
    used = {(module, text) for module, _, text in layout_literals()}
    assert set(ALLOWED) <= used, f"remove stale entries from ALLOWED: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize("text, layout", [
    ("training", True), ("fold_{}", True), ("{}/checkpoint_{}.pt", True), ("checkpoint_*.pt", True),
    ("validation_{}", True), ("training/fold_*/checkpoint_*.pt", True), ("plans.json", True),
    ("validation_dir", False), ("load_fold_network", False), ("1_fold_no_tta_s", False),
    ("logging.tensorboard=false", False), ("run 'voxseg plan' to write plans.json", False),
    ("voxseg_postprocessing.json", False), ("--crossval", False),
])
def test_the_guard_tells_layout_paths_from_other_strings(text, layout):
    assert is_layout_path(text) is layout


def test_the_guard_reads_code_not_prose():
    source = textwrap.dedent('''
        """Writes training/fold_F/plans.json."""
        def f(workdir, record):
            """Reads WORKDIR/training."""
            record["training"] = {"validation": 1}  # keys of a JSON record
            return workdir / "training" / f"fold_{record}"
    ''')
    assert [text for _, text in string_literals(source) if is_layout_path(text)] == ["training", "fold_{}"]


def test_the_layout_keeps_its_names():
    """The files and folders voxseg reads and writes (changing one breaks every existing work directory)."""
    work = WorkDir("w")
    fold = work.fold(0)
    assert [str(p) for p in (work.dataset_json, work.fingerprint, work.plans, work.splits, work.configurations,
                             work.configuration("2d").plans, work.preprocessed, work.training, work.crossval,
                             work.crossval_summary, work.crossval_postprocessed, work.postprocessing,
                             work.inference_choice, work.ensemble("a+b"), work.ensemble_postprocessing("a+b"),
                             work.next_stage_predictions("3d_cascade_fullres"), work.nnunet_source,
                             work.benchmark, work.estimate)] == [
        "w/dataset.json", "w/fingerprint.json", "w/plans.json", "w/splits.json", "w/configurations.json",
        "w/configs/2d/plans.json", "w/preprocessed", "w/training", "w/training/crossval",
        "w/training/crossval/summary.json", "w/training/crossval/postprocessed", "w/postprocessing.json",
        "w/inference_choice.json", "w/ensembles/a+b", "w/ensembles/a+b/postprocessing.json",
        "w/predicted_next_stage/3d_cascade_fullres", "w/nnunet_source.json", "w/benchmark.json", "w/estimate.json"]
    assert [str(p) for p in (fold.path, fold.plans, fold.config, fold.checkpoint("final"), fold.snapshot(7),
                             fold.log, fold.progress_plot, fold.tensorboard, fold.validation,
                             fold.checkpoint_validation("best"), fold.validated_checkpoint("best"), fold.onnx)] == [
        "w/training/fold_0", "w/training/fold_0/plans.json", "w/training/fold_0/config.json",
        "w/training/fold_0/checkpoint_final.pt", "w/training/fold_0/checkpoint_epoch_7.pt",
        "w/training/fold_0/log.jsonl", "w/training/fold_0/progress.png", "w/training/fold_0/tensorboard",
        "w/training/fold_0/validation", "w/training/fold_0/validation_best",
        "w/training/fold_0/validation_best/checkpoint.json", "w/training/fold_0/model.onnx"]
    assert work.fold("3") == work.fold(3) and work.fold("all").path.name == "fold_all"
    assert WorkDir(work) == work and FoldDir(fold) == fold and WorkDir(Path("w")) == work


def test_a_fold_folder_knows_its_work_directory_and_checkpoints(tmp_path):
    fold = WorkDir(tmp_path).fold(2)
    assert fold.in_workdir and fold.fold == "2" and fold.workdir == WorkDir(tmp_path)
    assert not FoldDir(tmp_path / "elsewhere").in_workdir
    assert fold.run_files() == [] and not WorkDir(tmp_path).has_checkpoints()
    fold.path.mkdir(parents=True)
    for epoch in (10, 2):
        fold.snapshot(epoch).write_bytes(b"")
    fold.checkpoint("latest").write_bytes(b"")
    fold.log.write_text("")
    assert fold.snapshots() == [fold.snapshot(2), fold.snapshot(10)]  # by epoch, not by name
    assert [checkpoint_tag(p) for p in fold.checkpoints()] == ["epoch_10", "epoch_2", "latest"]
    assert fold.run_files() == sorted([fold.snapshot(2), fold.snapshot(10), fold.checkpoint("latest"), fold.log])
    assert WorkDir(tmp_path).has_checkpoints() and WorkDir(tmp_path).numbered_folds() == {2: fold}
    assert checkpoint_tag("model.pt") is None and checkpoint_tag(fold.config) is None


def test_a_configuration_folder_knows_its_parent(tmp_path):
    work = WorkDir(tmp_path)
    second = work.configuration("2d")
    assert second.parent is None  # no configurations.json: not a planned configuration folder
    work.configurations.write_text("{}")
    assert second.parent == work and work.parent is None
    assert work.member(second.plans) == "configs/2d/plans.json"


def _tree(text: str) -> str:
    """The first fenced block of `text` that starts with WORKDIR/, dedented, trailing spaces dropped."""
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        block = textwrap.dedent(block)
        if block.startswith("WORKDIR/"):
            return "\n".join(line.rstrip() for line in block.splitlines())
    raise AssertionError("no WORKDIR/ tree found")


def test_the_docstring_tree_is_the_architecture_pages_tree():
    documented = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = documented.split("## Work directory", 1)[1]
    assert _tree(section) == _tree(workdir_module.__doc__), (
        "docs/ARCHITECTURE.md's work-directory tree and voxseg/workdir.py's docstring must be the same tree")


# what the objects offer besides the paths of the tree: navigation, listings, names
NOT_PATHS = {"path", "in_workdir", "fold", "workdir", "parent", "numbered_folds", "checkpoints", "snapshots",
             "run_files", "member", "has_checkpoints", "snapshot_tag", "has_model", "weight_files"}


@pytest.mark.parametrize("cls", [WorkDir, FoldDir])
def test_every_path_the_objects_give_is_in_the_tree(cls):
    tree = _tree(workdir_module.__doc__)
    names = {name for name in vars(cls) if not name.startswith("_")} - NOT_PATHS
    missing = sorted(name for name in names if not re.search(rf"\.{name}\b", tree))
    assert not missing, f"{cls.__name__}: {missing} are paths of the layout missing from the docstring tree"
