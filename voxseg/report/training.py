"""A training run in the report: its curves (losses, pseudo-Dice, learning rate, epoch time) and effective plan."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from voxseg.errors import ConfigError, InputError
from voxseg.jsonio import read_json
from voxseg.report import html
from voxseg.report.plots import save_figure
from voxseg.train.logger import progress_figure, read_log
from voxseg.workdir import FoldDir

__all__ = ["training_section"]


def _last(history: list[dict[str, Any]], key: str) -> str:
    for record in reversed(history):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            return f"{float(value):.4g}"
    return "&mdash;"


def training_section(fold: FoldDir, plots_dir: Path, files: str) -> tuple[str, str]:
    """(heading, HTML) of one fold's run; the curves go to `plots_dir` as training_fold_F.png.

    Raises:
        InputError: the fold has no log.jsonl (it never trained).
    """
    history = read_log(fold.log)
    if not history:
        raise InputError(f"{fold.log}: no training log; train fold {fold.fold} first ('voxseg train')")
    plots_dir.mkdir(parents=True, exist_ok=True)
    name = f"training_fold_{fold.fold}.png"
    save_figure(progress_figure(history), plots_dir / name, dpi=70)
    epochs = len(history)
    hours = sum(float(r.get("epoch_time") or 0.0) for r in history) / 3600.0
    facts = (f"<p>{epochs} epoch{'s' if epochs != 1 else ''} logged, {hours:.2f} h of epochs; last pseudo-Dice "
             f"{_last(history, 'pseudo_dice_mean')}, EMA {_last(history, 'ema_dice')}, learning rate "
             f"{_last(history, 'lr')}. Folder: {html.esc(fold.path.resolve())}</p>")
    body = facts + html.figure(f"{files}/plots/{name}", f"fold {fold.fold}: loss, pseudo-Dice, learning rate, "
                                                        "epoch time")
    if fold.plans.is_file():
        try:
            body += html.plan_block(read_json(fold.plans, ConfigError))
        except ConfigError as exc:
            body += f"<p class=note>effective plan not shown: {html.esc(exc)}</p>"
    return f"Training: fold {fold.fold}", body
