"""Checkpoints: an orbax CheckpointManager with the train state, the EMA weights, the config and the data
position as separate items, so sampling can restore just the EMA weights and the config.

What makes a step complete (orbax-checkpoint 0.12.8, checked in its source: path/atomicity.py, path/step.py):
a save writes everything under `<dir>/<step>.orbax-checkpoint-tmp/` (each item in its own
`<item>.orbax-checkpoint-tmp/`, renamed to `<item>/` when that item is written), then writes
`commit_success.txt` into it and renames it to `<dir>/<step>/` (AtomicRenameTemporaryPath, the default for
local paths). On gs:// (no atomic rename) the step is written in place and is complete only once
`<dir>/<step>/commit_success.txt` exists (CommitFileTemporaryPath). `latest_step()` lists only directories
named exactly `<step>` (digits) that are complete in that sense, so a save killed midway leaves a
`<step>.orbax-checkpoint-tmp` directory that is never taken for a checkpoint, and the next save of that step
removes it. Saves are asynchronous: the device->host copy blocks, the write does not.

A complete step can still be unreadable later (a disk error, a partial copy, a deleted file): `restore_latest`
then falls back to the next older step, and moves the newer unreadable ones aside (`<step>.unrestorable`,
kept for inspection) so training can save those steps again and orbax's keep-the-newest-N never deletes the
good step in favour of a broken one. A checkpoint that is readable but was saved for a different model or
optimizer is not a reason to fall back (every older step has the same problem): it is an error at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from imagen_jax import config as config_lib
from imagen_jax.errors import CheckpointError, ConfigError, first_line
from imagen_jax.stage.config import complete
from imagen_jax.stage.model import shape_differences

CHECKPOINT_DIR = "checkpoints"
UNRESTORABLE_SUFFIX = ".unrestorable"
ITEMS = ("train", "ema", "config", "data")
_MAX_REASON_CHARS = 160
_MAX_LISTED_ARRAYS = 5
_MISSING = object()  # a field one of the two configs does not have


def checkpoint_dir(workdir: str) -> str:
    if "://" in workdir:
        return workdir.rstrip("/") + "/" + CHECKPOINT_DIR
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _reason(error: BaseException) -> str:
    """`ErrorType: first line`, short: tensorstore's first line carries a whole JSON spec."""
    line = first_line(error).split(" [tensorstore_spec=")[0]
    if len(line) > _MAX_REASON_CHARS:
        line = line[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {line}" if line != type(error).__name__ else line


# ------------------------------------------------------------------------------------------------------
# Does a checkpoint fit the current config?
# ------------------------------------------------------------------------------------------------------


def _flatten(config: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = tuple(value) if isinstance(value, list) else value
    return flat


def _structural_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields that decide the train state's arrays: the U-Net (model.*), the optimizer's state, and which
    parameters train (the optimizer state covers those alone) and carry LoRA adapters."""
    fields = model_fields(config)
    train = config.get("train", {})
    fields["train.optimizer"] = train.get("optimizer", _MISSING)
    for key, default in (("trainable", ()), ("lora_rank", 0), ("lora_targets", ())):
        value = train.get(key, default)
        fields[f"train.{key}"] = tuple(value) if isinstance(value, list) else value
    if not fields["train.lora_rank"]:
        del fields["train.lora_targets"]  # no adapters: the targets change nothing
    return fields


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The U-Net's fields (model.*), flattened: two configs build the same model when these are equal."""
    return _flatten(config.get("model", ml_collections.ConfigDict()), "model.")


def _show(value: Any) -> str:
    return "<missing>" if value is _MISSING else repr(value)


def check_compatible(
    saved: ml_collections.ConfigDict,
    current: ml_collections.ConfigDict,
    *,
    source: str = "the checkpoint",
    workdir: str | None = None,
) -> None:
    """Raises ConfigError listing every field that makes `current` build a different train state than `saved`
    (the config the checkpoint was written with): all model.* fields, train.optimizer, and for Adafactor
    whether train.adafactor_momentum is zero (it keeps a momentum state only when it is not). Everything else
    (num_steps, learning rate, intervals, data.*, mesh.*) may change on resume."""
    old, new = _structural_fields(saved), _structural_fields(current)
    differences = [
        f"{key}: checkpoint {_show(old.get(key, _MISSING))}, config {_show(new.get(key, _MISSING))}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]
    if old["train.optimizer"] == new["train.optimizer"] == "adafactor":
        old_momentum = saved.train.get("adafactor_momentum", 0.0)
        new_momentum = current.train.get("adafactor_momentum", 0.0)
        if bool(old_momentum) != bool(new_momentum):
            differences.append(
                f"train.adafactor_momentum: checkpoint {old_momentum!r}, config {new_momentum!r} "
                f"(adafactor keeps a momentum state only when it is non-zero)"
            )
    if differences:
        saved_at = f" ({workdir.rstrip('/')}/config.json)" if workdir else ""
        raise ConfigError(
            f"{source} was saved with a different model or optimizer: {'; '.join(differences)}; resume with the "
            f"config it was saved with{saved_at} or use a new workdir"
        )


# ------------------------------------------------------------------------------------------------------
# The checkpointer.
# ------------------------------------------------------------------------------------------------------


class _Unrestorable(Exception):
    """This step cannot be read (as opposed to: it does not fit the config); an older one may."""


class Checkpointer:
    """Saves every `every` steps (keeping the newest `keep`) and restores the latest that can be read."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True, read_only: bool = False):
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self.read_only = read_only
        if read_only:  # orbax's own read_only mode logs warnings on every open; this one never saves.
            options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=max(1, int(every)), max_to_keep=int(keep), enable_async_checkpointing=async_save
            )
        # Handlers registered up front, so step metadata (array shapes) can be read before any restore.
        handlers = {
            "train": ocp.StandardCheckpointHandler(),
            "ema": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        }
        try:
            path = epath.Path(self.directory)
            if path.exists() and not path.is_dir():  # orbax would quietly report "no checkpoints"
                raise NotADirectoryError("exists but is not a directory")
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=ITEMS, item_handlers=handlers
            )
        except Exception as e:  # noqa: BLE001 - any I/O failure here means the directory is unusable
            raise CheckpointError(f"checkpoint directory {self.directory} cannot be used ({_reason(e)})") from None

    def latest_step(self) -> int | None:
        """The newest complete step (see the module docstring), whether or not it can be restored."""
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would save without `force` (so callers gather its inputs only then)."""
        return self.manager.should_save(step)

    def save(
        self, step: int, state: dict, config: ml_collections.ConfigDict, data: dict, *, force: bool = False
    ) -> bool:
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

    def restore_latest(
        self, abstract_state: dict, config: ml_collections.ConfigDict, log: Callable[[str], None] = print
    ) -> tuple[int, dict, dict] | None:
        """(step, state, data) of the newest step that can be restored, falling back to older ones (one log
        line each); None when there is no checkpoint. Raises ConfigError when the checkpoint was saved for a
        different model or optimizer than `config` builds, CheckpointError when its arrays do not fit
        `abstract_state` or when no step can be read."""
        try:
            self.manager.reload()  # another process (a killed run) may have changed the directory
            steps = sorted(self.manager.all_steps(), reverse=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint directory {self.directory} cannot be listed ({_reason(e)})") from None
        failures = []
        for i, step in enumerate(steps):
            try:
                state, data = self._restore_step(step, abstract_state, config)
            except _Unrestorable as e:
                failures.append(f"step {step} ({e})")
                if i + 1 < len(steps):
                    log(
                        f"checkpoint: step {step} in {self.directory} cannot be restored ({e}); "
                        f"falling back to step {steps[i + 1]}"
                    )
                continue
            self._agree_across_processes(step)
            self._set_aside(steps[:i], log)
            return step, state, data
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: {'; '.join(failures)}")
        return None

    def _restore_step(self, step: int, abstract_state: dict, config: ml_collections.ConfigDict) -> tuple[dict, dict]:
        """Config check, then array shapes, then the arrays; unreadable files raise _Unrestorable."""
        where = f"checkpoint step {step} in {self.directory}"
        try:
            saved_config = self.restore_config(step)
        except Exception as e:  # noqa: BLE001 - whatever orbax raises for a broken step
            raise _Unrestorable(_reason(e)) from e
        check_compatible(complete(saved_config), config, source=where, workdir=self.workdir)
        try:
            saved = self._saved_shapes(step)
        except Exception as e:  # noqa: BLE001
            raise _Unrestorable(_reason(e)) from e
        differences = shape_differences(saved, abstract_state, "checkpoint")
        if differences:
            listed = "; ".join(differences[:_MAX_LISTED_ARRAYS])
            more = (
                f"; and {len(differences) - _MAX_LISTED_ARRAYS} more" if len(differences) > _MAX_LISTED_ARRAYS else ""
            )
            raise CheckpointError(
                f"{where} does not fit the model this config builds ({len(differences)} arrays differ: "
                f"{listed}{more}); "
                f"was it trained with a text encoder of another width or a different data.image_size?"
            )
        try:
            return self.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001
            raise _Unrestorable(_reason(e)) from e

    def _saved_shapes(self, step: int) -> dict:
        """The train state's tree as the step's metadata describes it (array metadata with shapes)."""
        items = self.manager.metadata(step).item_metadata
        trees = {}
        for name in ("train", "ema"):
            metadata = items[name] if name in items else None
            if metadata is None:
                raise FileNotFoundError(f"item {name!r} is missing")
            trees[name] = getattr(metadata, "tree", metadata)
        return {**trees["train"], "ema": trees["ema"]}

    def _agree_across_processes(self, step: int) -> None:
        """Every process must resume from the same step; a read error seen by one host alone would split them."""
        if jax.process_count() > 1:
            multihost_utils.assert_equal(step, f"processes restored different checkpoint steps from {self.directory}")

    def _set_aside(self, steps: list[int], log: Callable[[str], None]) -> None:
        """Renames unrestorable steps newer than the restored one to `<step>.unrestorable` (primary process)."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            for step in steps:
                source = epath.Path(self.directory) / str(step)
                target = source.parent / f"{step}{UNRESTORABLE_SUFFIX}"
                n = 0
                while target.exists():
                    n += 1
                    target = source.parent / f"{step}{UNRESTORABLE_SUFFIX}.{n}"
                source.rename(target)
                log(f"checkpoint: moved unrestorable step {step} to {target}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint set aside {self.directory}")
        self.manager.reload()

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
