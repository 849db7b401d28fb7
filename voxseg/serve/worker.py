"""One worker thread runs the jobs back to back on the loaded Predictor: while the device predicts a case, the
next queued job is read on an I/O thread and the previous result is written on another, so the device waits
neither for the disk nor for decoding (the same read-ahead / write-behind as `Predictor.predict_files`)."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from voxseg.atomicio import atomic_path
from voxseg.data.io import Geometry, write_image
from voxseg.errors import InputError, VoxsegError
from voxseg.infer.casefiles import save_probabilities
from voxseg.infer.inputs import read_input_case
from voxseg.infer.postprocess import apply_postprocessing
from voxseg.serve.jobs import Job, JobStore
from voxseg.serve.uploads import DICOM_FOLDER

__all__ = ["Worker"]


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, (VoxsegError, OSError)):
        return str(exc)
    return f"internal error while predicting ({type(exc).__name__}: {exc}); the server keeps serving"


class Worker:
    """The job queue and the thread that empties it.

    Args:
        predictor: the loaded Predictor (`voxseg.infer.predictor.Predictor`).
        store: the jobs folder.
        on_finished: called with each job once it is done, failed or cancelled (metrics).
    """

    def __init__(self, predictor: Any, store: JobStore, on_finished: Callable[[Job], None] | None = None) -> None:
        self.predictor = predictor
        self.store = store
        self.on_finished = on_finished or (lambda job: None)
        self._queue: deque[str] = deque()
        self._wake = threading.Condition()
        self._io = ThreadPoolExecutor(2, thread_name_prefix="voxseg-serve-io")
        self._spec = predictor.postprocessing_spec()
        self._stop = False
        self._ahead: tuple[Job, Future] | None = None  # the next job, being read while the device works
        self._thread = threading.Thread(target=self._run, name="voxseg-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=30)
        self._io.shutdown(wait=True)

    # ----- the queue --------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._wake:
            self._queue.append(job.id)
            self._wake.notify()

    def waiting(self) -> int:
        """Jobs queued and not yet taken by the worker."""
        with self._wake:
            return len(self._queue)

    def cancel(self, job: Job) -> None:
        """A queued job is cancelled now; a running one when its prediction ends (its result is dropped)."""
        with self._wake:
            if job.id in self._queue:
                self._queue.remove(job.id)
                self._finish(job, "cancelled")
                return
        job.cancel_requested = True
        self.store.save(job)

    def _take(self, block: bool) -> Job | None:
        with self._wake:
            while block and not self._queue and not self._stop:
                self._wake.wait(timeout=1.0)
            if self._stop or not self._queue:
                return None
            job = self.store.get(self._queue.popleft())
        if job is not None:
            job.state, job.stage, job.started = "running", "reading", time.time()
            self.store.save(job)
        return job

    # ----- the loop ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        """The worker thread: jobs one after the other until `stop`; nothing a job does ends it."""
        while not self._stop:
            try:
                self._run_jobs()
            except Exception:  # noqa: BLE001 - the jobs folder changed under a job (e.g. removed): go on
                logging.getLogger(__name__).exception("voxseg serve: the worker recovered from an error")

    def _run_jobs(self) -> None:
        while not self._stop:
            if self._ahead is None:
                job = self._take(block=True)
                if job is None:
                    continue
                self._ahead = (job, self._io.submit(self._read, job))
            job, reading = self._ahead
            self._ahead = None
            try:
                image, geometry = reading.result()
            except BaseException as exc:  # noqa: BLE001 - reported in the job, the worker goes on
                self._fail(job, exc)
                continue
            if job.cancel_requested:  # cancelled while it was read ahead: no device time spent on it
                self._finish(job, "cancelled")
                continue
            following = self._take(block=False)  # read the next job while this one is on the device
            if following is not None:  # kept on the worker: an error in this job's steps does not lose it
                self._ahead = (following, self._io.submit(self._read, following))
            self._predict(job, image, geometry)

    def _read(self, job: Job) -> tuple[np.ndarray, Geometry]:
        start = time.perf_counter()
        files: list[Any] = self.store.inputs(job)
        if job.inputs == [DICOM_FOLDER]:
            from voxseg.infer.dicom_cases import dicom_input_cases

            cases = dicom_input_cases(files[0], self.predictor.plan)
            if len(cases) != 1:
                raise InputError(f"the zip holds {len(cases)} DICOM studies; send one study per job")
            files = cases[0][1]
        case = read_input_case(job.name, files, self.predictor.plan)
        job.timings = {**job.timings, "read": round(time.perf_counter() - start, 4)}  # replaced, never changed
        return case

    def _predict(self, job: Job, image: np.ndarray, geometry: Geometry) -> None:
        job.stage = "predicting"
        self.store.save(job)
        start = time.perf_counter()
        try:
            predicted = self.predictor.predict_array(image, geometry, job.probabilities, name=job.name)
            labels, probabilities = predicted if job.probabilities else (predicted, None)
            labels = apply_postprocessing(labels, self._spec)
        except BaseException as exc:  # noqa: BLE001 - reported in the job, the worker goes on
            self._fail(job, exc)
            return
        job.timings = {**job.timings, "predict": round(time.perf_counter() - start, 4)}
        if job.cancel_requested:
            self._finish(job, "cancelled")
            return
        job.stage = "writing"
        self._io.submit(self._write, job, labels, geometry, probabilities)

    def _write(self, job: Job, labels: np.ndarray, geometry: Geometry, probabilities: np.ndarray | None) -> None:
        start = time.perf_counter()
        try:
            if probabilities is not None:  # first: a job is done once its label map exists
                save_probabilities(self.store.probabilities(job), probabilities, self.predictor.class_names)
            with atomic_path(self.store.result(job)) as staged:
                write_image(staged, labels, geometry)
        except BaseException as exc:  # noqa: BLE001
            self._fail(job, exc)
            return
        job.timings = {**job.timings, "write": round(time.perf_counter() - start, 4)}
        self._finish(job, "done")

    def _fail(self, job: Job, exc: BaseException) -> None:
        job.error = _failure_message(exc)
        self._finish(job, "failed")

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.stage, job.finished = state, "finished", time.time()
        self.store.save(job)
        self.on_finished(job)
