"""Choosing what to predict with: every trained configuration and every pair ensemble, ranked by
cross-validation Dice (`voxseg evaluate --crossval WORKDIR --configurations all` calls `choose_configuration`).

For each configuration the validation predictions of all folds (training/fold_F/validation/, written by full
validation) are scored together, as `voxseg evaluate --crossval` does for one: the foreground-mean Dice over
every validation case of every fold. Every configuration must have validated the same folds with the same cases
(the parent's splits.json, shared by every configuration): otherwise the scores would not be comparable and
the comparison is refused.

A pair ensemble averages the two configurations' probabilities of each validation case on the original grid
(validation/CASE.npz, written when training ran with `--set loop.save_val_probabilities=true`) and takes the
labels from the mean, exactly as `voxseg predict` does with an ensemble (`voxseg.infer.ensemble`); its label
maps go to WORKDIR/ensembles/A+B/ and are scored the same way. A pair without probabilities is left out and
named (with the command that writes them).

The best entry wins; within 1e-6 of the best Dice the simpler one (a single configuration before an ensemble,
then the order of configurations.json) does. Largest-component postprocessing is decided on the winner's
cross-validation predictions only, and everything goes atomically to WORKDIR/inference_choice.json.

Example:
    >>> choice = choose_configuration("work/brats", "all")
    >>> choice["choice"], [(entry["name"], entry["dice"]) for entry in choice["compared"]]
"""
from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from voxseg.checkpoint import same_checkpoint
from voxseg.data.configs import config_workdir, load_index
from voxseg.data.io import read_image, write_image
from voxseg.data.splits import load_splits
from voxseg.errors import ConfigError, InputError
from voxseg.evaluate import EvaluationSettings
from voxseg.evaluate.workdir import aggregate_folds, crossval_dir, evaluate_workdir_predictions
from voxseg.infer.ensemble import average_probabilities
from voxseg.infer.postprocess import decide_postprocessing, probabilities_to_labels, probability_names
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.plans import Plan
from voxseg.workdir import FoldDir, WorkDir

_TIE = 1e-6  # a more complex entry must beat a simpler one by more than this


def choose_configuration(workdir: str | Path, configurations: str | Sequence[str] = "all",
                         settings: EvaluationSettings | None = None, **options: Any) -> dict[str, Any]:
    """Rank the configurations and their pair ensembles by cross-validation Dice and save the choice.

    Args:
        workdir: the work directory (WORKDIR/configurations.json lists its configurations).
        configurations: "all" (every configuration whose folds are all validated; the others are skipped and
            named) or the names to compare (each must have every fold validated).
        settings, options: how to score, as for `voxseg.crossval.folds.evaluate_crossval`.

    Returns:
        what WORKDIR/inference_choice.json holds: folds, compared (ranked, best first), skipped, choice,
        postprocessing.

    Raises:
        ConfigError: an unknown configuration, a named configuration with folds missing, no configuration
            with every fold, or configurations validated on different folds or cases.
    """
    workdir = Path(workdir)
    settings = EvaluationSettings.build(settings, **options)
    folds, names, skipped = _comparable(workdir, configurations)
    dirs = {name: config_workdir(workdir, name) for name in names}
    entries = []
    for name in names:
        summary = aggregate_folds(dirs[name], folds=folds, settings=settings)
        entries.append(_entry(name, "configuration", [name], summary, crossval_dir(dirs[name])))
    for first, second in combinations(names, 2):
        missing = [n for n in (first, second) if not _has_probabilities(dirs[n], folds)]
        if missing:
            skipped[f"{first}+{second}"] = (
                f"no validation probabilities for {', '.join(missing)}: re-validate each fold's final weights with "
                f"them ('voxseg train {workdir} --configuration {missing[0]} --fold F --test-only --checkpoint final "
                f"--set loop.save_val_probabilities=true', into training/fold_F/validation_final/)")
            continue
        out_dir = WorkDir(workdir).ensemble(f"{first}+{second}")
        summary = _score_ensemble([dirs[first], dirs[second]], folds, out_dir, settings)
        entries.append(_entry(f"{first}+{second}", "ensemble", [first, second], summary, out_dir))
    order = {name: i for i, name in enumerate(names)}
    entries.sort(key=lambda e: (-_score(e), e["kind"] == "ensemble", [order[n] for n in e["configurations"]]))
    best = max(_score(e) for e in entries)
    winner = next(e for e in sorted(entries, key=lambda e: (e["kind"] == "ensemble",
                                                            [order[n] for n in e["configurations"]]))
                  if _score(e) >= best - _TIE)
    postprocessing = _decide_postprocessing(winner, WorkDir(workdir), dirs[winner["configurations"][0]],
                                            settings.num_workers)
    choice = {
        "folds": folds, "compared": [{k: v for k, v in e.items() if k != "folder"} for e in entries],
        "skipped": skipped,
        "choice": {k: winner[k] for k in ("name", "kind", "configurations", "dice")},
        "postprocessing": postprocessing, "convention": settings.convention, "tolerance_mm": settings.tolerance_mm,
    }
    write_json_atomic(WorkDir(workdir).inference_choice, choice)
    return choice


