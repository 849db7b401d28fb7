"""Checkpoints: atomic saving, safe loading (`weights_only=True`), RNG states and pretrained weights.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (model, optimizer, scheduler,
scaler, epoch, rng, best_metric, patience, config, plan, ...), so `torch.load(weights_only=True)` reads it
and loading a checkpoint never runs code from the file.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxseg.errors import CheckpointError


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to a temporary file next to `path`, then rename it, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`); CheckpointError names the file when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a voxseg checkpoint ({first_line}); "
            "delete it or train again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


# ----- random number generator states ---------------------------------------------------------------------
def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state the run depends on, as tensors and plain lists (safe for weights_only loading).

    Args:
        generators: named extra generators (the sampler's, augmentation's) to save alongside the global ones.
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": [int(v) for v in py_internal], "gauss": py_gauss},
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` saved (generators present in both are restored; others are left alone)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in saved])
    for name, gen in (generators or {}).items():
        if name in state.get("generators", {}):
            gen.set_state(state["generators"][name].cpu())


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
