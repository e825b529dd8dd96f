"""Whole-file writes that never leave a half-written file: write a temporary sibling, then rename it.

Local or gs:// (through tf.io.gfile; on GCS the rename is a copy, so the object appears only once whole).
A crash mid-write leaves at most a `<path><marker><pid>` file, never a truncated `<path>`; a write or rename
that fails (or is interrupted) removes its temporary file.
"""

from __future__ import annotations

import os


def write_atomically(path: str, data: bytes | str, *, marker: str = ".tmp-") -> None:
    """Replaces `path` with `data` (bytes, or text written as UTF-8) in one rename, via `<path><marker><pid>`."""
    import tensorflow as tf  # Deferred: sample.py checks its arguments before paying for the TF import.

    tmp = f"{path}{marker}{os.getpid()}"
    try:
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        try:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        except tf.errors.OpError:
            pass  # The original error says more than a failed clean-up.
        raise
