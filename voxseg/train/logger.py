"""Training logs: log.jsonl (one JSON record per epoch), TensorBoard scalars, progress.png and a progress bar.

Only rank 0 writes; other ranks get a logger whose methods do nothing. Records hold plain floats (NaN, e.g.
the Dice of a class absent from the validation patches, is written as null).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from voxseg.atomicio import atomic_path, write_text
from voxseg.config import LoggingConfig
from voxseg.errors import ConfigError
from voxseg.jsonio import parse_json
from voxseg.train.eta import RunLength, format_duration
from voxseg.workdir import FoldDir


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(parse_json(line, path))
        except ConfigError:  # a line torn by a kill: the records before it stand
            continue
    return records


class TrainLogger:
    """Writes the per-epoch records of one training run into `out_dir`.

    Args:
        out_dir: training/fold_F.
        config: what to write besides log.jsonl.
        total_epochs: for the ETA of the whole run.
        rank: only rank 0 writes.
        start_epoch: on resume, records of this epoch and later (written after the checkpoint) are dropped,
            so log.jsonl tells the story of the run that the checkpoints hold (TensorBoard hides them too).
        length: what the run has left to do, for the expected duration and the running ETA.
    """

    def __init__(self, out_dir: str | Path, config: LoggingConfig, total_epochs: int, rank: int = 0,
                 start_epoch: int = 0, length: RunLength | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.total_epochs = total_epochs
        self.active = rank == 0
        self.length = length
        self.step_seconds: float | None = None  # one training step, measured at the start of this process
        self.history: list[dict[str, Any]] = []
        self._writer: Any = None
        if not self.active:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = FoldDir(self.out_dir).log
        self.history = [r for r in read_log(self.path) if int(r.get("epoch", -1)) < start_epoch]
        # rewrite atomically: drop records past the checkpoint we resume from
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        if config.tensorboard:
            # on resume, TensorBoard hides the events of the epochs run again (purge_step)
            self._writer = _tensorboard_writer(FoldDir(self.out_dir).tensorboard, start_epoch or None)

    # ----- duration ----------------------------------------------------------------------------------------
    def step_probe(self, iterations: int) -> int:
        """The iteration after which to time the first steps of this process (0: no timing wanted): the step
        time of iterations 2..N (the first one warms up) gives the expected duration printed at the start."""
        if not self.active or self.length is None or self.step_seconds is not None or iterations < 2:
            return 0
        return min(iterations, 11)

    def expect(self, step_seconds: float) -> None:
        """Print the expected duration of the rest of the run from a measured training step."""
        self.step_seconds = step_seconds
        if self.length is not None:
            self.message(f"{self.length.expected(step_seconds)} (step time measured on the first iterations; "
                         "validation estimated until measured)")

    # ----- per epoch --------------------------------------------------------------------------------------
    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to log.jsonl, TensorBoard and progress.png."""
        if not self.active:
            return
        record = _clean(record)
        self.history.append(record)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in _flatten(record).items():
                if name != "epoch" and value is not None:
                    self._writer.add_scalar(name, value, record["epoch"])
            self._writer.flush()
        if self.config.progress_png:
            plot_progress(self.history, FoldDir(self.out_dir).progress_plot)
        self.message(epoch_summary(record, self.total_epochs))

    def eta_seconds(self) -> float | None:
        """Epochs left x the mean wall time of the epochs logged so far (training, validation and checkpoints),
        plus the final full validation (None before the first epoch)."""
        walls = [_wall_time(r) for r in self.history if r.get("epoch_time")]
        if not walls:
            return None
        next_epoch = int(self.history[-1]["epoch"]) + 1
        mean = sum(walls) / len(walls)
        if self.length is None:
            return max(0, self.total_epochs - next_epoch) * mean
        timed = [r for r in self.history if r.get("val_time") and r.get("val_iterations")]
        tile = None
        if timed:  # one validation batch is `batch_size` tiles' worth of forward passes
            tile = timed[-1]["val_time"] / (timed[-1]["val_iterations"] * self.length.batch_size)
        step = self.step_seconds or float(self.history[-1].get("batch_time") or 0.0)
        return self.length.remaining(next_epoch, mean, tile, step)

    def progress_bar(self, epoch: int, iterations: int) -> tqdm:
        """A bar for one epoch; disabled on other ranks, when switched off, or when nothing reads stderr."""
        eta = self.eta_seconds()
        run_eta = f" | run ETA {format_duration(eta)}" if eta is not None else ""
        return tqdm(total=iterations, desc=f"epoch {epoch + 1}/{self.total_epochs}{run_eta}", leave=False,
                    disable=not (self.active and self.config.progress_bar), dynamic_ncols=True, file=sys.stderr)

    def refreshes_loss(self, iteration: int) -> bool:
        """Whether the bar's loss is refreshed after `iteration` (1-based) of an epoch.

        The same answer on every rank of a distributed run (it reads the config, not whether this rank shows a
        bar): the refresh reads the running means, which all-reduce over the ranks, so every rank must take it
        or none. Each refresh is a host-device sync.
        """
        every = self.config.log_every_iter
        return bool(self.config.progress_bar and every and iteration % every == 0)

    def message(self, text: str) -> None:
        if self.active:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def epoch_summary(record: dict[str, Any], total_epochs: int) -> str:
    """One line per epoch, e.g. 'epoch 3/10  loss 0.812  val 0.774  Dice 0.71 0.52  EMA 0.605  lr 0.0011  12.3 s'."""
    def number(value: Any, digits: int = 3) -> str:
        return "nan" if value is None else f"{value:.{digits}f}"

    parts = [f"epoch {record['epoch'] + 1}/{total_epochs}", f"loss {number(record['loss'].get('loss'), 4)}"]
    if "pseudo_dice" in record:
        dice = " ".join(number(v, 2) for v in record["pseudo_dice"].values())
        parts += [f"val {number(record.get('val_loss'), 4)}", f"Dice {dice}", f"EMA {number(record.get('ema_dice'))}"]
    parts += [f"lr {record['lr']:.3g}", f"{record['epoch_time']:.1f} s"]
    return "  ".join(parts)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"dice": 1}} -> {"loss/dice": 1}; lists and strings are skipped (not scalars)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