def format_choice(choice: dict[str, Any]) -> str:
    """The ranking as a table, best first, with the choice marked."""
    lines = [f"{'configuration / ensemble':<36} {'cross-validation Dice':>22}"]
    for entry in choice["compared"]:
        dice = "nan" if entry["dice"] is None else f"{entry['dice']:.4f}"
        mark = "  <- chosen" if entry["name"] == choice["choice"]["name"] else ""
        lines.append(f"{entry['name']:<36} {dice:>22}{mark}")
    for name, reason in choice["skipped"].items():
        lines.append(f"{name:<36} {'not compared':>22}  ({reason})")
    return "\n".join(lines)


# ----- what can be compared -------------------------------------------------------------------------------------
def _validated(workdir: Path, fold: int, ending: str) -> set[str]:
    folder = WorkDir(workdir).fold(fold).validation
    files = folder.glob(f"*{ending}") if folder.is_dir() else []
    return {p.name[: -len(ending)] for p in files if not p.name.startswith(".")}


def _comparable(workdir: Path, configurations: str | Sequence[str]) -> tuple[list[int], list[str], dict[str, str]]:
    """(folds, configurations to compare, {skipped configuration: why}); refuses what cannot be compared."""
    planned = list(load_index(workdir)["configurations"])
    splits = load_splits(workdir)
    folds = list(range(len(splits)))
    asked = planned if configurations == "all" else list(configurations)
    for name in asked:
        config_workdir(workdir, name)  # an unknown name is refused with the planned ones listed
    names, skipped, incomplete = [], {}, []
    for name in asked:
        folder = config_workdir(workdir, name)
        ending = Plan.load(WorkDir(folder).plans).file_ending
        if load_splits(folder) != splits:
            raise ConfigError(f"configuration '{name}': {WorkDir(folder).splits} differs from "
                              f"{WorkDir(workdir).splits}; configurations are compared on the same folds only: delete "
                              f"it and re-train, or leave '{name}' out of --configurations")
        missing = [f for f in folds if not _validated(folder, f, ending)]
        if missing:
            why = f"fold(s) {', '.join(map(str, missing))} of {len(folds)} have no validation predictions"
            incomplete.append(f"{name}: {why}")
            skipped[name] = why
            continue
        for fold in folds:
            found, expected = _validated(folder, fold, ending), set(splits[fold]["val"])
            if found != expected:
                diff = sorted(found ^ expected)
                raise ConfigError(
                    f"configuration '{name}' fold {fold}: its validation predictions ({len(found)} cases) are not "
                    f"the fold's validation cases in splits.json ({len(expected)}; differing: "
                    f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}), so it was validated on other folds; "
                    f"re-validate it ('voxseg train {workdir} --configuration {name} --fold {fold} --test-only "
                    "--checkpoint final')")
        names.append(name)
    hint = f"train them first ('voxseg train {workdir} --configuration NAME --fold F' for every fold)"
    if configurations != "all" and incomplete:
        raise ConfigError("cannot compare configurations with folds missing: " + "; ".join(incomplete) + "; " + hint)
    if not names:
        raise ConfigError(f"{workdir}: no configuration has all {len(folds)} folds validated ("
                          + "; ".join(incomplete) + "); " + hint)
    return folds, names, skipped


