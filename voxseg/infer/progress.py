"""Progress of a prediction over cases: a bar on a terminal, one plain line per case elsewhere, then a summary.

On a terminal (stderr is a TTY) a tqdm bar counts the cases and shows the last case's time; in a log file or a
pipe a bar's carriage returns are noise, so each case gets a line of its own instead:

    case_003: 4.2 s (3/10)
    case_004: failed after 0.3 s (4/10)

and both end with one summary line:

    predicted 10 case(s) in 42.3 s (4.2 s/case)
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def progress_mode(show: bool, stream: TextIO) -> str:
    """'off' when not shown, else 'bar' on a terminal and 'lines' on anything else (a file, a pipe)."""
    if not show:
        return "off"
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


class CaseProgress:
    """Reports cases as they finish (`done`) and a summary at the end (`close`).

    Args:
        total: the number of cases to predict.
        show: report at all (False: say nothing, as the Python API does by default).
        stream: where to write (default: sys.stderr at the time of the call).
    """

    def __init__(self, total: int, show: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.count, self.failed = total, 0, 0
        self.mode = progress_mode(show, self.stream)
        self.start = time.perf_counter()
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="predict", unit="case", file=self.stream)

    def done(self, name: str, seconds: float, failed: bool = False) -> None:
        """Case `name` finished (or failed) after `seconds`."""
        self.count += 1
        self.failed += int(failed)
        took = f"failed after {seconds:.1f} s" if failed else f"{seconds:.1f} s"
        if self.mode == "lines":
            print(f"{name}: {took} ({self.count}/{self.total})", file=self.stream, flush=True)
        elif self.mode == "bar":
            self.bar.set_postfix_str(f"{name}: {took}", refresh=False)
            self.bar.update()

    def summary(self) -> str:
        """'predicted 10 case(s) in 42.3 s (4.2 s/case)', with the failures counted when there were any."""
        seconds = time.perf_counter() - self.start
        per_case = f"{seconds / self.count:.1f} s/case" if self.count else "no case"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"predicted {self.count} case(s) in {seconds:.1f} s ({per_case}{failed})"

    def close(self) -> None:
        """Close the bar and write the summary line (nothing when not shown)."""
        if self.bar is not None:
            self.bar.close()
        if self.mode != "off":
            print(self.summary(), file=self.stream, flush=True)
