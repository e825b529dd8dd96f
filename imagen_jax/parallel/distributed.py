"""`--distributed`: join the other processes of a multi-host run before anything touches a device.

On a TPU pod slice (or SLURM, Kubernetes, MPI) `jax.distributed.initialize()` finds its peers by itself. Anywhere
else (CPU hosts, a test over localhost) the three environment variables below say where the coordinator is and
which process this is; JAX itself reads only the first, so the other two are read here. CPU processes exchange
their collectives over gloo (JAX's CPU default has no cross-process collectives).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from imagen_jax.errors import UsageError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> None:
    """jax.distributed.initialize(), with a one-line UsageError when there is no cluster to join."""
    import jax

    count, index = os.environ.get(ENV[1]), os.environ.get(ENV[2])
    explicit: dict[str, int] = {}
    if count is not None or index is not None:
        try:
            explicit = {"num_processes": int(count or ""), "process_id": int(index or "")}
        except ValueError:
            raise UsageError(
                f"--distributed: {ENV[1]}={count!r} and {ENV[2]}={index!r} must both be integers"
            ) from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**explicit)
    except (RuntimeError, ValueError) as e:
        raise UsageError(
            f"--distributed: jax.distributed.initialize() found no cluster to join ({e}); run it on every host of "
            f"a TPU pod slice, or set {', '.join(ENV[:2])} and {ENV[2]}"
        ) from None


def process_0s(make: Callable[[], list[str]]) -> list[str]:
    """`make()` run by process 0 alone and its result handed to every process: one listing of a bucket (not one
    per host), and the same one everywhere, so that hosts split the files between them by one list (two hosts
    that saw different listings would read overlapping or missing files). One process: `make()`."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return make()
    data = np.frombuffer(json.dumps(make()).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode())
