"""Checkpointing as a component: atomic saving, safe loading (`weights_only=True`), restore with compatibility
checks, retention of periodic snapshots, RNG states, pretrained weights, and the one way to rebuild a network
from a checkpoint (used by training's test-only run and by inference alike).

The training loop hands a `Checkpointer` the objects to save, each with `state_dict()`/`load_state_dict()`
(model, optimiser, schedule, loss scaler, data position, the run's progress, the RNGs), plus metadata (the
effective plan and the config as dicts). The loop never lists keys:

    checkpointer = Checkpointer(out_dir, {"model": model, "optimizer": optimizer, ..., "rng": RngStates()},
                                metadata={"plan": plan.to_dict(), "config": config.to_dict()})
    checkpointer.save("latest")                      # training/fold_F/checkpoint_latest.pt, atomically
    checkpointer.restore("latest", device)           # refuses a changed plan or optimiser, then loads in order

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)`
reads it and loading a checkpoint never runs code from the file:
`{"format": 2, "model": ..., "optimizer": ..., "progress": {"epoch": ...}, "plan": {...}, "config": {...}}`.
"""
from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from voxseg.atomicio import atomic_path
from voxseg.digest import sha256_file
from voxseg.errors import CheckpointError
from voxseg.models import build_network
from voxseg.plans import Plan, plan_differences
from voxseg.weights import WEIGHTS_TAGS, provenance, strip_wrapper_prefixes, write_weights
from voxseg.workdir import FoldDir

__all__ = ["CHECKPOINT_CHOICES", "Checkpointer", "load_checkpoint", "network_from_checkpoint", "save_checkpoint",
           "strip_wrapper_prefixes"]

CHECKPOINT_FORMAT = 2
CHECKPOINT_CHOICES = ("final", "best", "latest")
# config options a resumed run must share with its checkpoint (the optimiser state only fits its optimiser)
CONFIG_MUST_MATCH = (("optim", "name"),)
# plan fields that are derived from others and may differ in the last digits
_DERIVED_PLAN_FIELDS = ("estimated_memory_gb",)


