"""Metrics to the console and to TensorBoard event files in the workdir (process 0 only), flushed every
FLUSH_EVERY_S seconds and at the end.

Event files for a remote workdir (gs://...) go through tf.io.gfile, like everything else in a workdir:
tensorboardX's own gs:// writer needs google-cloud-storage and re-uploads the whole file at every flush.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import jax
import numpy as np
import tensorflow as tf
from tensorboardX import record_writer, summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

from imagen_jax.train.host_writes import HostWrites

FLUSH_EVERY_S = 30  # a bucket's file is uploaded whole at each flush: not at every event


class _GFileWriterFactory:
    """tensorboardX writer factory over tf.io.gfile: one open GFile per event file, flushed on flush()."""

    def open(self, path: str) -> tf.io.gfile.GFile:
        return tf.io.gfile.GFile(path, "wb")

    def directory_check(self, path: str) -> None:
        tf.io.gfile.makedirs(path)


def _register_scheme(workdir: str) -> None:
    if "://" in workdir:
        record_writer.register_writer_factory(workdir.split("://", 1)[0], _GFileWriterFactory())


class MetricWriter:
    """Writes scalars and image grids; a no-op on processes other than 0 so logs are not duplicated.

    Events are written in the caller's thread (tensorboardX's SummaryWriter writes from a thread of its own, which
    dies at the first failed write, after which its queue fills and the run hangs) and every write goes through
    `HostWrites`: retried, then skipped. A failed events file is dropped and the next write opens a new one."""

    def __init__(
        self,
        workdir: str,
        echo: Callable[[str], None] = functools.partial(print, flush=True),
        writes: HostWrites | None = None,
    ):
        self.active = jax.process_index() == 0
        self.echo = echo
        self.writes = HostWrites(echo) if writes is None else writes
        self.logdir = os.path.join(workdir, "tensorboard")
        self.events: EventsWriter | None = None  # opened by the first write
        self.opened = 0  # events files opened: a new one after a failure gets a name of its own
        self.flushed = time.monotonic()
        if self.active:
            _register_scheme(workdir)

    def scalars(self, step: int, values: dict[str, float], suffix: str = "") -> None:
        """Logs `values` at `step` to TensorBoard and as one console line 'step N: k=v, ...; suffix'."""
        if not self.active:
            return
        self._write(step, "scalars", [summary.scalar(name, float(value)) for name, value in values.items()])
        self.echo(
            f"step {step}: "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            + (f"; {suffix}" if suffix else "")
        )

    def image(self, step: int, name: str, grid: np.ndarray) -> None:
        """grid: uint8 [H,W,3]."""
        if self.active:
            self._write(step, f"image {name!r}", [summary.image(name, grid, dataformats="HWC")])

    def text(self, step: int, name: str, value: str) -> None:
        if self.active:
            self._write(step, f"text {name!r}", [summary.text(name, value)])

    def flush(self) -> None:
        if self.active and self.events is not None:
            self.writes.attempt("TensorBoard", "pending events", self._flush)

    def close(self) -> None:
        self.flush()
        self._drop()

    def _write(self, step: int, what: str, summaries: list) -> None:
        def write() -> None:
            try:
                if self.events is None:
                    tf.io.gfile.makedirs(self.logdir)
                    self.opened += 1
                    suffix = "" if self.opened == 1 else f".{self.opened}"
                    self.events = EventsWriter(os.path.join(self.logdir, "events"), filename_suffix=suffix)
                for s in summaries:
                    self.events.write_event(event_pb2.Event(summary=s, step=step, wall_time=time.time()))
                if time.monotonic() - self.flushed > FLUSH_EVERY_S:
                    self._flush()
            except Exception:
                self._drop()
                raise

        self.writes.attempt("TensorBoard", f"step {step}'s {what}", write)

    def _flush(self) -> None:
        self.events.flush()
        self.flushed = time.monotonic()

    def _drop(self) -> None:
        """Closes the events file, or forgets it when it cannot be closed (the next write opens another)."""
        events, self.events = self.events, None
        if events is not None:
            try:
                events.close()
            except Exception:  # noqa: BLE001,S110 (already failing: the write that called this reports it)
                pass


def _fmt(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
