"""Checkpoints: an orbax CheckpointManager with the train state, the EMA weights, the config and the data
position as separate items, so sampling can restore just the EMA weights and the config.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so an interrupted save
is never taken as a checkpoint. Saves are asynchronous: the device->host copy blocks, the write does not.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from imagen_jax import config as config_lib

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    if "://" in workdir:
        return workdir.rstrip("/") + "/" + CHECKPOINT_DIR
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
    """Saves every `every` steps (keeping the newest `keep`) and restores the latest."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True, read_only: bool = False):
        if read_only:  # orbax's own read_only mode logs warnings on every open; this one never saves.
            options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=max(1, int(every)), max_to_keep=int(keep), enable_async_checkpointing=async_save
            )
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options, item_names=("train", "ema", "config", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would save without `force` (so callers gather its inputs only then)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: dict, config: ml_collections.ConfigDict, data: dict, *, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started."""
        train = {k: v for k, v in state.items() if k != "ema"}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                train=ocp.args.StandardSave(train),
                ema=ocp.args.StandardSave(state["ema"]),
                config=ocp.args.JsonSave(config_lib.to_json(config)),
                data=ocp.args.JsonSave(data),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restores the full train state into the shardings of `abstract_state`; returns (state, data)."""
        abstract_train = {k: v for k, v in abstract_state.items() if k != "ema"}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                train=ocp.args.StandardRestore(abstract_train),
                ema=ocp.args.StandardRestore(abstract_state["ema"]),
                data=ocp.args.JsonRestore(),
            ),
        )
        return {**restored["train"], "ema": restored["ema"]}, dict(restored["data"])

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_lib.from_json(restored["config"])

    def restore_ema(self, step: int, abstract_ema: Any) -> Any:
        """Just the EMA weights: what sampling needs (no optimizer state is read)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema)))
        return restored["ema"]

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
