"""Fine-tuning: a run whose parameters start from a trained stage (`config.train.init_from`) instead of a random
initialisation.

The source is a training workdir (the EMA weights of its latest checkpoint), an export folder, or a DeepFloyd IF
pipeline folder (stage/if_folder.py). It is read only when a run starts without a checkpoint of its own; a
resumed run continues from its own checkpoints. The EMA starts at the loaded weights, the optimizer state and the
step counter start afresh.

An IF folder brings its architecture and recipe: the stage's model, diffusion and text fields and its image size
are the folder's (`adopt_source`), so a fine-tuning config names the data and the training settings, not IF's
U-Net. A workdir or export must hold the model the config describes: a differing parameter is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from imagen_jax.errors import ConfigError
from imagen_jax.stage import if_folder
from imagen_jax.stage.model import StageModel, compute_dtype, shape_differences
from imagen_jax.stage.stage import Stage
from imagen_jax.text import T5Encoder

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
    source = config.train.init_from
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
    stage = Stage.load(source, text_dim=text_dim, mesh=mesh)
    differences = shape_differences(stage.params, model.abstract_params, f"init_from {source}")
    if differences:
        raise ConfigError(
            f"config.train.init_from={source!r} holds another model than this config's (first: {differences[0]})"
        )
    log(f"init_from: EMA weights of {source} at step {stage.step}")
    return jax.device_put(stage.params, model.param_shardings)
