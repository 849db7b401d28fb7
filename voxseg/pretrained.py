"""Pretrained weights for a new run (`train --pretrained FILE`): every tensor whose name and shape match is
copied into the network, and a report says what was loaded, missing, unexpected or of another shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from voxseg.checkpoint import load_checkpoint
from voxseg.errors import CheckpointError
from voxseg.weights import read_weights, strip_wrapper_prefixes
from voxseg.workdir import WorkDir


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


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Copy every checkpoint tensor whose name and shape match the model's; report the rest.

    Accepts a voxseg weights file (model_TAG.safetensors, read without unpickling), a voxseg checkpoint (its
    "model" entry) or a bare state dict. Raises CheckpointError when not a single tensor matches (a checkpoint of
    a different network), since training would silently start from scratch otherwise.
    """
    if str(path).endswith(WorkDir(".").fold(0).weights("final").suffix):
        weights = read_weights(path)
    else:
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