_TENSORBOARD_NOTICE_SHOWN = False


def _wall_time(record: dict[str, Any]) -> float:
    """An epoch's whole time: its wall time, or for records without one, training plus validation."""
    if record.get("wall_time"):
        return float(record["wall_time"])
    return float(record.get("epoch_time") or 0.0) + float(record.get("val_time") or 0.0)


def _tensorboard_writer(log_dir: Path, purge_step: int | None = None) -> Any:
    global _TENSORBOARD_NOTICE_SHOWN
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TENSORBOARD_NOTICE_SHOWN:
            print("tensorboard is not installed: skipping TensorBoard logs (pip install tensorboard)",
                  file=sys.stderr)
            _TENSORBOARD_NOTICE_SHOWN = True
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def plot_progress(history: list[dict[str, Any]], path: str | Path) -> None:
    """Redraw progress.png (`progress_figure`)."""
    figure = progress_figure(history)
    with atomic_path(path) as tmp:  # keeps the .png ending, from which matplotlib picks the format
        figure.savefig(tmp, dpi=80)


def progress_figure(history: list[dict[str, Any]]) -> Any:
    """Losses, pseudo-Dice (+EMA), learning rate and epoch time against the epoch, counted from 1 as the console
    counts them ('epoch 1/10' is the record with "epoch": 0), on whole-number ticks. Returns the Figure."""
    # the object-oriented API renders with Agg and leaves pyplot's global backend state alone
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) + 1 for r in history]

    def series(key: str, sub: str | None = None) -> list[float]:
        values = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in history]
        return [math.nan if v is None else float(v) for v in values]

    fig = Figure(figsize=(8, 11))
    axes = fig.subplots(4, 1, sharex=True)
    axes[0].plot(epochs, series("loss", "loss"), label="train loss")
    axes[0].plot(epochs, series("val_loss"), ".-", label="val loss")
    axes[0].set_ylabel("loss")
    axes[1].plot(epochs, series("pseudo_dice_mean"), ".", label="pseudo Dice (mean)")
    axes[1].plot(epochs, series("ema_dice"), "-", label="EMA pseudo Dice")
    axes[1].set_ylabel("Dice")
    axes[2].plot(epochs, series("lr"))
    axes[2].set_ylabel("learning rate")
    axes[3].plot(epochs, series("epoch_time"))
    axes[3].set_ylabel("epoch time (s)")
    axes[3].set_xlabel("epoch")
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # shared: no epoch 1.5
    if epochs:  # half an epoch either side, so even a single epoch has a whole-number tick in view
        axes[3].set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    for axis in axes[:2]:
        axis.legend(loc="best")
    for axis in axes:
        axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig
