"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by
NUL on file descriptors 3 and 4; the standard library is enough): open a page, put files into a file input as a
person choosing them would, click, wait for a condition, take a screenshot."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from browser import chromium


def _as_3_and_4(read_end: int, write_end: int) -> None:
    """In the child: the read end as descriptor 3 and the write end as 4, whatever numbers they had."""
    read_copy, write_copy = os.dup(read_end), os.dup(write_end)  # copies first: placing one cannot close the other
    os.dup2(read_copy, 3)
    os.dup2(write_copy, 4)


class BrowserSession:
    """One Chromium process with one page; use as a context manager."""

    def __init__(self, url: str, width: int = 1200, height: int = 800) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        command = [chromium(), "--headless", "--no-sandbox", "--hide-scrollbars", "--remote-debugging-pipe",
                   f"--window-size={width},{height}", "about:blank"]
        # the pipes become the child's descriptors 3 and 4 after the fork (close_fds would close them again)
        self.process = subprocess.Popen(command, close_fds=False, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=lambda: _as_3_and_4(to_browser_read,
                                                                                                   from_browser_write))
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.navigate", session=True, url=url)

    def __enter__(self) -> "BrowserSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read_message()
            if answer.get("id") == self._next_id:
                assert "error" not in answer, (method, answer["error"])
                return answer.get("result", {})

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 20)
            assert chunk, "Chromium closed its DevTools pipe"
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{expression} still false after {timeout} s; status: "
                             f"{self.evaluate('document.body.innerText')!r}")

    def choose_files(self, selector: str, files: list[Path]) -> None:
        """Put `files` into the file input at `selector`, as choosing them in its dialog does."""
        root = self.call("DOM.getDocument", session=True)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session=True, nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", session=True, nodeId=node, files=[str(f.resolve()) for f in files])

    def screenshot(self) -> np.ndarray:
        """The page as (H, W, 3) uint8."""
        from PIL import Image

        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