def _probabilities_dir(workdir: Path, fold: int, ending: str) -> Path | None:
    """Where fold `fold`'s validation probabilities of the final weights are: validation/ when the run's final
    validation wrote them, else validation_final/ (`--test-only --checkpoint final --set
    loop.save_val_probabilities=true`) while checkpoint_final.pt is the file it validated; None without them."""
    cases = _validated(workdir, fold, ending)
    fold_files = WorkDir(workdir).fold(fold)
    for folder in (fold_files.validation, fold_files.checkpoint_validation("final")):
        if folder != fold_files.validation and not _validates_final_weights(fold_files):
            continue
        if cases and all((folder / f"{name}.npz").is_file() and (folder / f"{name}{ending}").is_file()
                         for name in cases):
            return folder
    return None


def _validates_final_weights(fold_files: FoldDir) -> bool:
    """Whether validation_final/ is of the checkpoint_final.pt the fold holds now."""
    identity = fold_files.validated_checkpoint("final")
    return identity.is_file() and same_checkpoint(read_json(identity, InputError), fold_files.checkpoint("final"))


def _has_probabilities(workdir: Path, folds: list[int]) -> bool:
    ending = Plan.load(WorkDir(workdir).plans).file_ending
    return all(_probabilities_dir(workdir, f, ending) is not None for f in folds)


# ----- scores -------------------------------------------------------------------------------------------------
def _entry(name: str, kind: str, configurations: list[str], summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    dice = (summary.get("foreground_mean") or {}).get("dice")
    return {"name": name, "kind": kind, "configurations": configurations,
            "dice": None if dice is None or not math.isfinite(dice) else float(dice),
            "num_cases": summary["counts"]["cases"], "folder": str(folder)}


def _score(entry: dict[str, Any]) -> float:
    return -math.inf if entry["dice"] is None else entry["dice"]


def _score_ensemble(workdirs: list[Path], folds: list[int], out_dir: Path,
                    settings: EvaluationSettings) -> dict[str, Any]:
    """Write the ensemble's label map of every validation case into `out_dir` and evaluate them."""
    plan = Plan.load(WorkDir(workdirs[0]).plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"*{plan.file_ending}"):  # an earlier comparison may have used other folds
        stale.unlink()
    for fold in folds:
        for name in sorted(_validated(workdirs[0], fold, plan.file_ending)):
            _write_ensemble_case(workdirs, fold, name, plan, out_dir)
    return evaluate_workdir_predictions(out_dir, workdirs[0], folds, settings)


def _write_ensemble_case(workdirs: list[Path], fold: int, name: str, plan: Plan, out_dir: Path) -> None:
    members = []
    for folder in workdirs:
        validation = _probabilities_dir(folder, fold, plan.file_ending)
        labels, geometry = read_image(validation / f"{name}{plan.file_ending}")
        with np.load(validation / f"{name}.npz") as saved:
            probabilities, classes = saved["probabilities"], [str(c) for c in saved["class_names"]]
        if classes != probability_names(plan) or probabilities.shape[1:] != labels.shape:
            raise InputError(f"{validation / name}.npz: probabilities of classes {classes}, shape "
                             f"{list(probabilities.shape)}, do not match {probability_names(plan)} on the label map's "
                             f"grid {list(labels.shape)}; re-validate the fold with loop.save_val_probabilities=true")
        members.append(probabilities)
    mean = average_probabilities(members)  # (K, D, H, W) on the raw grid
    write_image(out_dir / f"{name}{plan.file_ending}", probabilities_to_labels(torch.from_numpy(mean), plan).numpy(),
                geometry)


def _decide_postprocessing(winner: dict[str, Any], workdir: WorkDir, first: Path, num_workers: int) -> dict[str, Any]:
    """Largest-component postprocessing decided on the winner's cross-validation label maps; a single
    configuration's decision is also its postprocessing.json (as `voxseg evaluate --crossval` writes it)."""
    plan = Plan.load(WorkDir(first).plans)
    folder = Path(winner["folder"])
    if winner["kind"] == "configuration":
        out_file = WorkDir(first).postprocessing
    else:  # an ensemble's decision lives beside its predictions (WORKDIR/ensembles/A+B/)
        out_file = workdir.ensemble_postprocessing(winner["name"])
    return decide_postprocessing(folder, Path(plan.raw_dataset) / "labelsTr", plan.regions,
                                 file_ending=plan.file_ending, out_file=out_file, num_workers=num_workers)
