"""Model weights in safetensors: the file that prediction, archives and installs read. Reading it cannot run code.

A training run's checkpoint_{final,best}.pt is a torch file (optimiser, schedule and RNG states, for resuming)
that only `torch.load` can read, through an unpickler. Next to it, the run writes model_{final,best}.safetensors
(`FoldDir.weights`): the network's tensors and, in the header's metadata (strings holding JSON), what is needed
to use them and to know where they came from:

    voxseg_weights   the format of this file ("1")
    plan             the effective plan the weights were trained with (voxseg.plans.Plan)
    config           the run's config, when there is one
    progress         {"epoch": ...}
    provenance       {"source": "trained" | "nnunet-import" | "converted", "created": UTC time, "voxseg_version",
                      "fold", "checkpoint", "dataset_fingerprint_sha256", and for imports and conversions
                      "source_file", "source_sha256"}
    checkpoint       {"bytes", "sha256"} of the checkpoint_TAG.pt written with it (absent for imports/installs)

Reading goes through the safetensors parser: the header's length is bounded, every tensor's offsets are checked
against the file, and there is no pickle. Before a tensor is read, the header's table (names and shapes) is
checked against the network the plan builds, so a plan that disagrees with the weights is refused by name.

    write_weights(path, network.state_dict(), plan.to_dict(), progress={"epoch": 9}, provenance=...)
    network, weights = load_weights_network(path, "cpu")    # eval mode; weights.plan, .provenance, .progress
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxseg import __version__
from voxseg.atomicio import write_bytes
from voxseg.digest import sha256_file
from voxseg.errors import CheckpointError
from voxseg.jsonio import parse_json
from voxseg.models import build_network
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

WEIGHTS_FORMAT = "1"
WEIGHTS_TAGS = ("final", "best")
"""The checkpoints that get a weights file: the ones prediction and sharing use (latest and snapshots resume)."""
_FORMAT_KEY = "voxseg_weights"
_JSON_KEYS = ("plan", "config", "progress", "provenance", "checkpoint")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the header's length


@dataclass
class WeightsFile:
    """A weights file's header: its tensor table and metadata (no tensor read)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    plan: dict[str, Any] | None
    config: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    """{"bytes", "sha256"} of the checkpoint_TAG.pt written together with this file."""

    @property
    def epoch(self) -> int:
        value = self.progress.get("epoch")
        return int(value) if isinstance(value, (int, float)) else 0


# ----- provenance -------------------------------------------------------------------------------------------------
def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint_digest(workdir: str | Path | WorkDir | None) -> str | None:
    """SHA-256 of the work directory's fingerprint.json (the training data's fingerprint), None without one."""
    if workdir is None:
        return None
    path = WorkDir(workdir).fingerprint
    return sha256_file(path) if path.is_file() else None


def provenance(source: str, fold: int | str, checkpoint: str, workdir: str | Path | WorkDir | None = None,
               **extra: Any) -> dict[str, Any]:
    """The provenance record of a weights file written now."""
    record = {"source": source, "created": now_utc(), "voxseg_version": __version__, "fold": str(fold),
              "checkpoint": checkpoint, "dataset_fingerprint_sha256": fingerprint_digest(workdir)}
    record.update(extra)
    return record


# ----- writing ----------------------------------------------------------------------------------------------------
def strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the wrappers' prefixes: torch.compile's `_orig_mod.` and DDP's `module.`."""
    out = {}
    for name, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def write_weights(path: str | Path, model_state: dict[str, Any], plan: dict[str, Any], *,
                  provenance: dict[str, Any], progress: dict[str, Any] | None = None,
                  config: dict[str, Any] | None = None, checkpoint: dict[str, Any] | None = None) -> Path:
    """Write the network's tensors and their metadata as a safetensors file, atomically (stage, then rename).

    The tensors are checked against the plan's network first: a file is never written that could not be loaded.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {name: value.detach().to("cpu").contiguous().clone()
               for name, value in strip_wrapper_prefixes(model_state).items() if isinstance(value, torch.Tensor)}
    check_fits_plan({name: tuple(t.shape) for name, t in tensors.items()}, Plan.from_dict(plan), path)
    metadata = {_FORMAT_KEY: WEIGHTS_FORMAT, "plan": json.dumps(plan), "progress": json.dumps(progress or {}),
                "provenance": json.dumps(provenance)}
    if config is not None:
        metadata["config"] = json.dumps(config)
    if checkpoint is not None:
        metadata["checkpoint"] = json.dumps(checkpoint)
    write_bytes(path, save(tensors, metadata=metadata))  # a file made as any other (safetensors' own is 0600)
    return path


# ----- reading ----------------------------------------------------------------------------------------------------
def _json_entry(path: Path, metadata: dict[str, str], key: str) -> Any:
    text = metadata.get(key)
    if text is None:
        return None
    value = parse_json(text, f"weights file {path}: its '{key}' metadata", CheckpointError,
                       invalid="an altered file: export or install the model again")
    if not isinstance(value, dict):
        raise CheckpointError(f"weights file {path}: its '{key}' metadata is a {type(value).__name__}, not a record "
                              "(an altered file); export or install the model again")
    return value


def read_weights_header(path: str | Path) -> WeightsFile:
    """The header of a weights file (its tensor table and metadata), parsed by safetensors; no tensor is read.

    Raises:
        CheckpointError: the file is missing, not a safetensors file, its header is corrupt or altered (lengths
            or offsets that do not fit the file), or it is not a voxseg weights file; the message names the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    declared = int.from_bytes(head, "little") if len(head) == 8 else -1
    if declared < 2 or declared > min(size - 8, _HEADER_LIMIT):
        raise CheckpointError(f"weights file {path} is not a safetensors file (its first 8 bytes declare a header "
                              f"of {declared} bytes in a file of {size}); export or install the model again")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            slices = {name: handle.get_slice(name) for name in names}
            shapes = {name: tuple(int(n) for n in s.get_shape()) for name, s in slices.items()}
            dtypes = {name: str(s.get_dtype()) for name, s in slices.items()}
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights file {path} has a corrupt or altered header ({first[:200]}); export or "
                              "install the model again") from None
    if metadata.get(_FORMAT_KEY) != WEIGHTS_FORMAT:
        found = metadata.get(_FORMAT_KEY)
        raise CheckpointError(f"weights file {path} is not a voxseg weights file (metadata {_FORMAT_KEY}="
                              f"{found!r}, expected {WEIGHTS_FORMAT!r}); export or install the model again")
    entries = {key: _json_entry(path, metadata, key) for key in _JSON_KEYS}
    return WeightsFile(path, shapes, dtypes, entries["plan"], entries["config"], entries["progress"] or {},
                       entries["provenance"] or {}, entries["checkpoint"])


