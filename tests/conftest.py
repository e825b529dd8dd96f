"""Test-wide environment: quiet TensorFlow, CPU-only JAX, the slow marker, and one XLA compilation cache for the
whole session.

Many tests compile the same tiny programs again: a resumed run, a second process, a test that rebuilds a model
it built before. JAX's persistent cache (a directory, inherited through the environment by the train.py and
sample.py processes the tests start) turns each repeat into a load; the cache lives only as long as the session.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu (the plan extra) never asks a cloud metadata server
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="imagen-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
