"""Where each planned configuration lives in a work directory, and `--configuration NAME` resolved to it.

`voxseg plan` writes every configuration that applies (see `voxseg.data.plan.make_plans`):

    WORKDIR/plans.json                      the default configuration (3d_fullres; 2d when it is the only one)
    WORKDIR/configurations.json             the index: names, the default, each one's folder, cascade stages
    WORKDIR/configs/NAME/plans.json         every other configuration: a normal voxseg plan, with its own
    WORKDIR/configs/NAME/preprocessed/      preprocessed cases and training/fold_F/ once they are made
    WORKDIR/configs/NAME/training/

A configuration folder is a work directory of its own (every command works on it unchanged), with copies of
fingerprint.json and dataset.json; it has no splits.json: `voxseg.data.splits.load_splits` reads the parent's,
so every configuration is trained and cross-validated on the same folds. A work directory planned before
configurations existed (no index) holds its one plan, named by the plan's `configuration` field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from voxseg.errors import ConfigError
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.plans import Plan
from voxseg.registry import unknown_name_message
from voxseg.workdir import WorkDir

CONFIGURATION_ORDER = ("3d_fullres", "2d", "3d_lowres", "3d_cascade_fullres")

__all__ = ["config_workdir", "configuration_entry", "describe_configurations", "load_index", "next_stage",
           "parent_workdir", "stage_workdir", "write_index"]


def configuration_entry(name: str, default: str, previous_stage: str | None = None,
                        next_stage: str | None = None) -> dict[str, Any]:
    """The index entry of one configuration: its folder relative to the work directory, cascade links."""
    root = WorkDir(".")
    entry: dict[str, Any] = {"path": "." if name == default else root.member(root.configuration(name).path)}
    if previous_stage:
        entry["previous_stage"] = previous_stage
    if next_stage:
        entry["next_stage"] = next_stage
    return entry


def write_index(workdir: str | Path, default: str, entries: dict[str, dict[str, Any]]) -> Path:
    """Write WORKDIR/configurations.json atomically; returns its path."""
    path = WorkDir(workdir).configurations
    write_json_atomic(path, {"default": default, "configurations": entries})
    return path


def load_index(workdir: str | Path) -> dict[str, Any]:
    """The configuration index of a work directory: {"default": NAME, "configurations": {NAME: entry}}.

    Without configurations.json (a work directory planned before there were several configurations) the one
    plan in WORKDIR/plans.json is the default, named by its `configuration` field (3d_fullres if absent).
    """
    workdir = Path(workdir)
    path = WorkDir(workdir).configurations
    if path.is_file():
        index = read_json(path, ConfigError, invalid="fix it or re-run 'voxseg plan'")
        if not isinstance(index, dict) or not isinstance(index.get("configurations"), dict) or \
                index.get("default") not in index["configurations"]:
            raise ConfigError(f"{path}: expected {{\"default\": NAME, \"configurations\": "
                              "{NAME: {\"path\": ...}}} with the default among the configurations; re-run "
                              "'voxseg plan'")
        return index
    plan = read_json(WorkDir(workdir).plans, ConfigError, missing=f"run 'voxseg plan DATASET -o {workdir}' first",
                     invalid="fix it or re-run 'voxseg plan'")
    name = str(plan.get("configuration", "3d_fullres")) if isinstance(plan, dict) else "3d_fullres"
    return {"default": name, "configurations": {name: {"path": "."}}}


def config_workdir(workdir: str | Path, name: str | None = None) -> Path:
    """The work directory of configuration `name` (None: the default, WORKDIR itself).

    Example: config_workdir("work/brats", "2d") -> work/brats/configs/2d; config_workdir("work/brats",
    "3d_fullres") -> work/brats.

    Raises:
        ConfigError: `name` is not a planned configuration (the message lists those planned).
    """
    workdir = Path(workdir)
    if name is None:
        return workdir
    configurations = load_index(workdir)["configurations"]
    if name not in configurations:
        planned = sorted(configurations, key=lambda n: (CONFIGURATION_ORDER + (n,)).index(n))
        raise ConfigError(f"{workdir}: " + unknown_name_message("configuration", name, planned)
                          + f". These are the configurations planned for this dataset ('voxseg plan DATASET -o "
                          f"{workdir}' plans every one that applies; --2d plans only 2d)")
    folder = workdir / str(configurations[name].get("path", "."))
    if not WorkDir(folder).plans.is_file():
        raise ConfigError(f"configuration '{name}': {WorkDir(folder).plans} is missing; re-run 'voxseg plan'")
    return folder


def parent_workdir(workdir: str | Path) -> Path | None:
    """The work directory a configuration folder WORKDIR/configs/NAME belongs to, or None for any other."""
    parent = WorkDir(workdir).parent
    return parent.path if parent is not None else None


def stage_workdir(workdir: str | Path, name: str) -> Path:
    """The work directory of configuration `name` of the same dataset as `workdir`, which may be the parent
    work directory or one of its configuration folders (a cascade stage finds its first stage this way).

    Raises:
        ConfigError: `name` is not planned for this dataset.
    """
    return config_workdir(parent_workdir(workdir) or Path(workdir), name)


def next_stage(workdir: str | Path, name: str) -> str | None:
    """The cascade stage that takes configuration `name`'s predictions ("3d_cascade_fullres" for "3d_lowres"),
    from the index of `workdir`'s dataset, or None."""
    root = parent_workdir(workdir) or Path(workdir)
    if not WorkDir(root).configurations.is_file():
        return None
    entry = load_index(root)["configurations"].get(name, {})
    return entry.get("next_stage") if isinstance(entry, dict) else None


def describe_configurations(workdir: str | Path) -> str:
    """One line per planned configuration of a work directory: name, folder, patch x batch, spacing."""
    index = load_index(workdir)
    lines = []
    for name, entry in index["configurations"].items():
        plan = Plan.load(WorkDir(config_workdir(workdir, name)).plans)
        role = " (default)" if name == index["default"] else ""
        stage = f", cascade after {plan.previous_stage}" if plan.previous_stage else ""
        axis = f", slices along axis {plan.slice_axis}" if plan.network.ndim == 2 else ""
        lines.append(f"{name:<19} {entry['path']:<26} patch {_fmt(plan.patch_size)} x {plan.batch_size}, "
                     f"spacing {_fmt(plan.target_spacing)} mm{axis}{stage}{role}")
    return "\n".join(lines)


def _fmt(values: Any) -> str:
    return "x".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)
