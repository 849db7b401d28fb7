"""How a fold's run starts: anew (the default), continuing its own checkpoint, or from another run's weights.

These are given with the run (`voxseg train --resume / --pretrained / --force`, `train_fold(start=...)`) and are
never config options: the config says how a run trains, and a resumed run keeps the settings it had. The
contradictory combinations are refused here, before anything is read or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voxseg.errors import ConfigError


@dataclass(frozen=True)
class RunStart:
    """How a fold's run starts; `RunStart()` trains a new run into an empty fold."""

    resume: bool | str | Path = False
    """Continue the fold's run from its checkpoint_latest.pt (True), or from a given checkpoint of that run (its
    path, or the run's folder). Options given with it take effect from the next epoch (`voxseg.train.resume`)."""
    pretrained: str | Path | None = None
    """Initialise a new run from this checkpoint's matching weights (fine-tuning)."""
    force: bool = False
    """Train anew even when the fold already holds a run, deleting that run first (`voxseg.train.rundir`)."""

    def __post_init__(self) -> None:
        if self.resume and self.pretrained:
            raise ConfigError("--pretrained starts a new run from a checkpoint's weights; a resumed run continues "
                              "from its own checkpoint: give one of --resume and --pretrained")
        if self.resume and self.force:
            raise ConfigError("--force starts the fold's run anew (deleting it), --resume continues it: give one")
