"""The jobs folder: one folder per job, holding its uploaded files, its record and its result.

    JOBS/<id>/job.json          the record (state, times, error), replaced atomically on every change
    JOBS/<id>/inputs/           the channel files as uploaded (renamed channel_0000.nii.gz, ...), or dicom/
    JOBS/<id>/result.<ending>   the label map, written atomically when the job is done

A job's folder is built in a staging folder and renamed into place, so a job either exists whole or not at
all. A server that restarts reads every record: done, failed and cancelled jobs are listed as they were,
queued and running jobs are queued again (nothing silently lost). Finished jobs older than the keep time are
removed with their files.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from voxseg.atomicio import staging_folder, sweep_stale_staging, write_text

__all__ = ["FINISHED", "STATES", "Job", "JobStore"]

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
RECORD_NAME = "job.json"
INPUTS_NAME = "inputs"
RESULT_STEM = "result"


@dataclass
class Job:
    """A job's record: what was uploaded, where it stands, how long each step took.

    Attributes:
        id: a random hex id (also the job folder's name).
        name: the case name shown to users (from the upload's file names; never used as a path).
        inputs: the channel files' names inside the job's inputs folder, in channel order ("dicom" for a study).
        result_ending: the result file's ending (".nii.gz", ".mha", ".nrrd").
        state: one of `STATES`.
        stage: what the worker is doing ("waiting", "reading", "predicting", "writing", "finished").
        created, started, finished: Unix times (None until reached).
        timings: seconds per step ("read", "predict", "write").
        error: the message of a failed job.
        cancel_requested: a DELETE arrived while the job was running: its result is dropped.
        probabilities: also write the probabilities (`Predictor.predict_files`' NAME.npz: float16, class names).
    """

    id: str
    name: str
    inputs: list[str]
    result_ending: str
    state: str = "queued"
    stage: str = "waiting"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    probabilities: bool = False

    @property
    def progress(self) -> float:
        """A fraction for progress bars: 0 queued, 0.1 reading, 0.2 predicting, 0.9 writing, 1 finished."""
        if self.state in FINISHED:
            return 1.0
        return {"reading": 0.1, "predicting": 0.2, "writing": 0.9}.get(self.stage, 0.0)

    def public(self) -> dict[str, Any]:
        """The record as the API shows it."""
        shown = asdict(self)
        shown.pop("inputs")
        shown["progress"] = self.progress
        return shown


class JobStore:
    """The jobs folder and the records of its jobs, safe to use from several threads.

    Args:
        root: the jobs folder (created when absent).
        keep_seconds: how long a finished job and its files are kept.
    """

    def __init__(self, root: str | Path, keep_seconds: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    # ----- paths ------------------------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def inputs(self, job: Job) -> list[Path]:
        return [self.folder(job.id) / INPUTS_NAME / name for name in job.inputs]

    def result(self, job: Job) -> Path:
        return self.folder(job.id) / f"{RESULT_STEM}{job.result_ending}"

    def probabilities(self, job: Job) -> Path:
        return self.folder(job.id) / f"{RESULT_STEM}.npz"

    # ----- records ----------------------------------------------------------------------------------------------
    def new_staging(self) -> tuple[str, Path]:
        """(a fresh job id, a staging folder whose INPUTS_NAME subfolder the upload is written into)."""
        job_id = uuid.uuid4().hex
        staging = staging_folder(self.folder(job_id), "upload")
        (staging / INPUTS_NAME).mkdir()
        return job_id, staging

    @staticmethod
    def staged_inputs(staging: Path) -> Path:
        return staging / INPUTS_NAME

    def add(self, job: Job, staging: Path) -> None:
        """Write the job's record into its staging folder and rename the folder into place."""
        write_text(staging / RECORD_NAME, json.dumps(asdict(job)))
        os.replace(staging, self.folder(job.id))
        with self._lock:
            self._jobs[job.id] = job

    def save(self, job: Job) -> None:
        """Replace the job's record on disk (atomically) with its current fields."""
        with self._lock:  # the worker, the I/O threads and the routes change a job's fields
            text = json.dumps(asdict(job))
            removed = job.id not in self._jobs
        if removed:
            return
        try:
            write_text(self.folder(job.id) / RECORD_NAME, text)
        except FileNotFoundError:  # removed (DELETE, keep time) while this record was written: nothing to keep
            if self.folder(job.id).is_dir():
                raise

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created)

    def remove(self, job: Job) -> None:
        """Forget the job and delete its folder: renamed away first (with the record, under the lock), so that
        once the job is unknown its folder is gone too; deleted after (a killed server's leftover is swept)."""
        doomed = self.root / f".{job.id}.removed-{os.getpid()}-{secrets.token_hex(3)}"
        with self._lock:
            self._jobs.pop(job.id, None)
            try:
                os.replace(self.folder(job.id), doomed)
            except FileNotFoundError:
                return
        shutil.rmtree(doomed, ignore_errors=True)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for job in self.all():
            counts[job.state] += 1
        return counts

    # ----- restart and retention --------------------------------------------------------------------------------
    def recover(self) -> list[Job]:
        """Read every job folder (after a restart); returns the jobs to queue again, oldest first: those that
        were queued or running (their state set back to queued). Unreadable records are skipped."""
        sweep_stale_staging_all(self.root)  # uploads cut off by a killed server
        requeue = []
        for folder in sorted(self.root.iterdir()):
            record = folder / RECORD_NAME
            if folder.name.startswith(".") or not record.is_file():
                continue
            try:
                job = Job(**json.loads(record.read_text()))
            except (ValueError, TypeError, OSError):
                continue
            if job.state not in FINISHED:
                job.state, job.stage, job.started = "queued", "waiting", None
                self.save(job)
                requeue.append(job)
            with self._lock:
                self._jobs[job.id] = job
        return sorted(requeue, key=lambda job: job.created)

    def expire(self, now: float | None = None) -> list[str]:
        """Remove finished jobs older than the keep time; returns their ids."""
        now = time.time() if now is None else now
        old = [job for job in self.all() if job.state in FINISHED and job.finished is not None
               and now - job.finished > self.keep_seconds]
        for job in old:
            self.remove(job)
        return [job.id for job in old]


def sweep_stale_staging_all(root: Path) -> list[Path]:
    """Upload staging folders (`.ID.upload-PID-XXXX`) of server processes that are gone."""
    stale: list[Path] = []
    names = {entry.name.split(".")[1] for entry in root.iterdir() if entry.name.startswith(".") and entry.is_dir()
             and entry.name.count(".") >= 2}
    for name in names:
        stale += sweep_stale_staging(root / name)
    return stale
