"""Metrics to the console and to TensorBoard event files in the workdir (process 0 only).

Event files for a remote workdir (gs://...) go through tf.io.gfile, like everything else in a workdir:
tensorboardX's own gs:// writer needs google-cloud-storage and re-uploads the whole file at every flush.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import numpy as np
import tensorflow as tf
from tensorboardX import SummaryWriter, record_writer


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
    """Writes scalars and image grids; a no-op on processes other than 0 so logs are not duplicated."""

    def __init__(self, workdir: str, echo: Callable[[str], None] = functools.partial(print, flush=True)):
        self.active = jax.process_index() == 0
        self.echo = echo
        if self.active:
            _register_scheme(workdir)
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.active else None

    def scalars(self, step: int, values: dict[str, float], suffix: str = "") -> None:
        """Logs `values` at `step` to TensorBoard and as one console line 'step N: k=v, ...; suffix'."""
        if not self.active:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), step)
        self.echo(
            f"step {step}: "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            + (f"; {suffix}" if suffix else "")
        )

    def image(self, step: int, name: str, grid: np.ndarray) -> None:
        """grid: uint8 [H,W,3]."""
        if self.active:
            self.writer.add_image(name, grid, step, dataformats="HWC")

    def text(self, step: int, name: str, value: str) -> None:
        if self.active:
            self.writer.add_text(name, value, step)

    def flush(self) -> None:
        if self.active:
            self.writer.flush()

    def close(self) -> None:
        if self.active:
            self.writer.close()


def _fmt(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
