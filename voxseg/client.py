"""A small client of `voxseg serve`, on the standard library only.

    >>> from voxseg.client import segment
    >>> segment("http://127.0.0.1:8000", ["case_0000.nii.gz"], output="case_seg.nii.gz")   # -> Path
    >>> labels, geometry = segment("http://127.0.0.1:8000", ["case_0000.nii.gz"])           # -> arrays

`segment` uploads a case as a job (POST /v1/jobs), polls its status and downloads its result; `submit`,
`status` and `result` are the three steps on their own.
"""
from __future__ import annotations

import json
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ServerError", "result", "segment", "status", "submit"]


class ServerError(Exception):
    """The server refused or failed a request: `status` is the HTTP status, the message the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _request(url: str, token: str | None, data: bytes | None = None, headers: dict[str, str] | None = None,
             method: str = "GET", timeout: float = 600.0) -> bytes:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the caller's server
            return response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body)["detail"]
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace")
        raise ServerError(exc.code, str(message)) from None
    except urllib.error.URLError as exc:
        if data is not None and isinstance(exc.reason, (BrokenPipeError, ConnectionResetError)):
            raise ServerError(413, f"the server closed the connection while {len(data)} bytes were sent: the upload "
                                   "is probably over its limit (voxseg serve --max-upload-mb)") from None
        raise


def _multipart(files: Sequence[str | Path], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The files as a multipart/form-data body in the field 'files' (only their names are sent, not paths), and
    the plain `fields`."""
    boundary = f"voxseg-{secrets.token_hex(12)}"
    body = bytearray()
    for name, value in (fields or {}).items():
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    for path in map(Path, files):
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode()
        body += path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def submit(url: str, files: Sequence[str | Path], token: str | None = None, timeout: float = 600.0,
           probabilities: bool = False) -> dict[str, Any]:
    """Upload one case (its channel files in channel order, or one zip) as a job; returns the job's status.
    With `probabilities` the job also keeps the probabilities (`result(..., probabilities=True)`)."""
    body, content_type = _multipart(files, {"probabilities": "1"} if probabilities else None)
    answer = _request(f"{url.rstrip('/')}/v1/jobs", token, body, {"Content-Type": content_type}, "POST", timeout)
    return json.loads(answer)


def status(url: str, job_id: str, token: str | None = None) -> dict[str, Any]:
    """A job's status: state, stage, progress, timings, error."""
    return json.loads(_request(f"{url.rstrip('/')}/v1/jobs/{job_id}", token))


def result(url: str, job_id: str, output: str | Path, token: str | None = None, probabilities: bool = False) -> Path:
    """Download a done job's label map to `output` (with `probabilities`: its NAME.npz, "probabilities" (K, D, H,
    W) float16 and "class_names", for a job submitted with probabilities)."""
    query = "?probabilities=1" if probabilities else ""
    data = _request(f"{url.rstrip('/')}/v1/jobs/{job_id}/result{query}", token)
    output = Path(output)
    output.write_bytes(data)
    return output


def segment(url: str, files: Sequence[str | Path], token: str | None = None, output: str | Path | None = None,
            timeout: float = 600.0, poll_seconds: float = 0.2) -> Any:
    """Segment one case with the server at `url`.

    Args:
        url: the server, e.g. "http://127.0.0.1:8000".
        files: the case's channel files in channel order (or one zip of them, or of a DICOM study).
        token: the server's bearer token, if it has one.
        output: where to write the label map (the input's format); None: return it as arrays instead.
        timeout: seconds to wait for the job to finish.
        poll_seconds: time between status requests.

    Returns:
        The output path, or (labels, geometry) (`voxseg.data.io.read_image`) without `output`.

    Raises:
        ServerError: the upload was refused, or the job failed (the server's message), or took over `timeout`.
    """
    job = submit(url, files, token)
    deadline = time.monotonic() + timeout
    while job["state"] not in ("done", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise ServerError(504, f"job {job['id']} not done after {timeout} s")
        time.sleep(poll_seconds)
        job = status(url, job["id"], token)
    if job["state"] != "done":
        raise ServerError(422, f"job {job['id']} {job['state']}: {job.get('error')}")
    if output is not None:
        return result(url, job["id"], output, token)
    from voxseg.data.io import read_image

    with tempfile.TemporaryDirectory() as folder:
        path = result(url, job["id"], Path(folder) / f"result{job['result_ending']}", token)
        return read_image(path)
