"""Collective-safety guard: a voxseg command under torchrun with every Python-level collective recorded per rank.

Every rank of a distributed run must enter the same collectives in the same order; a rank that calls one alone
crashes the run (Gloo) or hangs it (NCCL). The guard runs a command under `torchrun --nproc_per_node N` with
`torch.distributed`'s collectives wrapped: before each call the rank appends the collective's name and the voxseg
call site (module, function, line) to its own file. Afterwards `compare` reads the files and reports the first
position where the ranks' sequences differ, whether the run ended well, crashed or hung (it is stopped at a
timeout). DDP's gradient buckets are all-reduced in C++ by DDP itself and are not recorded.

    sequences = run_guarded(["train", str(workdir), "--fold", "0", "--set", ...], tmp_path / "calls")
    assert_same_collectives(sequences)

Run as a script (by torchrun), it installs the wrappers and runs `voxseg.cli.main(ARGS)`:
    torchrun --standalone --nproc_per_node 2 tests/collective_guard.py RECORD_DIR -- train WORKDIR --fold 0
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "reduce", "gather", "scatter", "reduce_scatter", "all_to_all", "gather_object", "scatter_object_list",
               "all_gather_into_tensor", "reduce_scatter_tensor", "monitored_barrier")
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _call_site() -> str:
    """The innermost voxseg frame outside voxseg/distributed.py that led to this collective."""
    package = str(ROOT / "voxseg")
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(package) and not frame.filename.endswith("distributed.py"):
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.name}:{frame.lineno}"
    return "outside voxseg"


def install(record_dir: Path, rank: int) -> None:
    """Wrap torch.distributed's collectives so that each call is appended to RECORD_DIR/rank_R.jsonl first."""
    import torch.distributed as dist

    record = open(record_dir / f"rank_{rank}.jsonl", "a", buffering=1)

    def wrap(name, original):
        @functools.wraps(original)
        def recorded(*args, **kwargs):
            shape = list(args[0].shape) if args and hasattr(args[0], "shape") else None
            record.write(json.dumps({"op": name, "site": _call_site(), "shape": shape}) + "\n")
            return original(*args, **kwargs)
        return recorded

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


@dataclass
class GuardedRun:
    """What one guarded command did: each rank's collectives in order, and how the launch ended."""

    sequences: list[list[dict]]
    returncode: int | None  # None: stopped at the timeout (a hang)
    stdout: str
    stderr: str


def run_guarded(args: list[str], record_dir: Path, nproc: int = 2, timeout: float = 300) -> GuardedRun:
    """`voxseg ARGS` under torchrun with NPROC processes (this checkout, one thread each), collectives recorded."""
    record_dir.mkdir(parents=True, exist_ok=True)
    for old in record_dir.glob("rank_*.jsonl"):
        old.unlink()
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, str(record_dir), "--", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
        code = None
    sequences = []
    for rank in range(nproc):
        path = record_dir / f"rank_{rank}.jsonl"
        sequences.append([json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else [])
    return GuardedRun(sequences, code, stdout, stderr)


def first_difference(sequences: list[list[dict]]) -> str | None:
    """A description of the first position where the ranks' collective sequences differ, None when equal."""
    longest = max(len(s) for s in sequences)
    for index in range(longest):
        calls = [s[index] if index < len(s) else None for s in sequences]
        keys = [None if c is None else (c["op"], c["site"], c["shape"]) for c in calls]
        if any(k != keys[0] for k in keys):
            shown = "; ".join(f"rank {r}: " + ("nothing (its sequence ended)" if c is None else
                                               f"{c['op']} {c['shape']} at {c['site']}")
                              for r, c in enumerate(calls))
            return f"collective #{index + 1} differs between the ranks: {shown}"
    return None


def assert_same_collectives(run: GuardedRun, minimum: int = 1) -> None:
    """Fail when the ranks' collectives differ (with the first difference), when the launch crashed or hung,
    or when fewer than `minimum` collectives were recorded (the guard would prove nothing)."""
    difference = first_difference(run.sequences)
    assert difference is None, difference + "\n" + run.stderr[-3000:]
    assert run.returncode is not None, "the run hung (stopped at the timeout)\n" + run.stderr[-3000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert len(run.sequences[0]) >= minimum, f"only {len(run.sequences[0])} collectives recorded"


def _main() -> int:
    split = sys.argv.index("--")
    record_dir, args = Path(sys.argv[1]), sys.argv[split + 1:]
    install(record_dir, int(os.environ.get("RANK", "0")))
    from voxseg.cli import main

    return main(args)


if __name__ == "__main__":
    sys.exit(_main())
