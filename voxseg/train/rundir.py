"""A fold's run folder (training/fold_F) is never overwritten silently.

Training a fold that already holds a run is refused unless the user says what they want: `--resume` continues
it, `--force` replaces it. A forced retrain first moves the old folder aside (one rename, atomic) and deletes
it, so the new run's checkpoints, logs and TensorBoard events never mix with the old one's; a deletion cut
short leaves only a hidden `.fold_F.replaced-*` folder, removed by the next forced retrain of that fold.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from voxseg.errors import ConfigError
from voxseg.workdir import FoldDir


def describe_run(out_dir: Path) -> str:
    """'5 epochs logged, checkpoint_latest.pt of 2026-12-06 13:40' (what a refusal shows of the old run)."""
    from voxseg.train.logger import read_log

    epochs = len(read_log(FoldDir(out_dir).log))
    checkpoints = sorted(FoldDir(out_dir).checkpoints(), key=lambda p: p.stat().st_mtime)
    saved = "no checkpoint" if not checkpoints else (
        f"{checkpoints[-1].name} of {time.strftime('%Y-%m-%d %H:%M', time.localtime(checkpoints[-1].stat().st_mtime))}")
    return f"{epochs} epoch{'s' if epochs != 1 else ''} logged, {saved}"


def check_run_dir(out_dir: Path, force: bool) -> bool:
    """Refuse to train into a folder that holds a run unless `force`; True when there is a run to replace."""
    if not FoldDir(out_dir).run_files():  # a checkpoint, its log or its config
        return False
    if not force:
        raise ConfigError(f"{out_dir} already holds a run ({describe_run(out_dir)}). Continue it with --resume, or "
                          "train anew with --force, which deletes it first")
    return True


def replace_run_dir(out_dir: Path) -> None:
    """Delete the run in `out_dir` (the caller decided to, with `force`): renamed aside atomically, then removed,
    with what an earlier interrupted replacement left."""
    parent = out_dir.parent
    for leftover in parent.glob(f".{out_dir.name}.replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not out_dir.exists():
        return
    aside = parent / f".{out_dir.name}.replaced-{os.getpid()}-{secrets.token_hex(3)}"
    os.replace(out_dir, aside)  # from here on the fold holds nothing of the old run
    shutil.rmtree(aside, ignore_errors=True)
