"""The `voxseg estimate` table: one unit per duration column, stated in the header, a baseline row, speed-ups
with their spread over the timing rounds, then the notes and warnings that say how far to trust them."""
from __future__ import annotations

from typing import Any

TOTAL_UNITS = (("min", 60.0), ("h", 3600.0), ("d", 86400.0))


def total_unit(totals_s: list[float]) -> tuple[str, float]:
    """The one unit of the total column, picked by the largest total: minutes under an hour, hours under two
    days, days beyond."""
    largest = max(totals_s, default=0.0)
    if largest < 3600:
        return TOTAL_UNITS[0]
    return TOTAL_UNITS[1] if largest < 2 * 86400 else TOTAL_UNITS[2]


def number(value: float) -> str:
    """About three significant digits, never in exponent notation."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def ratio(values: list[float] | None, baseline: bool = False) -> str:
    if baseline:
        return "1.00x (baseline)"
    if values is None:
        return "-"
    median, low, high = values
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def _header_lines(result: dict[str, Any]) -> list[str]:
    fixed = result["iterations_per_epoch"]
    iterations = f"{fixed} iterations" if fixed else "one pass over the cases"
    validation = (f" + {result['val_iterations']} validation batches every "
                  f"{'epoch' if result['val_freq'] == 1 else str(result['val_freq']) + ' epochs'}"
                  if result["val_iterations"] else "")
    schedule = result["schedule"]
    how = "rows interleaved" if schedule["interleaved"] else "one row at a time" + (
        ", each compiled fresh" if result["compile"] else "")
    lines = [f"{result['num_cases']} training cases ({result['cases_from']}), {iterations} per epoch{validation}; "
             f"baseline: row #1 at {result['epochs'][0]} epochs"]
    if result.get("current_epoch_s"):
        lines.append(f"anchored: your run takes {number(result['current_epoch_s'])} s per epoch "
                     "(--current-epoch-time); a row's epoch = that x its epoch time over row #1's, both measured here")
    else:
        lines.append("epochs and totals are this machine's (pass --current-epoch-time SECONDS to anchor them to "
                     "your run)")
    threads = f"{result['cpu_threads']} thread{'s' if result['cpu_threads'] != 1 else ''}"
    lines.append(f"timed on {result['device']}, torch {result['torch']}, {threads}, data cache {result['cache_mode']}: "
                 f"{schedule['warmup']} warm-up steps, {schedule['rounds']} rounds x {schedule['iterations']} steps "
                 f"+ {schedule['val_batches']} validation batch per row on {schedule['timing_cases']} cases, {how}; "
                 f"{result['seconds']:.0f} s")
    return lines


def format_estimate(result: dict[str, Any]) -> str:
    rows = result["rows"]
    unit, seconds = total_unit([row["total_s"] for row in rows if row["total_s"] is not None])
    columns = (("#", 3), ("batch", 5), ("patches/case", 12), ("patch", 14), ("epochs", 6), ("step ms", 8),
               ("it/epoch", 8), ("epoch s", 8), (f"total {unit}", 8), ("speed-up", 18), ("per sample", 18),
               ("memory GiB", 10), ("model GiB", 9))
    lines = _header_lines(result) + ["", "  ".join(f"{name:>{width}}" for name, width in columns)]
    for row in rows:
        cells = [f"#{row['index']}", str(row["batch_size"]), str(row["num_samples"]),
                 "x".join(map(str, row["patch_size"])), str(row["epochs"])]
        if not row["fits"]:
            lines.append("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns)) + f"  {row['note']}")
            continue
        cells += [
            number(row["step_ms"]), str(row["iterations_per_epoch"]),
            "-" if row["epoch_s"] is None else number(row["epoch_s"]),
            "-" if row["total_s"] is None else number(row["total_s"] / seconds),
            ratio(row["speedup"], row["baseline"]), ratio(row["per_sample"], row["baseline"]),
            "-" if row["memory_gb"] is None else f"{row['memory_gb']:.2f}",
            "-" if row["model_memory_gb"] is None else f"{row['model_memory_gb']:.2f}",
        ]
        line = "  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns))
        lines.append(line + (f"  {row['note']}" if row["note"] else ""))
    lines += [""] + [f"NOTE: {note}" for note in result["notes"]]
    lines += [f"WARNING: {warning}" for warning in result["warnings"]]
    lines.append(
        "speed-up: row #1's total time over the row's (median and min-max over the rounds, each round's rows "
        "paired); per sample: samples/s over row #1's; step: measured here; memory: CUDA reserved + context "
        "after warm-up, the data cache left out (none measured on a CPU); model: the planner's memory model"
        + (" (calibrated)" if result.get("calibrated") else ""))
    return "\n".join(lines)
