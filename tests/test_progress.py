"""Progress of `voxseg predict` over cases: a bar on a terminal, a plain line per case elsewhere, a summary."""
from __future__ import annotations

import io
import re

from voxseg.infer.progress import CaseProgress, progress_mode


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report(stream: io.StringIO, show: bool = True) -> CaseProgress:
    progress = CaseProgress(3, show, stream)
    progress.done("case_001", 4.24)
    progress.done("case_002", 0.31, failed=True)
    progress.done("case_003", 12.0)
    progress.close()
    return progress


def test_without_a_terminal_each_case_gets_a_plain_line_then_the_summary():
    stream = io.StringIO()
    progress = _report(stream)
    lines = stream.getvalue().splitlines()
    assert progress.mode == "lines" and "\r" not in stream.getvalue()
    assert lines[:3] == ["case_001: 4.2 s (1/3)", "case_002: failed after 0.3 s (2/3)", "case_003: 12.0 s (3/3)"]
    assert re.fullmatch(r"predicted 3 case\(s\) in \d+\.\d s \(\d+\.\d s/case, 1 failed\)", lines[3])
    assert len(lines) == 4


def test_on_a_terminal_a_bar_counts_the_cases_with_the_last_case_time():
    stream = Terminal()
    progress = _report(stream)
    text = stream.getvalue()
    assert progress.mode == "bar" and "\r" in text  # redrawn in place
    assert "3/3" in text and "case_003: 12.0 s" in text and "(1/3)" not in text  # no plain lines
    assert re.search(r"\npredicted 3 case\(s\) in \d+\.\d s \(\d+\.\d s/case, 1 failed\)\n$", text)


def test_not_shown_says_nothing():
    stream = Terminal()
    assert _report(stream, show=False).mode == "off" and stream.getvalue() == ""
    assert progress_mode(True, io.StringIO()) == "lines" and progress_mode(True, Terminal()) == "bar"
    assert progress_mode(False, Terminal()) == "off"
    assert CaseProgress(0, True, io.StringIO()).summary().startswith("predicted 0 case(s) in")
