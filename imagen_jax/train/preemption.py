"""Preemption: SIGTERM (what a TPU VM preemption or a scheduler sends) ends training cleanly at a step
boundary with a checkpoint, instead of killing it mid-step.

One process: a Python SIGTERM handler sets a flag that the loop reads after each step. Several processes:
every host must stop at the same step or the last collectives hang, so the decision comes from JAX's
preemption sync point (via orbax's `CheckpointManager.reached_preemption`): the coordination service hears
of the signal on any host and picks one step at which all hosts report True.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import orbax.checkpoint as ocp


class PreemptionWatch:
    """`with PreemptionWatch(manager) as watch:` ... `if watch.reached(step): save and stop`."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.signalled = False
        self._previous = None
        # Python handlers only work in the main thread; multi-process runs rely on JAX's own handler.
        self._own_handler = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True
        print("received SIGTERM: finishing the current step, then checkpointing and exiting", flush=True)

    def __enter__(self) -> PreemptionWatch:
        if self._own_handler:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._own_handler:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Whether training must stop after `step` (all processes agree on the answer)."""
        if self._own_handler:
            return self.signalled
        return self.manager.reached_preemption(step)
