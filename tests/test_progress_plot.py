"""progress.png counts epochs as the console does (from 1) on whole-number ticks."""
from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg

from voxseg.train.logger import epoch_summary, plot_progress, progress_figure


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, "loss": {"loss": 1.0 - 0.1 * e}, "val_loss": 0.9 - 0.1 * e, "pseudo_dice_mean": 0.2 * e,
             "pseudo_dice": {"x": 0.2 * e}, "ema_dice": 0.1 * e, "lr": 0.01, "epoch_time": 2.0} for e in range(epochs)]


def _visible_ticks(axis) -> list[float]:
    low, high = axis.get_xlim()
    return [t for t in axis.get_xticks() if low <= t <= high]


def test_progress_plot_counts_epochs_from_one_on_whole_ticks(tmp_path):
    history = _history(3)
    figure = progress_figure(history)
    FigureCanvasAgg(figure).draw()
    axes = figure.get_axes()
    assert len(axes) == 4
    for axis in axes:
        for line in axis.get_lines():
            assert list(line.get_xdata()) == [1, 2, 3]
    assert epoch_summary(history[0], 3).startswith("epoch 1/3")  # the console's first epoch is the plot's first
    ticks = _visible_ticks(axes[3])
    assert ticks and all(float(t).is_integer() for t in ticks) and min(ticks) >= 1
    labels = [label.get_text() for label in axes[3].get_xticklabels() if label.get_text()]
    assert labels and all(text.isdigit() for text in labels)

    plot_progress(history, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_epoch_still_has_whole_ticks():
    figure = progress_figure(_history(1))
    FigureCanvasAgg(figure).draw()
    ticks = _visible_ticks(figure.get_axes()[3])
    assert 1.0 in ticks and all(float(t).is_integer() for t in ticks)
