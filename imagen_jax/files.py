"""Whole-file writes that never leave a half-written file: write a temporary sibling, then rename it.

Local or gs:// (through tf.io.gfile; on GCS the rename is a copy, so the object appears only once whole).
A crash mid-write leaves at most a `<path>.tmp-<pid>` file, never a truncated `<path>`.
"""

from __future__ import annotations

import os

import tensorflow as tf


def write_atomically(path: str, data: bytes | str) -> None:
    """Replaces `path` with `data` (bytes, or text written as UTF-8) in one rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