class Stateful(Protocol):
    """What a checkpointer saves: anything with `state_dict()` and `load_state_dict()`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """What identifies one written checkpoint file: its name, size and modification time. Outputs computed from
    a checkpoint keep it beside them (e.g. validation_final/checkpoint.json) so that a later reader can tell
    whether they still belong to the file of that name (a resumed run rewrites checkpoint_final.pt)."""
    stat = Path(path).stat()
    return {"checkpoint": Path(path).name, "bytes": int(stat.st_size), "modified_ns": int(stat.st_mtime_ns)}


def same_checkpoint(identity: Any, path: str | Path) -> bool:
    """Whether `identity` (from `checkpoint_identity`) still describes the file at `path`."""
    path = Path(path)
    if not isinstance(identity, dict) or not path.is_file():
        return False
    current = checkpoint_identity(path)
    return all(identity.get(key) == value for key, value in current.items())


class Checkpointer:
    """Saves and restores a run's state objects; owns file names, retention and compatibility checks.

    Args:
        directory: where checkpoint_{tag}.pt files go (training/fold_F).
        objects: name -> object with state_dict()/load_state_dict(); restored in this order, so put the RNGs
            last (nothing restored after them draws random numbers).
        metadata: plain data saved alongside ("plan", "config" dicts); `restore` compares "plan" field by field
            and the CONFIG_MUST_MATCH options of "config" with the checkpoint's.
        keep_snapshots: number of periodic snapshots (`snapshot(epoch)`, checkpoint_epoch_E.pt) kept; older
            ones are deleted. 0 = no snapshots.
        enabled: False on every process but the one that writes (rank 0): save/snapshot do nothing there.
    """

    def __init__(self, directory: str | Path, objects: dict[str, Stateful], metadata: dict[str, Any] | None = None,
                 keep_snapshots: int = 0, enabled: bool = True) -> None:
        reserved = {"format", *(metadata or {})}
        clash = reserved & set(objects)
        if clash:
            raise ValueError(f"checkpoint object names {sorted(clash)} clash with metadata keys")
        self.directory, self.objects = Path(directory), dict(objects)
        self.files = FoldDir(directory)  # where checkpoint_{tag}.pt and the run's plans.json and config.json are
        self.metadata, self.keep_snapshots, self.enabled = dict(metadata or {}), int(keep_snapshots), enabled

    def state(self) -> dict[str, Any]:
        """The dict a checkpoint file holds."""
        return {"format": CHECKPOINT_FORMAT, **{name: obj.state_dict() for name, obj in self.objects.items()},
                **self.metadata}

    def save(self, tag: str) -> Path | None:
        """Write checkpoint_{tag}.pt atomically (only where enabled); returns its path. For the checkpoints that
        prediction uses (final, best), model_{tag}.safetensors is written next to it (`voxseg.weights`)."""
        if not self.enabled:
            return None
        state = self.state()
        path = save_checkpoint(self.files.checkpoint(tag), state)
        if tag in WEIGHTS_TAGS and isinstance(state.get("model"), dict) and isinstance(state.get("plan"), dict):
            workdir = self.files.workdir if self.files.in_workdir else None
            write_weights(self.files.weights(tag), state["model"], state["plan"], config=state.get("config"),
                          progress=_progress_record(state), checkpoint=checkpoint_record(path),
                          provenance=provenance("trained", self.files.fold, tag, workdir))
        return path

    def snapshot(self, epoch: int) -> Path | None:
        """A periodic checkpoint_epoch_E.pt, keeping the newest `keep_snapshots` of them."""
        if not self.enabled or self.keep_snapshots <= 0:
            return None
        path = self.save(FoldDir.snapshot_tag(epoch))
        for old in self.snapshots()[:-self.keep_snapshots]:
            old.unlink(missing_ok=True)
        return path

    def snapshots(self) -> list[Path]:
        """Existing periodic snapshots, oldest first."""
        return self.files.snapshots()

    def restore(self, tag: str = "latest", map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Load checkpoint_{tag}.pt into every object after checking it belongs to this run; returns the state.

        Raises:
            CheckpointError: the file is missing, unreadable, lacks an object's entry, was trained with another
                plan or optimiser, or its weights do not fit (the message says what differs and what to do).
        """
        path = self.files.checkpoint(tag)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: nothing to resume; train without --resume first")
        state = load_checkpoint(path, map_location=map_location)
        self._check_compatible(path, state)
        for name, obj in self.objects.items():
            try:
                obj.load_state_dict(state[name])
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{path}: its '{name}' state does not fit this run ({first})") from None
        return state

    def _check_compatible(self, path: Path, state: dict[str, Any]) -> None:
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise CheckpointError(f"{path} has no {', '.join(missing)} state (format {state.get('format', 1)}, "
                                  f"this version writes {CHECKPOINT_FORMAT}); it cannot be resumed, train anew")
        if isinstance(self.metadata.get("plan"), dict) and isinstance(state.get("plan"), dict):
            changed = [line for line in plan_differences(state["plan"], self.metadata["plan"])
                       if line.split(":")[0] not in _DERIVED_PLAN_FIELDS]
            if changed:
                raise CheckpointError(
                    f"{path} was trained with another plan; a resumed run keeps its effective plan "
                    f"({self.files.plans}). Changed: {'; '.join(changed)}. Resume without these plan "
                    "overrides (and with the work directory's plans.json as it was), or train a new run")
        saved, current = state.get("config"), self.metadata.get("config")
        if isinstance(saved, dict) and isinstance(current, dict):
            for section, name in CONFIG_MUST_MATCH:
                before, now = saved.get(section, {}).get(name), current.get(section, {}).get(name)
                if before != now:
                    raise CheckpointError(
                        f"{path} was trained with {section}.{name}={before} but this run uses {now}; resume with "
                        f"the run's own settings: --config {self.files.config} --resume")


def _progress_record(state: dict[str, Any]) -> dict[str, Any]:
    """The run's progress as plain numbers (epoch, best epoch) for a weights file's metadata."""
    progress = state.get("progress") if isinstance(state.get("progress"), dict) else {}
    return {key: progress[key] for key in ("epoch", "best_epoch") if isinstance(progress.get(key), (int, float))}


