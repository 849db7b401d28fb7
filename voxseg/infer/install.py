"""Installing a model archive into a model folder: checked, limited, verified, and swapped in as a whole.

An archive's manifest (`voxseg_archive.json`) lists every member with its SHA-256 and size. `install_archive`
installs only what the manifest lists, and before anything reaches the target folder it:
- refuses absolute paths, "..", links, unexpected file types and anything that would land outside the target;
- refuses archives whose members add up to more than `max_total_bytes`, a member larger than
  `max_member_bytes`, or a member (over 1 MiB) that inflates more than `max_compression_ratio` times
  (a zip bomb), and checks the free disk space;
- unpacks into a staging folder next to the target, counting the bytes actually inflated (zip headers can lie),
  and verifies every digest;
- reads each weights file's header with safetensors (no pickle: bounded header, offsets checked against the
  file) and checks its tensor table against the network of the plan stored with it and of the fold's
  plans.json: a plan that disagrees with the weights is refused;
- converts the checkpoints of an archive written before weights files existed (format version 2, pickled
  `checkpoint_TAG.pt`, read with `weights_only=True` on a safe torch) into weights files, and installs those;
- test-loads ONNX files with the onnx package when it is installed (an ONNX file that points at external data
  files, which could be read from anywhere, is refused); next to each ONNX file it writes `model.onnx.sha256`,
  so loading it later verifies it as it verifies an exported one;
- keeps the manifest of what it installed as voxseg_archive.json in the model folder (`voxseg verify` checks the
  files against it later);
- refuses a target that already holds a model unless `force=True`; then the staged folder replaces the old
  one by renames, so the folder holds one model or the other, never a mix of two.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from voxseg import __version__
from voxseg.atomicio import staging_folder, sweep_stale_staging
from voxseg.checkpoint import checkpoint_to_weights, load_checkpoint
from voxseg.digest import sha256_file, write_digest_file
from voxseg.errors import CheckpointError, ConfigError
from voxseg.jsonio import parse_json, write_json_atomic
from voxseg.plans import Plan
from voxseg.units import GIB
from voxseg.weights import WeightsFile, check_fits_plan, now_utc, read_weights_header, weights_plan
from voxseg.workdir import FoldDir, WorkDir, checkpoint_tag

_ROOT = WorkDir(".")
MANIFEST = _ROOT.member(_ROOT.archive_manifest)
ARCHIVE_FORMAT = "voxseg-model"
ARCHIVE_VERSION = 3
"""3: safetensors weights (model_TAG.safetensors); 2 and 1: pickled checkpoints (converted on install)."""
WEIGHTS_SUFFIX = _ROOT.fold(0).weights("final").suffix
CHECKPOINT_SUFFIX = _ROOT.fold(0).checkpoint("final").suffix
ALLOWED_SUFFIXES = (".json", WEIGHTS_SUFFIX, ".onnx", CHECKPOINT_SUFFIX)
DEFAULT_MAX_TOTAL_BYTES = 20 * GIB
DEFAULT_MAX_MEMBER_BYTES = 20 * GIB
DEFAULT_MAX_COMPRESSION_RATIO = 200.0
_RATIO_CHECKED_ABOVE = 1 << 20  # small JSON files legitimately compress very well
_SPACE_MARGIN = 1.05


def holds_model(folder: Path) -> bool:
    """True when `folder` holds a model: plans.json or a trained fold's checkpoint."""
    return WorkDir(folder).plans.is_file() or WorkDir(folder).has_checkpoints()


def _check_member(info: zipfile.ZipInfo, target: Path) -> None:
    """Refuse a member that could write outside `target` or is not a model file."""
    name = info.filename
    parts = PurePosixPath(name).parts
    mode = info.external_attr >> 16
    reasons = []
    if name.startswith(("/", "\\")) or "\\" in name or (parts and ":" in parts[0]):
        reasons.append("absolute or non-POSIX path")
    if ".." in parts:
        reasons.append("'..' in the path")
    if stat.S_ISLNK(mode):
        reasons.append("symbolic link")
    if not info.is_dir() and not name.endswith(ALLOWED_SUFFIXES):
        reasons.append(f"unexpected file type (only {', '.join(ALLOWED_SUFFIXES)} are installed)")
    if not reasons:
        resolved = (target / name).resolve()
        if resolved != target and target not in resolved.parents:
            reasons.append(f"resolves to {resolved}, outside {target}")
    if reasons:
        raise CheckpointError(f"archive member '{name}' refused: {'; '.join(reasons)}. Nothing was installed")


