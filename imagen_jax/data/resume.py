"""The data stream's position in a checkpoint: gathered from every process, restored per process.

Each process reads its own files and counts its own epochs, so a checkpoint stores one position per process:
{"process_count": P, "positions": [[epoch, index], ...]}. A run resumed on the same number of processes
continues every stream exactly where it stopped. On a different number of processes the file assignment
changes, so positions cannot carry over: every process starts a fresh epoch numbered one past the largest
saved epoch (with the new assignment, so each file is still read once per epoch and nothing is repeated
twice in a row); the unread rest of the interrupted epoch is not seen. This is logged when it happens.
DreamBooth's class stream (data.prior_shards) keeps its own positions beside them, under "prior_positions".
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from imagen_jax.data.pipeline import Position
from imagen_jax.errors import DataError

PRIOR = "prior_positions"  # DreamBooth's class stream (data.prior_shards), beside the instance stream's


def _gathered(position: Position) -> list[list[int]]:
    local = np.array([position.epoch, position.index], np.int64)
    stacked = multihost_utils.process_allgather(local) if jax.process_count() > 1 else local[None]
    return np.asarray(stacked).reshape(-1, 2).tolist()


def gather_positions(position: Position, prior: Position | None = None) -> dict:
    """All processes' stream positions as the checkpoint's JSON item, with the class stream's under PRIOR when
    there is one. A collective: every process calls it."""
    item = {"process_count": int(jax.process_count()), "positions": _gathered(position)}
    if prior is not None:
        item[PRIOR] = _gathered(prior)
    return item


def prior_start_position(saved: dict | None, process_index: int, process_count: int) -> tuple[Position, str]:
    """`start_position` of the class stream (data.prior_shards); a checkpoint saved without one starts it afresh."""
    if saved and PRIOR not in saved:
        return Position(0, 0), "prior data: the checkpoint holds no class-image position; starting at epoch 0"
    position, message = start_position(saved and {**saved, "positions": saved[PRIOR]}, process_index, process_count)
    return position, f"prior {message}"


def start_position(saved: dict | None, process_index: int, process_count: int) -> tuple[Position, str]:
    """Where this process's stream starts, given a checkpoint's data item (None for a new run), and a line
    for the log saying so."""
    if not saved:
        return Position(0, 0), "data: starting at epoch 0"
    if "positions" not in saved or "process_count" not in saved:
        raise DataError(
            f"checkpoint data item {saved!r} lacks 'positions'/'process_count'; it was written by an "
            f"older imagen-jax whose data position cannot be restored"
        )
    positions = [Position(int(e), int(i)) for e, i in saved["positions"]]
    if len(positions) != int(saved["process_count"]):
        raise DataError(f"checkpoint data item has {len(positions)} positions for {saved['process_count']} processes")
    if int(saved["process_count"]) == process_count:
        mine = positions[process_index]
        return mine, f"data: resuming at epoch {mine.epoch}, record {mine.index} (process {process_index})"
    fresh = Position(max(p.epoch for p in positions) + 1, 0)
    return fresh, (
        f"data: the checkpoint was written by {saved['process_count']} processes and this run has {process_count}; "
        f"shard files are reassigned, so every process starts epoch {fresh.epoch} afresh (the unread rest of the "
        f"interrupted epoch is skipped)"
    )
