"""`voxseg train --test-only`: full validation of a trained fold's checkpoint, without training.

Its own entry, next to `voxseg.train.loop.train` rather than inside it: the checkpoint's effective plan decides
everything about the network, and the config only the device, the precision and whether probabilities are
saved. What it writes is `voxseg.train.evaluation.evaluate_checkpoint`'s: training/fold_F/validation_{tag}/,
never the run's own validation/ folder.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from voxseg.atomicio import sweep_stale_temporaries
from voxseg.config import TrainConfig
from voxseg.data.splits import get_fold
from voxseg.distributed import process_group
from voxseg.train.evaluation import evaluate_checkpoint
from voxseg.train.setup import resolve_amp
from voxseg.workdir import WorkDir


def evaluate_fold(workdir: str | Path, fold: int | str, config: TrainConfig,
                  checkpoint: bool | str = True) -> dict[str, Any]:
    """Validate a checkpoint of fold `fold` on its full validation volumes; returns the metrics.

    Args:
        workdir: work directory with splits.json, preprocessed/ and the fold's run.
        fold: fold index or "all".
        config: the device (`loop.device`), precision (`loop.amp`) and `loop.save_val_probabilities`.
        checkpoint: True = checkpoint_best.pt (else checkpoint_final.pt), or a name of
            `voxseg.checkpoint.CHECKPOINT_CHOICES` ("final", "best", "latest") for that one.

    Returns:
        {"checkpoint", "epochs", "validation_dir", "val_dice_mean", "val_dice", "seconds"} (the val_ entries
        when the fold has validation cases).

    Raises:
        ConfigError: an unknown checkpoint name.
        CheckpointError: the fold has no such checkpoint (train first).
    """
    with process_group(config.loop.device, config.loop.dist_timeout_min) as world:
        start = time.perf_counter()
        workdir = Path(workdir)
        out_dir = WorkDir(workdir).fold(fold).path
        sweep_stale_temporaries(out_dir, recursive=True)  # temporary files of a killed run
        _, val_names = get_fold(workdir, fold)
        result = evaluate_checkpoint(workdir, out_dir, val_names, world.device,
                                     resolve_amp(config.loop.amp, world.device), checkpoint,
                                     config.loop.save_val_probabilities)
        return {**result, "seconds": time.perf_counter() - start}