def expected_shapes(plan: Plan) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the tensors of the plan's network, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        network = build_network(plan, deep_supervision=False)
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


def check_fits_plan(shapes: dict[str, tuple[int, ...]], plan: Plan, path: str | Path) -> None:
    """Refuse weights whose tensor table is not the one of the plan's network (names and shapes)."""
    expected = expected_shapes(plan)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [(name, shapes[name], expected[name]) for name in sorted(set(expected) & set(shapes))
             if tuple(shapes[name]) != tuple(expected[name])]
    if not (missing or unexpected or wrong):
        return
    what = []
    if wrong:
        name, found, want = wrong[0]
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        what.append(f"{name} is {list(found)} in the file but {list(want)} in the plan's network{more}")
    if missing:
        what.append(f"{len(missing)} tensor(s) of the network are missing (e.g. {missing[0]})")
    if unexpected:
        what.append(f"{len(unexpected)} tensor(s) are not in the network (e.g. {unexpected[0]})")
    raise CheckpointError(f"{path}: the weights do not fit the network of its plan: {'; '.join(what)}. The plan "
                          "and the weights come from different models; export or install the model again")


def weights_plan(weights: WeightsFile, fallback_plan: str | Path | None = None) -> Plan:
    """The plan of a weights file: its own (what the weights were trained with), else `fallback_plan`."""
    if weights.plan is not None:
        try:
            return Plan.from_dict(weights.plan)
        except Exception as exc:  # noqa: BLE001 - a plan that does not parse is an altered file
            raise CheckpointError(f"weights file {weights.path}: its plan cannot be read ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); export or install the model again") from None
    if fallback_plan is not None:
        return Plan.load(fallback_plan)
    raise CheckpointError(f"weights file {weights.path} holds no plan; export or install the model again")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file on the CPU, after `read_weights_header`'s checks (no pickle)."""
    return _tensors(read_weights_header(path).path)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file whose header was checked already."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights file {path} cannot be read ({first[:200]}); export or install the model "
                              "again") from None


def load_weights_network(path: str | Path, device: str | torch.device = "cpu",
                         fallback_plan: str | Path | None = None) -> tuple[nn.Module, WeightsFile, Plan]:
    """The network of a weights file in eval mode on `device`, its header and plan (deep supervision off).

    The header's tensor table is checked against the plan's network before the tensors are read.
    """
    weights = read_weights_header(path)
    plan = weights_plan(weights, fallback_plan)
    check_fits_plan(weights.shapes, plan, weights.path)
    network = build_network(plan, deep_supervision=False)
    network.load_state_dict(_tensors(weights.path))  # the header was read and checked above
    return network.to(device).eval(), weights, plan


def stale_reason(weights: WeightsFile, checkpoint: str | Path) -> str | None:
    """Why a weights file no longer belongs to the checkpoint_TAG.pt beside it (None when it does, or cannot be
    told): the checkpoint's size differs from the one recorded when both were written. `voxseg verify` compares
    the SHA-256 digests."""
    checkpoint = Path(checkpoint)
    recorded = weights.checkpoint
    if not recorded or not checkpoint.is_file():
        return None
    if int(recorded.get("bytes", -1)) != os.stat(checkpoint).st_size:
        return (f"{checkpoint.name} was rewritten after {weights.path.name} (its size differs from the one recorded "
                "with the weights)")
    return None
