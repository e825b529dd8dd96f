"""JAX's persistent compilation cache for a run, so that a restart (after a preemption, on every host of a pod)
loads the train step, the samplers and the evaluation programs instead of compiling them again.

`train.compilation_cache`: '' (the default) keeps the cache in `<workdir>/compilation_cache` (a bucket's too,
through JAX's own file layer), unless JAX already has one (JAX_COMPILATION_CACHE_DIR, or
jax.config.jax_compilation_cache_dir): then that one, which the user chose for all their runs. A path or URL puts it
there (a folder several runs share), 'off' turns it off.
Every program is written, however fast it compiled, so a second start of the same run and topology compiles
nothing (tests/test_compile_cache.py). The cache holds executables JAX runs as they are: like the checkpoints,
it is the run's own data; never point it at a folder others can write to.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator

import jax
import ml_collections
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from imagen_jax.errors import ConfigError

OFF = "off"
_EVENTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "requests",
    "/jax/compilation_cache/cache_hits": "hits",
}
_counts: collections.Counter = collections.Counter()
_listening = False


def _count(event: str, **_: object) -> None:
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> tuple[str | None, str]:
    """(where the run's compiled programs are kept or None, a line saying so). A URL JAX's file layer (etils.epath)
    cannot open is a ConfigError when train.compilation_cache names it, and turns the cache off when it comes from
    the workdir."""
    setting = str(config.train.compilation_cache)
    if setting == OFF:
        return None, "compilation cache: off (train.compilation_cache='off')"
    if not setting and jax.config.jax_compilation_cache_dir:
        path = jax.config.jax_compilation_cache_dir
        return path, f"compilation cache: {path} (JAX's, from JAX_COMPILATION_CACHE_DIR or jax.config)"
    path = setting or os.path.join(workdir, "compilation_cache")
    try:
        epath.Path(path)
    except Exception as e:  # noqa: BLE001 (etils raises KeyError, ValueError, ... for a scheme it lacks)
        if setting:
            raise ConfigError(
                f"config.train.compilation_cache={setting!r}: JAX's cache cannot open it ({type(e).__name__}: {e}); "
                "give a local path, a gs:// URL or 'off'"
            ) from None
        return None, f"compilation cache: off (JAX's cache cannot open {path})"
    return path, f"compilation cache: {path}"


@contextlib.contextmanager
def using(path: str | None) -> Iterator[None]:
    """Within the block, `path` is this process's compilation cache (None: none), whatever one was used before;
    after it, the one before again (a test process runs many workdirs)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    _set(path, 0.0)
    try:
        yield
    finally:
        _set(*before)


def _set(path: str | None, min_compile_time_s: float) -> None:
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # JAX opens its cache once per process: let it open this one
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def counts() -> tuple[int, int]:
    """(programs loaded from the cache, programs compiled) since this process started, while a cache was on."""
    return _counts["hits"], _counts["requests"] - _counts["hits"]
