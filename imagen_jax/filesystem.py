"""Local folders through the standard library, anything with a scheme (gs://...) through TensorFlow's
tf.io.gfile: a host that samples from and into local folders needs no TensorFlow installed.

`for_path(path)` returns an object with the tf.io.gfile calls this project uses (exists, isdir, listdir,
makedirs, glob, remove, rename, GFile) and `errors`, the exception types they raise. `local_copy(path)` gives a
local path for readers that need one (safetensors maps its file; transformers reads tokenizer folders).
"""

from __future__ import annotations

import glob
import hashlib
import os
import posixpath
import shutil
import sys
import types
from typing import Any

from imagen_jax.errors import MissingError, UsageError


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


def cache_root() -> str:
    """Where copies of URL files live: $IMAGEN_JAX_CACHE, else ~/.cache/imagen_jax."""
    return os.environ.get("IMAGEN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imagen_jax")


def local_copy(path: str) -> str:
    """`path` itself when local; for a URL, a copy in the local cache, made once and reused while its size is the
    URL's. Files of one URL folder land in one local folder (named by a hash of the URL folder), so a folder's
    files copied one by one make a local folder. The copy is written under a temporary name and renamed when
    its size is checked, so an interrupted copy is never taken for a whole one."""
    fs = for_path(path)
    if fs is LOCAL:
        return path
    if not fs.exists(path) or fs.isdir(path):
        raise MissingError(f"{path}: file not found")
    parent, name = posixpath.split(path.rstrip("/"))
    folder = os.path.join(cache_root(), hashlib.sha256(parent.encode()).hexdigest()[:16])
    local = os.path.join(folder, name)
    with fs.GFile(path, "rb") as src:
        size = src.size()
        if os.path.isfile(local) and os.path.getsize(local) == size:
            return local
        os.makedirs(folder, exist_ok=True)
        print(f"copying {path} ({size / 2**20:.1f} MiB) to {local}", file=sys.stderr, flush=True)
        partial = f"{local}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 64 * 2**20)
            if os.path.getsize(partial) != size:
                raise OSError(f"{path}: copied {os.path.getsize(partial)} bytes of {size}")
            os.replace(partial, local)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return local