def _read_manifest(archive: zipfile.ZipFile, zip_path: Path) -> dict[str, Any]:
    """The manifest (its "files": {member: {"sha256", "size"}}); CheckpointError when it is missing, has no
    digests, or lists pickled checkpoints in an archive of the safetensors format."""
    redo = "re-export the model with 'voxseg export WORKDIR --archive ZIP'"
    names = set(archive.namelist())
    root = WorkDir(".")
    if root.member(root.plans) not in names or not any(n.endswith(ALLOWED_SUFFIXES[1:]) for n in names):
        raise CheckpointError(f"{zip_path} is not a voxseg model archive (needs plans.json and weights)")
    if MANIFEST not in names:
        raise CheckpointError(f"{zip_path} has no {MANIFEST} (member list with SHA-256 digests); {redo}")
    try:
        manifest = parse_json(archive.read(MANIFEST), f"{zip_path}: {MANIFEST}", CheckpointError, invalid=redo)
        files = manifest["files"]
        assert manifest.get("format") == ARCHIVE_FORMAT and isinstance(files, dict)
        assert all(isinstance(entry["sha256"], str) and int(entry["size"]) >= 0 for entry in files.values())
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{zip_path}: {MANIFEST} does not list the members with their SHA-256 digests; "
                              f"{redo}") from None
    missing = sorted(set(files) - names)
    if missing:
        raise CheckpointError(f"{zip_path}: member(s) {missing} listed in {MANIFEST} are not in the archive; {redo}")
    version = manifest.get("version", 1)
    if not isinstance(version, int) or version > ARCHIVE_VERSION:
        raise CheckpointError(f"{zip_path}: archive format version {version!r} is newer than this voxseg reads "
                              f"({ARCHIVE_VERSION}); upgrade voxseg")
    pickled = sorted(name for name in files if name.endswith(CHECKPOINT_SUFFIX))
    if version >= 3 and pickled:
        raise CheckpointError(f"{zip_path}: member(s) {pickled} are pickled checkpoints, which an archive of format "
                              f"{version} never holds (its weights are {WEIGHTS_SUFFIX} files); nothing was installed")
    return manifest


def _check_sizes(infos: list[zipfile.ZipInfo], destination: Path, max_total_bytes: int, max_member_bytes: int,
                 max_compression_ratio: float) -> int:
    """Refuse oversized or over-compressed members and a disk without room; returns the total size."""
    for info in infos:
        if info.file_size > max_member_bytes:
            raise CheckpointError(f"archive member '{info.filename}' is {info.file_size} bytes uncompressed, more "
                                  f"than the {max_member_bytes}-byte limit per member; nothing was installed")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_CHECKED_ABOVE and ratio > max_compression_ratio:
            raise CheckpointError(f"archive member '{info.filename}' inflates {ratio:.0f}:1 (limit "
                                  f"{max_compression_ratio:g}:1): it looks like a zip bomb; nothing was installed")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise CheckpointError(f"the archive's members add up to {total} bytes uncompressed, more than the "
                              f"{max_total_bytes}-byte limit; nothing was installed")
    free = shutil.disk_usage(destination).free
    if free < total * _SPACE_MARGIN:
        raise CheckpointError(f"not enough space in {destination}: the model needs {total} bytes "
                              f"({total / GIB:.2f} GiB), {free} bytes ({free / GIB:.2f} GiB) are free; "
                              "free some space or install elsewhere")
    return total


def _unpack_checked(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, expected: dict[str, Any]) -> None:
    """Inflate one member (never more than its declared size), verify its digest, test-load a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size, limit = hashlib.sha256(), 0, int(expected["size"])
    with archive.open(info) as source, open(path, "wb") as destination:
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise CheckpointError(f"archive member '{info.filename}' inflates past its listed size of {limit} "
                                      "bytes; nothing was installed")
            digest.update(chunk)
            destination.write(chunk)
    if size != limit or digest.hexdigest() != expected["sha256"].lower():
        raise CheckpointError(f"archive member '{info.filename}' does not match its SHA-256 digest in {MANIFEST} "
                              "(corrupt or altered archive); nothing was installed")
    if path.suffix == ".onnx":
        _check_onnx(path, info.filename)
        write_digest_file(path)  # model.onnx.sha256: load_onnx_model verifies the installed file


def _check_onnx(path: Path, name: str) -> None:
    """Refuse an ONNX member that is not an ONNX model or keeps tensors in external files (when onnx is here)."""
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:  # without onnx there is no onnxruntime to run it either; the digest was checked
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's and its own errors
        raise CheckpointError(f"archive member '{name}' is not an ONNX model ({type(exc).__name__}); nothing was "
                              "installed") from None
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        raise CheckpointError(f"archive member '{name}' keeps weights in external data files, which an archive "
                              "does not carry; export it again with 'voxseg export WORKDIR --onnx'; nothing was "
                              "installed")


def _convert_checkpoints(staging: Path, names: list[str]) -> dict[str, str]:
    """Replace the staged pickled checkpoints of an old archive by weights files; {new member: old member}."""
    converted = {}
    root = WorkDir(staging)
    for name in names:  # every pickle is read safely (and refused if it holds code) before any is converted
        path = staging / name
        if not FoldDir(path.parent).in_workdir or checkpoint_tag(path) is None:
            raise CheckpointError(f"archive member '{name}' is not a fold's checkpoint (training/fold_F/"
                                  f"checkpoint_TAG{CHECKPOINT_SUFFIX}); nothing was installed")
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(f"archive member '{name}': {exc}; nothing was installed") from None
    for name in names:
        path = staging / name
        fold, tag = FoldDir(path.parent), checkpoint_tag(path) or ""
        try:
            checkpoint_to_weights(path, fold.weights(tag), "converted", fold.fold, tag,
                                  fallback_plan=root.plans, record_checkpoint=False)
        except (CheckpointError, ConfigError) as exc:
            raise CheckpointError(f"archive member '{name}' cannot be converted to a weights file ({exc}); "
                                  "nothing was installed") from None
        path.unlink()
        converted[root.member(fold.weights(tag))] = name
    return converted


def check_weights_file(folder: Path, name: str) -> WeightsFile:
    """The header of model folder `folder`'s weights file `name` (parsed by safetensors), after checking that its
    tensors fit the plan stored with it and the fold's plans.json; messages name files relative to `folder`."""
    path = folder / name
    weights = read_weights_header(path)
    check_fits_plan(weights.shapes, weights_plan(weights, WorkDir(folder).plans), name)
    fold_plan = FoldDir(path.parent).plans
    if fold_plan.is_file():
        check_fits_plan(weights.shapes, Plan.load(fold_plan), WorkDir(folder).member(fold_plan))
    return weights


