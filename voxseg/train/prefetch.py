"""Batches prepared ahead of the training step in a background thread (`BatchStream`), and how far ahead.

The stream makes exactly as many batches as it yields, so the random generators that make them end an epoch in
the same state with or without the thread (a resumed run stays exact).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

import torch
from torch import Tensor

from voxseg.errors import ConfigError

Batch = tuple[Tensor, Tensor]
"""image (B, C, *P), seg (B, 1, *P)."""


class BatchStream:
    """Yields `count` batches from `make_batch()`, prepared `depth` ahead in a background thread (0 = inline).

    Exactly `count` batches are made per iteration over the stream, so the random generators that
    `make_batch` uses end an epoch in the same state with or without prefetching (resumed runs stay exact).
    On CUDA the thread works on its own stream and the consumer waits on an event, so a batch is never read
    before its kernels finish. An exception in the thread is re-raised in the consumer; leaving the loop
    early (break, an error, or closing the iterator) stops and joins the thread. `wait_seconds` accumulates
    the time the consumer waited for data.

    Raises:
        ConfigError: a negative depth.
    """

    THREAD_NAME = "voxseg-prefetch"

    def __init__(self, make_batch: Callable[[], Batch], count: int, depth: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if depth < 0:
            raise ConfigError(f"prefetch depth {depth} must be >= 0 (0 prepares batches inline)")
        self.make_batch = make_batch
        self.count = int(count)
        self.depth = int(depth)
        self.device = torch.device(device)
        self.wait_seconds = 0.0

    def __iter__(self) -> Iterator[Batch]:
        if self.depth == 0:
            for _ in range(self.count):
                start = time.perf_counter()
                batch = self.make_batch()
                self.wait_seconds += time.perf_counter() - start
                yield batch
            return
        yield from self._threaded()

    def _threaded(self) -> Iterator[Batch]:
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        device = self.device
        if cuda and device.index is None:
            # "cuda" means the consumer's current device; a new thread's current device is always cuda:0
            device = torch.device("cuda", torch.cuda.current_device())
        thread = threading.Thread(target=self._produce, args=(slots, stop, device), name=self.THREAD_NAME,
                                  daemon=True)
        thread.start()
        try:
            for _ in range(self.count):
                start = time.perf_counter()
                item = slots.get()
                self.wait_seconds += time.perf_counter() - start
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if cuda:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)
                    for tensor in batch:
                        tensor.record_stream(current)  # the side stream's allocator must not reuse it early
                yield batch
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    slots.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _produce(self, slots: queue.Queue, stop: threading.Event, device: torch.device) -> None:
        stream = None
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the thread's current device starts as cuda:0
                stream = torch.cuda.Stream(device)
            for _ in range(self.count):
                if stop.is_set():
                    return
                event = None
                if stream is not None:
                    with torch.cuda.stream(stream):
                        batch = self.make_batch()
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch = self.make_batch()
                while not stop.is_set():
                    try:
                        slots.put((batch, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which re-raises it in the training thread
            slots.put(exc)


def prefetch_depth(configured: int, cache_mode: str) -> int:
    """The configured depth, or for -1 (auto): 0 for a device-resident cache, 2 when reads happen on the host."""
    if configured >= 0:
        return configured
    return 0 if cache_mode == "gpu" else 2
