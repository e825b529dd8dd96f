"""Fine-tuning: a run whose parameters start from a trained stage (`config.train.init_from`) instead of a random
initialisation.

The source is a training workdir (the EMA weights of its latest checkpoint), an export folder, or a DeepFloyd IF
pipeline folder (stage/if_folder.py). It is read only when a run starts without a checkpoint of its own; a
resumed run continues from its own checkpoints. The EMA starts at the loaded weights, the optimizer state and the
step counter start afresh.

An IF folder brings its architecture and recipe: the stage's model, diffusion and text fields and its image size
are the folder's (`adopt_source`), so a fine-tuning config names the data and the training settings, not IF's
U-Net. A workdir or export must hold the model the config describes: differing model fields are an error naming
them (as resuming does), and so is any array that still differs (e.g. a T5 of another width).

`WORKDIR:STEP` picks a checkpoint step of a workdir. `train.init_from_ema=False` starts from a workdir's raw
training params instead of its EMA (exports and IF folders hold no raw params). A LoRA source's adapters are merged
into its kernels. The weights are read straight into this run's shardings, whatever mesh wrote them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from imagen_jax.errors import ConfigError
from imagen_jax.stage import export as export_lib
from imagen_jax.stage import if_folder, lora
from imagen_jax.stage.checkpoint import model_fields
from imagen_jax.stage.model import StageModel, compute_dtype, shape_differences, stage_model
from imagen_jax.stage.stage import Stage, checked_stage_config, checkpoint_config, open_checkpoint
from imagen_jax.text import T5Encoder
from imagen_jax.train import optimizer as optimizer_lib
from imagen_jax.train import state as state_lib

# What an IF folder decides of a stage config (the rest stays the run's own).
IF_FIELDS = (
    "model",
    "data.image_size",
    "text.max_length",
    "text.lowercase",
    "diffusion.schedule",
    "diffusion.objective",
    "diffusion.variance",
    "diffusion.thresholding",
    "diffusion.dynamic_threshold_percentile",
    "diffusion.threshold_max",
    "diffusion.sr_noise_level",
)


def adopt_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the fields an IF folder in train.init_from decides (IF_FIELDS) taken from it, and its
    text_encoder/ as text.encoder unless the config names a T5; other sources and no source: `config` as it is."""
    source = config.train.init_from
    if not source or not if_folder.is_if_folder(source):
        return config
    folder = if_folder.if_config(source)
    adopted = ml_collections.ConfigDict(config.to_dict())
    for key in IF_FIELDS:
        *parents, field = key.split(".")
        target, value = adopted, folder
        for part in parents:
            target, value = target[part], value[part]
        target[field] = value[field]
    if not adopted.text.encoder:
        adopted.text.encoder = folder.text.encoder
    return adopted


def parse_source(source: str) -> tuple[str, int | None]:
    """'WORKDIR:STEP' -> (WORKDIR, STEP); anything else (gs:// paths included) -> (source, None)."""
    head, sep, tail = source.rpartition(":")
    if sep and head and tail.isdigit():
        return head, int(tail)
    return source, None


def check(config: ml_collections.ConfigDict) -> None:
    """A ConfigError for a train.init_from the source's kind cannot give: a step or raw params of an export or IF
    folder (one set of EMA weights each). Reads no weights."""
    source = config.train.init_from
    if not source:
        return
    path, step = parse_source(source)
    for kind, test in (("a DeepFloyd IF folder", if_folder.is_if_folder), ("an export folder", export_lib.is_export)):
        if test(path) and step is not None:
            raise ConfigError(f"config.train.init_from={source!r}: {path} is {kind} (one set of weights); no step")
        if test(path) and not config.train.init_from_ema:
            raise ConfigError(
                f"config.train.init_from_ema=False needs a training workdir's raw params, but {path} is {kind}, "
                "which holds EMA weights only"
            )


def load_params(
    config: ml_collections.ConfigDict,
    model: StageModel,
    text_dim: int,
    encoder: T5Encoder | None,
    log: Callable[[str], None] = print,
) -> dict:
    """The parameters of config.train.init_from, in `model`'s shardings (the run's mesh and rules); `text_dim`: the
    run's T5 width. `encoder`: the run's T5 (None with precomputed text: an IF source then loads config.text.encoder
    to encode its empty prompt)."""
    check(config)
    source, step = parse_source(config.train.init_from)
    if if_folder.is_if_folder(source):
        if encoder is None:
            if not config.text.encoder:
                raise ConfigError(
                    f"config.train.init_from={source!r} is a DeepFloyd IF folder, whose unconditional input is T5 of "
                    "the empty prompt: set config.text.encoder (the run uses precomputed text)"
                )
            encoder = T5Encoder.from_pretrained(
                config.text.encoder, dtype=compute_dtype(config.text.dtype), lowercase=config.text.lowercase
            )
        log(f"init_from: DeepFloyd IF U-Net of {source}")
        return if_folder.load_params(source, config, model.abstract_params, encoder)
    mesh = jax.tree.leaves(model.param_shardings)[0].mesh
    if export_lib.is_export(source):
        # completed as Stage.load completes it (an older export lacks fields that now have defaults)
        saved = checked_stage_config(f"{source}/{export_lib.CONFIG_FILE}", export_lib.read_config(source))
    else:
        checkpointer, step = open_checkpoint(source, step)
        try:
            saved = checkpoint_config(checkpointer, source, step)
        finally:
            checkpointer.close()
    fields = _model_differences(saved, config)
    if fields:
        raise ConfigError(
            f"config.train.init_from={config.train.init_from!r} holds another model than this config's: "
            f"{'; '.join(fields)}"
        )
    if config.train.init_from_ema:
        loaded = Stage.load(source, text_dim=text_dim, mesh=mesh, step=step)
        params, what, step = loaded.params, "EMA weights", loaded.step
    else:
        params, what = _raw_params(source, step, saved, text_dim, mesh), "raw training params"
    differences = shape_differences(params, model.abstract_params, f"init_from {source}")
    if differences:
        raise ConfigError(
            f"config.train.init_from={source!r} holds another model than this config's (first: {differences[0]})"
        )
    log(f"init_from: {what} of {source} at step {step}")
    return jax.device_put(params, model.param_shardings)


def _model_differences(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """'model.dim: init_from 64, config 128' for every model field that differs."""
    old, new = model_fields(saved), model_fields(config)
    return [
        f"{key}: init_from {old.get(key, '<missing>')!r}, config {new.get(key, '<missing>')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _raw_params(
    workdir: str, step: int, saved: ml_collections.ConfigDict, text_dim: int, mesh: jax.sharding.Mesh
) -> dict:
    """The raw training params of checkpoint `step` of `workdir`, restored (with the source run's own optimizer
    state layout) into `mesh` by the source config's rules, a LoRA source's adapters merged."""
    model = stage_model(saved, text_dim, mesh)
    tx = optimizer_lib.make_optimizer(saved.train)
    abstract = state_lib.abstract_state(saved, text_dim, tx, state_lib.state_shardings(saved, model, tx, mesh))
    checkpointer, step = open_checkpoint(workdir, step)
    try:
        state, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return lora.merged(saved, state["params"])
