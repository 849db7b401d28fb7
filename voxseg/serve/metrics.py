"""`GET /metrics` in the Prometheus text format: queue length, jobs by state, a histogram of job latency
(upload to result), process memory and, on CUDA, device memory."""
from __future__ import annotations

import threading
from typing import Any

from voxseg.serve.jobs import Job

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Metrics:
    """Counters kept by the server; `render` writes them with the current queue and job counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bucket_counts = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0
        self.rejected = 0

    def job_finished(self, job: Job) -> None:
        """Count a finished job's latency (done jobs only: from its upload to its result on disk)."""
        if job.state != "done" or job.finished is None:
            return
        seconds = job.finished - job.created
        with self._lock:
            self._latency_sum += seconds
            self._latency_count += 1
            for index, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self._bucket_counts[index] += 1

    def render(self, queue_length: int, states: dict[str, int], device: Any) -> str:
        lines = ["# HELP voxseg_queue_length Jobs waiting for the worker.", "# TYPE voxseg_queue_length gauge",
                 f"voxseg_queue_length {queue_length}",
                 "# HELP voxseg_jobs Jobs in the jobs folder by state.", "# TYPE voxseg_jobs gauge"]
        lines += [f'voxseg_jobs{{state="{state}"}} {count}' for state, count in states.items()]
        lines += ["# HELP voxseg_rejected_total Uploads refused because the queue was full.",
                  "# TYPE voxseg_rejected_total counter", f"voxseg_rejected_total {self.rejected}",
                  "# HELP voxseg_job_latency_seconds From upload to result, done jobs.",
                  "# TYPE voxseg_job_latency_seconds histogram"]
        with self._lock:
            lines += [f'voxseg_job_latency_seconds_bucket{{le="{bound}"}} {count}'
                      for bound, count in zip(LATENCY_BUCKETS, self._bucket_counts)]
            lines += [f'voxseg_job_latency_seconds_bucket{{le="+Inf"}} {self._latency_count}',
                      f"voxseg_job_latency_seconds_sum {self._latency_sum:.6f}",
                      f"voxseg_job_latency_seconds_count {self._latency_count}"]
        lines += ["# HELP voxseg_process_resident_bytes Resident memory of the server process.",
                  "# TYPE voxseg_process_resident_bytes gauge", f"voxseg_process_resident_bytes {_resident_bytes()}"]
        if getattr(device, "type", "") == "cuda":
            import torch

            lines += ["# HELP voxseg_device_memory_bytes CUDA memory allocated by the server.",
                      "# TYPE voxseg_device_memory_bytes gauge",
                      f"voxseg_device_memory_bytes {torch.cuda.memory_allocated(device)}"]
        return "\n".join(lines) + "\n"
