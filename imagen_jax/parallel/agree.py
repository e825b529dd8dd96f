"""The processes of a multi-host run agree on one number per batch (the longest caption of the global batch, which
sets the batch's token bucket: train/buckets.py) through the JAX coordination service's key-value store, on the host.

Every process must give the jitted step arrays of the same shape, so all must pick the same bucket for batch i, and
each knows only its own captions. A device collective (multihost_utils) would queue behind the steps the loop has
already dispatched and wait for them: the feed thread would make each batch only after the devices had run every
earlier step, and the devices would idle between steps. The coordination service that jax.distributed.initialize
started (process 0 hosts it) answers host to host in about a millisecond, whatever the devices are doing.

Process p publishes its value of batch i under <prefix>/<i>/<p>, then reads every process's key of batch i. Once it
has read them all, every process has published batch i, so has finished reading batch i - 1: p then deletes its own
key of batch i - 1, and the store holds at most two batches' keys per process (the last ones stay when a run ends).
The prefix numbers the agreements a process makes, in the same order on every process, so a second run in the same
processes never reads the first one's keys.
"""

from __future__ import annotations

import itertools
import threading
import time

import jax

TIMEOUT_S = 1800.0  # longer than any host's start-up skew (shuffle buffers filling, shard listings)
_POLL_MS = 500  # how often a wait checks whether it was closed
_AGREEMENTS = itertools.count()


class Closed(Exception):
    """Raised by a wait that `MaxAgreement.close()` ended."""


class MaxAgreement:
    """`agree(index, value)`: the largest `value` any process gives for batch `index` (indices 0, 1, 2, ... in
    order). One process: its own value, with no store. `close()` ends a wait for a process that will not answer
    (the loop stopping while its feed thread waits for a peer that stopped first)."""

    def __init__(self, name: str, timeout_s: float = TIMEOUT_S):
        self._count, self._me = jax.process_count(), jax.process_index()
        self._prefix = f"imagen_jax/{name}/{next(_AGREEMENTS)}"
        self._timeout_s = timeout_s
        self._closed = threading.Event()
        self._client = None
        if self._count > 1:
            from jax._src import distributed  # jax has no public API to its coordination service's store

            self._client = distributed.global_state.client
            if self._client is None:
                raise RuntimeError(f"{jax.process_count()} processes but no jax.distributed client to agree through")

    def agree(self, index: int, value: int) -> int:
        if self._client is None:
            return value
        self._client.key_value_set(self._key(index, self._me), str(value))
        values = [int(self._get(index, process)) for process in range(self._count)]
        if index > 0:
            self._client.key_value_delete(self._key(index - 1, self._me))
        return max(values)

    def close(self) -> None:
        self._closed.set()

    def _key(self, index: int, process: int) -> str:
        return f"{self._prefix}/{index}/{process}"

    def _get(self, index: int, process: int) -> str:
        """Process `process`'s value of batch `index`, waited for in slices so that `close()` ends the wait."""
        deadline = time.monotonic() + self._timeout_s
        while not self._closed.is_set():
            try:
                return self._client.blocking_key_value_get(self._key(index, process), _POLL_MS)
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {process} gave no value for batch {index} ({self._prefix}) in {self._timeout_s:.0f} s"
                )
        raise Closed(f"{self._prefix}: closed while waiting for process {process}'s value of batch {index}")