def checkpoint_record(path: str | Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a checkpoint file: what a weights file written with it records."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically (temporary file in the same folder, fsync, rename): a crash never leaves half a
    file, and a failed save keeps the previous checkpoint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the file cannot be a torch checkpoint, judged from its first bytes; None when it may be one."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        return "is a git-lfs pointer, not the checkpoint itself: fetch the file with 'git lfs pull'"
    if not head:
        return "is empty (0 bytes)"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a legacy pickle
        return f"is corrupt or not a checkpoint at all (it starts with {head[:16]!r}); give a checkpoint_*.pt file"
    return None


def _unpickling_refusal(path: Path, exc: Exception) -> str:
    """Our own message for a weights_only refusal: torch's suggests loading with weights_only=False."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return (f"checkpoint {path} holds Python objects other than tensors and plain data{what}; voxseg refuses to "
            "unpickle foreign code, because loading it could run that code. Re-save the weights as a plain state "
            "dict where the file was made (torch.save({'model': model.state_dict()}, path))")


SAFE_UNPICKLER_TORCH = (2, 10)
"""The first torch whose `weights_only` unpickler has no published way to run code (the package's own floor)."""


def require_safe_unpickler(path: str | Path, version: str | None = None) -> None:
    """Refuse to unpickle `path` on a torch older than SAFE_UNPICKLER_TORCH.

    torch < 2.6 runs code from a crafted file even with `weights_only=True` (CVE-2025-32434) and torch < 2.10
    can be made to corrupt memory by one (CVE-2026-24747). voxseg requires torch >= 2.10, so this refuses only
    in an environment that was set up around that requirement (e.g. `pip install --no-deps`); there is no
    override: upgrading torch is the fix.
    """
    from torch.torch_version import TorchVersion

    found = TorchVersion(str(version or torch.__version__))
    if found < SAFE_UNPICKLER_TORCH:
        floor = ".".join(map(str, SAFE_UNPICKLER_TORCH))
        cve = "CVE-2025-32434 and CVE-2026-24747" if found < (2, 6) else "CVE-2026-24747"
        raise CheckpointError(
            f"{path} is a pickle-based torch file, and torch {found}'s weights_only loader can run code from a "
            f"crafted file ({cve}); voxseg reads such files only on torch >= {floor}. Upgrade torch "
            f"(pip install 'torch>={floor}'), or use the model's safetensors weights (model_TAG.safetensors, "
            "what 'voxseg export --archive' and 'voxseg import nnunet' write)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`: loading never runs code from the file), on a torch whose
    unpickler is safe (`require_safe_unpickler`).

    Raises:
        CheckpointError: the file is missing, not a checkpoint (text, a git-lfs pointer), truncated, holds
            pickled objects other than plain data, or is not a dict, or torch is too old to read it safely; the
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    require_safe_unpickler(path)
    reason = _not_a_checkpoint(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} {reason}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_refusal(path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError... for a bad file
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(_unpickling_refusal(path, exc)) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a voxseg checkpoint ({type(exc).__name__}: "
            f"{first_line[:200]}); delete it or train again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


# ----- random number generator states ---------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) as tensors and plain lists (safe for weights_only loading).

    The run's own generators (the sampler's positions, the augmentation's decisions) are numpy Generators that
    `TrainData.state_dict` saves with the data.
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": [int(v) for v in py_internal], "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved. Checkpoints of earlier versions also hold a "generators" entry (named torch
    generators, always empty in practice): nothing uses it, so it is ignored."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in saved])


class RngStates:
    """The run's global random generators as one checkpointable object (`rng_state` / `set_rng_state`)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def checkpoint_to_weights(checkpoint: str | Path, out: str | Path, source: str, fold: int | str, tag: str,
                          workdir: str | Path | None = None, fallback_plan: str | Path | None = None,
                          record_checkpoint: bool = True) -> Path:
    """Write the network weights of a voxseg checkpoint as a safetensors weights file (`voxseg.weights`).

    Args:
        source: the provenance's source ("trained", "converted", ...); the checkpoint's name and SHA-256 are
            recorded as where the weights came from.
        record_checkpoint: record the checkpoint as the weights' sibling (its size is compared on load): True
            when the weights file stays next to it.
    """
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{checkpoint} has no 'model' weights; is it a voxseg checkpoint?")
    if isinstance(state.get("plan"), dict):
        plan = state["plan"]
    elif fallback_plan is not None:
        plan = Plan.load(fallback_plan).to_dict()
    else:
        raise CheckpointError(f"{checkpoint} holds no plan; is it a voxseg checkpoint?")
    record = checkpoint_record(checkpoint)
    origin = provenance(source, fold, tag, workdir, source_file=checkpoint.name, source_sha256=record["sha256"])
    config = state.get("config") if isinstance(state.get("config"), dict) else None
    return write_weights(out, state["model"], plan, provenance=origin, progress=_progress_record(state),
                         config=config, checkpoint=record if record_checkpoint else None)


# ----- networks from checkpoints -----------------------------------------------------------------------------
def network_from_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                            fallback_plan: str | Path | None = None) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """The network a checkpoint was trained as, in eval mode on `device`, its effective plan and the state.

    The plan stored in the checkpoint wins (it is what the weights were trained with); `fallback_plan` (a
    plans.json) serves checkpoints without one. Deep-supervision heads are off: this is for inference.
    """
    path = Path(path)
    state = load_checkpoint(path, map_location="cpu")
    if isinstance(state.get("plan"), dict):
        plan = Plan.from_dict(state["plan"])
    elif fallback_plan is not None:
        plan = Plan.load(fallback_plan)
    else:
        raise CheckpointError(f"{path} holds no plan; is it a voxseg checkpoint?")
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' weights; is it a voxseg checkpoint?")
    network = build_network(plan, deep_supervision=False)
    try:
        network.load_state_dict(strip_wrapper_prefixes(state["model"]))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its weights do not fit the network of its plan ({first})") from None
    return network.to(device).eval(), plan, state