def _installed_manifest(staging: Path, manifest: dict[str, Any], zip_path: Path,
                        converted: dict[str, str]) -> dict[str, Any]:
    """What the model folder holds, with digests, and where it came from: voxseg_archive.json of the folder."""
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    return {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "folds": manifest.get("folds"),
            "checkpoint": manifest.get("checkpoint"),
            "files": {WorkDir(staging).member(p): {"sha256": sha256_file(p), "size": p.stat().st_size}
                      for p in files},
            "exported": manifest.get("exported"),
            "installed": {"archive": zip_path.name, "archive_sha256": sha256_file(zip_path),
                          "archive_version": manifest.get("version", 1), "date": now_utc(),
                          "voxseg_version": __version__, "converted": converted}}


def _existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (where the free space of a target yet to be made is)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def swap_in_folder(staging: Path, target: Path) -> None:
    """Replace `target` (absent, empty, or holding the old model) by the staged folder, by renames only."""
    if target.is_dir() and any(target.iterdir()):
        retired = staging_folder(target, "old")
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)  # rename(2) replaces an empty directory


def install_archive(zip_path: str | Path, target_dir: str | Path, force: bool = False,
                    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO) -> Path:
    """Install a model archive as the model folder `target_dir` (for `Predictor.from_workdir`).

    Args:
        force: replace a model already in `target_dir` (as a whole; otherwise such a target is refused).
        max_total_bytes, max_member_bytes, max_compression_ratio: limits on what the archive may inflate to.

    Raises:
        CheckpointError: not a voxseg model archive, an unsafe, oversized, corrupt or unlisted member (named in
            the message), a target that holds a model without `force`, or not enough disk space.
    """
    zip_path, target = Path(zip_path), Path(target_dir)
    if not zip_path.is_file():
        raise CheckpointError(f"model archive {zip_path} not found")
    if not zipfile.is_zipfile(zip_path):
        raise CheckpointError(f"{zip_path} is not a zip archive; create one with 'voxseg export WORKDIR --archive ZIP'")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"install target {target} is a file; give a folder")
    target = target.resolve()  # nothing is created before every check has passed
    sweep_stale_staging(target)  # left by an install that was killed
    if holds_model(target) and not force:
        raise CheckpointError(f"{target} already holds a model (plans.json, or a fold's weights or checkpoint); "
                              "install into a new folder, or replace it with force=True (voxseg install --force)")
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
        for info in infos:
            _check_member(info, target)
        manifest = _read_manifest(archive, zip_path)
        listed = manifest["files"]
        files = [info for info in infos if not info.is_dir() and info.filename in listed]
        _check_sizes(files, _existing(target), max_total_bytes, max_member_bytes, max_compression_ratio)
        made = [folder for folder in target.parents if not folder.exists()]  # removed again if the install fails
        staging = staging_folder(target, "install")
        try:
            for info in files:
                _unpack_checked(archive, info, staging / info.filename, listed[info.filename])
            names = [info.filename for info in files]
            converted = _convert_checkpoints(staging, [n for n in names if n.endswith(CHECKPOINT_SUFFIX)])
            weights = [n for n in names if n.endswith(WEIGHTS_SUFFIX)] + list(converted)
            try:
                for name in weights:
                    check_weights_file(staging, name)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; nothing was installed") from None
            write_json_atomic(WorkDir(staging).archive_manifest,
                              _installed_manifest(staging, manifest, zip_path, converted))
            swap_in_folder(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for folder in made:  # innermost first; only the empty folders this install made
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
