"""The HTTP API (FastAPI): jobs, a synchronous segment call, health, readiness, metrics and the viewer page.

Every route under /v1 and /metrics asks for the bearer token when the server has one (compared in constant
time); /, /static, /healthz and /readyz do not. Refusals are JSON `{"detail": message}` with a 4xx status (503
with Retry-After when the queue is full); nothing from a request is unpickled or executed.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from voxseg.atomicio import os_error_message
from voxseg.serve.jobs import FINISHED, Job, JobStore
from voxseg.serve.metrics import Metrics
from voxseg.serve.uploads import UploadError, UploadLimits, save_upload
from voxseg.serve.worker import Worker

__all__ = ["ServeSettings", "create_app"]

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".nii.gz": "application/gzip", ".nii": "application/octet-stream", ".mha": "application/octet-stream",
               ".nrrd": "application/octet-stream"}


@dataclass
class ServeSettings:
    """What `voxseg serve` was started with (its flags).

    Attributes:
        jobs_dir: the jobs folder (`voxseg.serve.jobs`).
        token: the bearer token requests must carry (None: no token asked).
        max_queue: jobs queued or running at once; more are refused with 503 and Retry-After.
        limits: the upload limits (`voxseg.serve.uploads.UploadLimits`).
        keep_seconds: how long finished jobs and their files are kept.
        sync_timeout: how long POST /v1/segment waits for its result before answering 504.
    """

    jobs_dir: Path
    token: str | None = None
    max_queue: int = 64
    limits: UploadLimits = UploadLimits()
    keep_seconds: float = 24 * 3600.0
    sync_timeout: float = 300.0


class Refusal(Exception):
    """An HTTP refusal with its status, message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Service:
    """The state the routes share: the store, the worker, the metrics and the settings."""

    def __init__(self, predictor: Any, settings: ServeSettings, model_name: str) -> None:
        self.predictor = predictor
        self.settings = settings
        self.model_name = model_name
        self.store = JobStore(settings.jobs_dir, settings.keep_seconds)
        self.metrics = Metrics()
        self.worker = Worker(predictor, self.store, self.metrics.job_finished)

    def start(self) -> int:
        """Start the worker and queue again the jobs a previous server left queued or running; returns how many."""
        requeued = self.store.recover()
        self.worker.start()
        for job in requeued:
            self.worker.submit(job)
        return len(requeued)

    def check_token(self, request: Request) -> None:
        if self.settings.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.settings.token.encode()):
            raise Refusal(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN' with the "
                               "token of the server's --token-file", {"WWW-Authenticate": "Bearer"})

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise Refusal(404, f"no job {job_id!r} (unknown, or removed after the keep time)")
        return job

    def check_room(self, request: Request) -> None:
        """503 when the queue is full; 411/413 for a body without a length or over the limit (before reading it)."""
        counts = self.store.counts()
        if counts["queued"] + counts["running"] >= self.settings.max_queue:
            self.metrics.rejected += 1
            raise Refusal(503, f"the queue is full ({self.settings.max_queue} jobs, --max-queue); retry later",
                          {"Retry-After": "5"})
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise Refusal(411, "send the upload with a Content-Length header (no chunked uploads)")
        if int(length) > self.settings.limits.max_upload_bytes:
            raise Refusal(413, f"upload of {length} bytes; this server takes at most "
                               f"{self.settings.limits.max_upload_bytes} bytes (--max-upload-mb)")

    async def create_job(self, request: Request) -> Job:
        self.check_room(request)
        try:
            form = await request.form(max_files=self.settings.limits.max_zip_members, max_fields=16)
        except Exception as exc:  # noqa: BLE001 - the multipart parser's refusal, told to the client
            raise Refusal(400, f"not a multipart/form-data upload ({exc}); send the files in the field 'files'")
        uploads = [item for item in form.getlist("files") if hasattr(item, "filename")]
        job_id, staging = self.store.new_staging()
        try:
            saved = await run_in_threadpool(save_upload, [(u.filename, u.file) for u in uploads],
                                            self.store.staged_inputs(staging), self.predictor.plan,
                                            self.settings.limits)
        except BaseException as exc:
            await run_in_threadpool(_remove_folder, staging)
            if isinstance(exc, UploadError):
                raise Refusal(exc.status, str(exc)) from None
            if isinstance(exc, OSError):  # e.g. a full disk under the jobs folder: the server's fault, said so
                raise Refusal(507, f"the upload could not be stored: {os_error_message(exc)}") from None
            raise
        finally:
            await form.close()
        job = Job(job_id, saved.name, saved.inputs, saved.result_ending,
                  probabilities=str(form.get("probabilities", "")).lower() in ("1", "true", "yes"))
        await run_in_threadpool(self.store.add, job, staging)
        self.worker.submit(job)
        return job

    def metrics_text(self) -> str:
        return self.metrics.render(self.worker.waiting(), self.store.counts(), self.predictor.device)

    def describe(self) -> dict[str, Any]:
        plan = self.predictor.plan
        return {"ready": True, "model": self.model_name, "channels": list(plan.channel_names.values()),
                "labels": plan.labels, "device": str(self.predictor.device)}


