"""`voxseg verify MODEL`: check a model before it is used, and say where it came from.

MODEL is one of
- a model archive (.zip): installed into a temporary folder with every check `voxseg install` makes (digests,
  paths, sizes, weights against the plan), then checked as a model folder and removed;
- a model folder (a work directory, or one installed from an archive): each fold's weights file
  (model_TAG.safetensors) is parsed by safetensors and its tensors checked against the plan stored with it and
  the fold's plans.json; where the checkpoint it was written with is beside it, their SHA-256 digests must agree;
  an installed folder's files must match the digests of its voxseg_archive.json. With `write_weights`, folds that
  have only a checkpoint (trained before weights files existed) or a stale weights file get one written from
  their checkpoint;
- an nnU-Net v2 model folder: each fold's checkpoint is read as `voxseg predict -m` reads it (weights_only, an
  allowlist of plain types) and its weights mapped onto voxseg's network.

Each fold's provenance is reported: source (trained, nnunet-import, converted), date, voxseg version, epoch and
the training data's fingerprint digest. Problems are collected, and `VerifyReport.check()` raises one
CheckpointError listing them all.
"""
from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from voxseg.checkpoint import CHECKPOINT_CHOICES, checkpoint_to_weights
from voxseg.digest import sha256_file
from voxseg.errors import CheckpointError, ConfigError
from voxseg.infer.install import check_weights_file, install_archive
from voxseg.infer.nnunet import load_nnunet_fold
from voxseg.infer.nnunet_folder import CHECKPOINT_FILES, is_nnunet_model_folder, nnunet_folds
from voxseg.jsonio import read_json
from voxseg.weights import WEIGHTS_TAGS, WeightsFile, read_weights_header
from voxseg.workdir import FoldDir, WorkDir


@dataclass
class FoldReport:
    """One fold's checked weights: where they are, their epoch and provenance, and what was done."""

    fold: str
    checkpoint: str
    path: Path
    epoch: int
    provenance: dict = field(default_factory=dict)
    note: str = ""

    def line(self) -> str:
        origin = self.provenance
        parts = [f"fold {self.fold} {self.checkpoint}: {self.path.name}, epoch {self.epoch}"]
        if origin:
            parts.append(f"{origin.get('source', '?')} {origin.get('created', '?')} with voxseg "
                         f"{origin.get('voxseg_version', '?')}")
            if origin.get("source_file"):
                parts.append(f"from {origin['source_file']} (sha256 {str(origin.get('source_sha256', ''))[:12]})")
            fingerprint = origin.get("dataset_fingerprint_sha256")
            parts.append(f"data fingerprint {fingerprint[:12]}" if fingerprint else "no data fingerprint")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


