"""Local folders through the standard library, anything with a scheme (gs://...) through TensorFlow's
tf.io.gfile: a host that samples from and into local folders needs no TensorFlow installed.

`for_path(path)` returns an object with the tf.io.gfile calls this project uses (exists, isdir, listdir,
makedirs, glob, remove, rename, GFile) and `errors`, the exception types they raise.
"""

from __future__ import annotations

import glob
import os
import types
from typing import Any

from imagen_jax.errors import UsageError


def _makedirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def _rename(src: str, dst: str, overwrite: bool = False) -> None:
    if not overwrite and os.path.exists(dst):
        raise FileExistsError(f"{dst} exists")
    os.replace(src, dst)


LOCAL = types.SimpleNamespace(
    exists=os.path.exists, isdir=os.path.isdir, listdir=os.listdir, makedirs=_makedirs, glob=glob.glob,
    remove=os.remove, rename=_rename, GFile=open, errors=(OSError,),
)  # fmt: skip


def for_path(path: str) -> Any:
    """The file functions for `path`: the standard library's for a local path, tf.io.gfile's for a URL."""
    if "://" not in path:
        return LOCAL
    try:
        import tensorflow as tf
    except ImportError:
        raise UsageError(
            f"{path}: paths with a scheme are reached through TensorFlow's tf.io.gfile, which is not installed "
            "here (pip install tensorflow-cpu), or use a local folder"
        ) from None
    gfile = tf.io.gfile
    return types.SimpleNamespace(
        exists=gfile.exists, isdir=gfile.isdir, listdir=gfile.listdir, makedirs=gfile.makedirs, glob=gfile.glob,
        remove=gfile.remove, rename=gfile.rename, GFile=gfile.GFile, errors=(OSError, tf.errors.OpError),
    )  # fmt: skip
