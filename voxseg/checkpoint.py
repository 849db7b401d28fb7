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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from voxseg.atomicio import atomic_path
from voxseg.errors import CheckpointError
from voxseg.models import build_network
from voxseg.plans import Plan, plan_differences
from voxseg.workdir import FoldDir

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
        """Write checkpoint_{tag}.pt atomically (only where enabled); returns its path."""
        if not self.enabled:
            return None
        return save_checkpoint(self.files.checkpoint(tag), self.state())

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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`: loading never runs code from the file).

    Raises:
        CheckpointError: the file is missing, not a checkpoint (text, a git-lfs pointer), truncated, holds
            pickled objects other than plain data, or is not a dict; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
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


# ----- pretrained weights -----------------------------------------------------------------------------------
@dataclass
class PretrainedReport:
    """What `load_pretrained` did.

    Attributes:
        path: the checkpoint read.
        loaded: parameter/buffer names copied into the model.
        missing: model names the checkpoint lacks (left as initialised).
        unexpected: checkpoint names the model lacks (ignored).
        mismatched: (name, checkpoint shape, model shape) for names whose shapes differ (left as initialised).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)

    def summary(self, max_names: int = 5) -> str:
        def names(items: list[str]) -> str:
            more = f" and {len(items) - max_names} more" if len(items) > max_names else ""
            return ", ".join(items[:max_names]) + more

        lines = [f"pretrained weights from {self.path}: {len(self.loaded)} tensors loaded"]
        if self.mismatched:
            shown = [f"{n} {tuple(a)} vs model {tuple(b)}" for n, a, b in self.mismatched]
            lines.append(f"  shape mismatch (kept initialised): {names(shown)}")
        if self.missing:
            lines.append(f"  not in the checkpoint (kept initialised): {names(self.missing)}")
        if self.unexpected:
            lines.append(f"  not in the model (ignored): {names(self.unexpected)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the wrappers' prefixes: torch.compile's `_orig_mod.` and DDP's `module.`."""
    out = {}
    for name, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Copy every checkpoint tensor whose name and shape match the model's; report the rest.

    Accepts a voxseg checkpoint (its "model" entry) or a bare state dict. Raises CheckpointError when not a
    single tensor matches (a checkpoint of a different network), since training would silently start from
    scratch otherwise.
    """
    state = load_checkpoint(path)
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    weights = strip_wrapper_prefixes({k: v for k, v in weights.items() if isinstance(v, torch.Tensor)})
    own = model.state_dict()
    report = PretrainedReport(path=str(path))
    to_load = {}
    for name, tensor in own.items():
        if name not in weights:
            report.missing.append(name)
        elif tuple(weights[name].shape) != tuple(tensor.shape):
            report.mismatched.append((name, list(weights[name].shape), list(tensor.shape)))
        else:
            to_load[name] = weights[name]
            report.loaded.append(name)
    report.unexpected = sorted(set(weights) - set(own))
    if not to_load:
        raise CheckpointError(f"{path}: no tensor matches this network by name and shape; is it a checkpoint "
                              "of a different network or dataset?")
    model.load_state_dict(to_load, strict=False)
    return report


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