@dataclass
class VerifyReport:
    """What `verify_model` checked and found."""

    model: Path
    kind: str
    folds: list[FoldReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{self.model}: {self.kind}"]
        lines += [f"  {fold.line()}" for fold in self.folds]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  PROBLEM: {problem}" for problem in self.problems]
        if not self.problems:
            lines.append(f"  ok: {len(self.folds)} weight file(s) checked")
        return "\n".join(lines)

    def check(self) -> VerifyReport:
        """Raise one CheckpointError naming every problem; the report itself when there is none."""
        if self.problems:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            raise CheckpointError(f"{self.model} failed verification ({len(self.problems)} problem(s)):\n{listed}")
        return self


def verify_model(model: str | Path, write_weights: bool = False) -> VerifyReport:
    """Check a model archive, model folder or nnU-Net model folder (module docstring); never raises for what
    it finds (see `VerifyReport.problems`), only for a MODEL that is none of these."""
    model = Path(model)
    if model.is_file():
        if not zipfile.is_zipfile(model):
            raise CheckpointError(f"{model} is neither a model archive (.zip) nor a model folder")
        if write_weights:
            raise ConfigError("--write-weights writes into a model folder, not into an archive")
        return _verify_archive(model)
    if not model.is_dir():
        raise CheckpointError(f"model {model} not found; give a model archive, a work directory or an nnU-Net "
                              "model folder")
    if is_nnunet_model_folder(model):
        return _verify_nnunet(model)
    if not WorkDir(model).plans.is_file():
        raise CheckpointError(f"{model} is not a model folder (no plans.json); give a model archive, a work "
                              "directory or an nnU-Net model folder")
    return _verify_folder(model, VerifyReport(model, "model folder"), write_weights)


def _verify_archive(zip_path: Path) -> VerifyReport:
    report = VerifyReport(zip_path, "model archive")
    with tempfile.TemporaryDirectory(prefix=".voxseg-verify-") as scratch:
        try:
            folder = install_archive(zip_path, Path(scratch) / "model")
        except CheckpointError as exc:
            report.problems.append(str(exc).replace("nothing was installed", "it would not install"))
            return report
        _verify_folder(folder, report, write_weights=False)
        report.notes = [note for note in report.notes if not note.startswith("installed ")]  # the scratch install
        manifest = read_json(WorkDir(folder).archive_manifest, CheckpointError)
        exported = manifest.get("exported") or {}
        report.notes.append(f"archive format {manifest['installed']['archive_version']}, exported "
                            f"{exported.get('date', '(date not recorded)')} with voxseg "
                            f"{exported.get('voxseg_version', '(before 0.1)')}; every member matches its SHA-256")
        converted = manifest["installed"].get("converted") or {}
        if converted:
            report.notes.append(f"{len(converted)} pickled checkpoint(s) of this older archive format are converted "
                                "to safetensors on install; re-export the model to ship weights files")
    for fold in report.folds:
        fold.path = Path(fold.path.name)  # the temporary folder is gone
    return report


def _verify_nnunet(folder: Path) -> VerifyReport:
    report = VerifyReport(folder, "nnU-Net v2 model folder (pickled checkpoints, read with weights_only)")
    for tag in CHECKPOINT_FILES:
        try:
            paths = nnunet_folds(folder, None, tag)
        except CheckpointError:
            continue
        for path in paths:
            try:
                load_nnunet_fold(folder, path)
            except (CheckpointError, ConfigError) as exc:
                report.problems.append(str(exc))
                continue
            report.folds.append(FoldReport(path.parent.name, tag, path, 0, {
                "source": "nnU-Net", "created": "?", "voxseg_version": "-", "source_file": path.name,
                "source_sha256": sha256_file(path)}))
    if not report.folds and not report.problems:
        report.problems.append(f"{folder}: no fold_F folder holds a checkpoint")
    report.notes.append(f"'voxseg import nnunet {folder} WORKDIR' converts the folds to safetensors once, so later "
                        "predictions never unpickle them")
    return report


def _verify_folder(folder: Path, report: VerifyReport, write_weights: bool) -> VerifyReport:
    work = WorkDir(folder)
    folds = list(work.numbered_folds().values()) + ([work.fold("all")] if work.fold("all").path.is_dir() else [])
    for fold in folds:
        for tag in CHECKPOINT_CHOICES:
            _verify_fold(work, fold, tag, report, write_weights)
    if not any(fold.has_model(tag) for fold in folds for tag in CHECKPOINT_CHOICES):
        report.problems.append(f"{work.training}: no fold holds weights (model_TAG.safetensors) or a checkpoint")
    if work.archive_manifest.is_file():
        _verify_manifest(work, report)
    return report


def _verify_fold(work: WorkDir, fold: FoldDir, tag: str, report: VerifyReport, write_weights: bool) -> None:
    weights_path, checkpoint = fold.weights(tag), fold.checkpoint(tag)
    note = ""
    if not weights_path.is_file():
        if not checkpoint.is_file() or tag not in WEIGHTS_TAGS:
            return
        if not write_weights:
            report.notes.append(f"fold {fold.fold} {tag}: only {checkpoint.name} (written before weights files "
                                f"existed; read with weights_only); 'voxseg verify {work.path} --write-weights' "
                                f"writes {weights_path.name}")
            return
        note = f"written now from {checkpoint.name}"
        _write_from(checkpoint, weights_path, fold, tag, work, report)
    try:
        weights = check_weights_file(work.path, work.member(weights_path))
    except (CheckpointError, ConfigError) as exc:
        report.problems.append(str(exc))
        return
    stale = _stale(weights, checkpoint)
    if stale and write_weights:
        _write_from(checkpoint, weights_path, fold, tag, work, report)
        weights, note = read_weights_header(weights_path), f"written again from {checkpoint.name} ({stale})"
    elif stale:
        report.problems.append(f"{weights_path}: {stale}; write it again with 'voxseg verify {work.path} "
                               "--write-weights'")
    elif weights.checkpoint and checkpoint.is_file() and not note:
        note = f"{checkpoint.name} matches"
    report.folds.append(FoldReport(fold.fold, tag, weights_path, weights.epoch, weights.provenance, note))


def _stale(weights: WeightsFile, checkpoint: Path) -> str | None:
    """Why the weights no longer belong to the checkpoint beside them (by SHA-256), None when they do."""
    recorded = weights.checkpoint
    if not recorded or not checkpoint.is_file():
        return None
    if sha256_file(checkpoint) != recorded.get("sha256"):
        return f"{checkpoint.name} changed after the weights were written from it (its SHA-256 differs)"
    return None


def _write_from(checkpoint: Path, weights_path: Path, fold: FoldDir, tag: str, work: WorkDir,
                report: VerifyReport) -> None:
    try:
        checkpoint_to_weights(checkpoint, weights_path, "converted", fold.fold, tag, work.path,
                              fallback_plan=work.plans)
    except (CheckpointError, ConfigError) as exc:
        report.problems.append(f"{checkpoint}: cannot write {weights_path.name} ({exc})")


def _verify_manifest(work: WorkDir, report: VerifyReport) -> None:
    """An installed folder's files against the digests recorded when it was installed."""
    try:
        manifest = read_json(work.archive_manifest, CheckpointError)
        files = manifest["files"]
        installed = manifest.get("installed") or {}
    except (KeyError, TypeError):
        report.problems.append(f"{work.archive_manifest} does not list the installed files; install the model again")
        return
    changed = []
    for name, entry in files.items():
        path = work.path / name
        if not path.is_file():
            changed.append(f"{name} (missing)")
        elif sha256_file(path) != str(entry.get("sha256", "")).lower():
            changed.append(f"{name} (SHA-256 differs)")
    if changed:
        report.problems.append(f"{work.path}: installed file(s) changed since the install: {', '.join(changed)}; "
                               "install the model again")
    elif installed:
        report.notes.append(f"installed {installed.get('date', '?')} from {installed.get('archive', '?')} "
                            f"(sha256 {str(installed.get('archive_sha256', ''))[:12]}); {len(files)} file(s) "
                            "match their SHA-256")
