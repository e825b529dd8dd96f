"""Whole-file writes that never leave a half-written file: write a temporary sibling, then rename it.

Local, or gs:// through tf.io.gfile (filesystem.py; on GCS the rename is a copy, so the object appears only once
whole).
A crash mid-write leaves at most a `<path><marker><pid>` file, never a truncated `<path>`; a write or rename
that fails (or is interrupted) removes its temporary file.
"""

from __future__ import annotations

import os

from imagen_jax import filesystem


def write_atomically(path: str, data: bytes | str, *, marker: str = ".tmp-") -> None:
    """Replaces `path` with `data` (bytes, or text written as UTF-8) in one rename, via `<path><marker><pid>`."""
    fs = filesystem.for_path(path)
    tmp = f"{path}{marker}{os.getpid()}"
    try:
        with fs.GFile(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        fs.rename(tmp, path, overwrite=True)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.remove(tmp)
        except fs.errors:
            pass  # The original error says more than a failed clean-up.
        raise