def _remove_folder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _job_answer(job: Job) -> dict[str, Any]:
    return {**job.public(), "status_url": f"/v1/jobs/{job.id}", "result_url": f"/v1/jobs/{job.id}/result"}


def _result_file(service: Service, job: Job, probabilities: bool = False) -> FileResponse:
    if job.state != "done":
        detail = f": {job.error}" if job.error else ""
        raise Refusal(409, f"job {job.id} is {job.state}{detail}; its result is there once it is done")
    if probabilities:
        if not job.probabilities:
            raise Refusal(409, f"job {job.id} was sent without probabilities=1: send the case again with the form "
                               "field probabilities=1 to get them")
        return FileResponse(service.store.probabilities(job), media_type="application/octet-stream",
                            filename=f"{job.name}.npz")
    return FileResponse(service.store.result(job), media_type=MEDIA_TYPES.get(job.result_ending),
                        filename=f"{job.name}{job.result_ending}")


def create_app(predictor: Any, settings: ServeSettings, model_name: str = "") -> FastAPI:
    """The FastAPI application serving `predictor` (already loaded); the worker starts with the application."""
    service = Service(predictor, settings, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        expiring = asyncio.get_running_loop().create_task(_expire_loop(service))
        yield
        expiring.cancel()
        await run_in_threadpool(service.worker.stop)

    app = FastAPI(title="voxseg serve", version="1", description="Segment 3D medical images with one loaded model.",
                  lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _expire_loop(service: Service) -> None:
    interval = min(60.0, max(0.5, service.settings.keep_seconds / 4))
    while True:
        await run_in_threadpool(service.store.expire)
        await asyncio.sleep(interval)


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        return service.describe()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        service.check_token(request)
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4")

    _add_job_routes(app, service)


def _add_job_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/jobs", status_code=202)
    async def create(request: Request) -> JSONResponse:
        service.check_token(request)
        job = await service.create_job(request)
        return JSONResponse(_job_answer(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs")
    async def listing(request: Request) -> dict[str, Any]:
        service.check_token(request)
        return {"jobs": [_job_answer(job) for job in service.store.all()]}

    @app.get("/v1/jobs/{job_id}")
    async def status(job_id: str, request: Request) -> dict[str, Any]:
        service.check_token(request)
        return _job_answer(service.job(job_id))

    @app.get("/v1/jobs/{job_id}/result")
    async def result(job_id: str, request: Request, probabilities: bool = False) -> FileResponse:
        service.check_token(request)
        return _result_file(service, service.job(job_id), probabilities)

    @app.get("/v1/jobs/{job_id}/input/{channel}")
    async def input_file(job_id: str, channel: int, request: Request) -> FileResponse:
        service.check_token(request)
        job = service.job(job_id)
        files = service.store.inputs(job)
        if not 0 <= channel < len(files) or not files[channel].is_file():
            raise Refusal(404, f"job {job_id} has no channel file {channel} (a DICOM study is not kept as one file)")
        return FileResponse(files[channel], media_type="application/octet-stream")

    @app.delete("/v1/jobs/{job_id}")
    async def delete(job_id: str, request: Request) -> Response:
        service.check_token(request)
        job = service.job(job_id)
        if job.state in FINISHED:
            await run_in_threadpool(service.store.remove, job)
            return JSONResponse({"id": job_id, "state": "removed"})
        service.worker.cancel(job)
        return JSONResponse(_job_answer(job), status_code=202)

    @app.post("/v1/segment")
    async def segment(request: Request) -> FileResponse:
        service.check_token(request)
        job = await service.create_job(request)
        deadline = time.monotonic() + service.settings.sync_timeout
        while job.state not in FINISHED:
            if time.monotonic() > deadline:
                raise Refusal(504, f"job {job.id} is not done after {service.settings.sync_timeout:.0f} s; follow it "
                                   f"at /v1/jobs/{job.id}")
            await asyncio.sleep(0.02)
        if job.state == "failed":
            raise Refusal(422, f"job {job.id} failed: {job.error}")
        return _result_file(service, job)
