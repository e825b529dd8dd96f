"""Batches made ahead in a background thread, so the devices never wait for the host.

Reading a batch from tf.data, tokenising its captions and transferring it to the devices take host time that
would otherwise sit between two steps. `Prefetch` runs that work in one thread, `depth` batches ahead of the
loop: while step n runs, batches n+1 .. n+depth are being made and are already on the devices. One thread
keeps the order of the stream, so resuming stays exact (each batch carries its own stream position). An error
in the thread (bad data, a missing shard) is raised by the `next()` that would have returned its batch.

The training loop runs its feed at a lower CPU priority (`FEED_NICE`): where the step computes on the same cores
(CPU training, the demo), decoding then fills the time the step leaves idle instead of stalling the step's
parallel loops (demo config on 2 cores: see README, Benchmarks); on an accelerator host the devices compute, and
the feed still gets every core the loop's own thread is not using.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked producer checks whether it was closed
FEED_NICE = 10  # the training loop's feed priority, below the step's (0)


class Prefetch(Generic[T]):
    """An iterator over `make()`'s results, made `depth` ahead in a daemon thread. Close it when done."""

    def __init__(self, make: Callable[[], T], depth: int = 2, name: str = "prefetch", nice: int = 0):
        """`nice` > 0 lowers the thread's CPU priority (and that of the threads it starts) by that much."""
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._make, self._nice = make, nice
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        if self._nice:
            # Linux: a thread's own priority, inherited by the threads it starts (tf.data's, when its iterator
            # is first read here). CPU training shares its cores with the step; the step must not wait.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        try:
            while not self._closed.is_set():
                self._put((True, self._make()))
        except BaseException as error:  # handed to the consumer, in stream order
            self._put((False, error))

    def _put(self, entry: tuple[bool, object]) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        ok, value = self._queue.get()
        if not ok:
            self.close()
            raise value
        return value

    def close(self, timeout: float = 30.0) -> None:
        """Stops the thread (after the item it is making) and drops what it made ahead."""
        self._closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
