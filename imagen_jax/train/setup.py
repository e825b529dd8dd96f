"""One set-up call for every program that runs the train step: the training loop and the benchmark (and any
ahead-of-time planner) get the same text encoder placement, U-Net, optimizer, shardings and jitted step from
`setup`.

`validate` checks everything about a training config that can be checked without building anything, so
train.py answers a wrong value in the first seconds, in one line, before a workdir exists.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from imagen_jax.errors import ConfigError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import config as stage_config
from imagen_jax.stage.model import StageModel, compute_dtype, is_super_resolution, stage_model, t5_shardings
from imagen_jax.text import T5Config, T5Encoder
from imagen_jax.train import optimizer as optimizer_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Text:
    """The frozen text encoder as the train step sees it: None and {} with precomputed embeddings."""

    encoder: T5Encoder | None
    params: Any  # the encoder's parameters on the mesh
    shardings: Any
    dim: int  # T5 width: the U-Net's text input
    description: str  # one log line


def load_text(config: ml_collections.ConfigDict, mesh: Mesh) -> Text:
    """T5 from config.text.encoder, placed on `mesh`; or, with data.precomputed_text, no encoder at all (the
    width comes from the shards' text_embeddings.json)."""
    if config.data.precomputed_text:
        from imagen_jax.data.pipeline import precomputed_text_metadata  # TensorFlow, only for this case

        stored = precomputed_text_metadata(config.data)
        return Text(
            None,
            {},
            {},
            int(stored["dim"]),
            f"text: precomputed T5 embeddings from {stored['encoder']} "
            f"(dim {stored['dim']}, {stored['dtype']}); no encoder built",
        )
    # Each tensor goes to its shards as it is read: no whole T5 on a device or in host memory.
    encoder = T5Encoder.from_pretrained(
        config.text.encoder,
        dtype=compute_dtype(config.text.dtype),
        place=lambda abstract: t5_shardings(config, abstract, mesh),
        lowercase=config.text.lowercase,
    )
    return Text(
        encoder,
        encoder.state,
        jax.tree.map(lambda x: x.sharding, encoder.state),  # where `place` put each parameter
        encoder.dim,
        f"text encoder: {config.text.encoder} (d_model {encoder.dim}, max_length {config.text.max_length}; "
        f"this process read {encoder.bytes_read / 2**20:.1f} of its {encoder.bytes_stored / 2**20:.1f} MiB of "
        "weights: its devices' slices)",
    )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a training program needs: the model, optimizer, shardings and the jitted step
    `train_step(state, text.params, batch, streak) -> (state, metrics)` (train/step.py; the first streak is
    `no_streak()`, each next one the last step's metrics['nonfinite_streak'])."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    text: Text
    model: StageModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict
    train_step: Callable[[dict, Any, dict], tuple[dict, dict]]

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs carrying shardings: the restore target, and what an ahead-of-time
        compile lowers against (bench --steps 0)."""
        return state_lib.abstract_state(self.config, self.text.dim, self.tx, self.state_shardings)

    def init_state(self, params: dict | None = None) -> dict:
        """A new train state, created directly in its shardings (its parameters `params` when given)."""
        return state_lib.init_state(self.config, self.text.dim, self.tx, self.state_shardings, params)

    def no_streak(self, abstract: bool = False) -> jax.Array | jax.ShapeDtypeStruct:
        """The non-finite streak before a run's first step: 0, replicated on the mesh (on every process); with
        `abstract`, only its shape, for ahead-of-time compiles."""
        sharding = mesh_lib.replicated(self.mesh)
        if abstract:
            return jax.ShapeDtypeStruct((), np.int32, sharding=sharding)
        return jax.make_array_from_callback((), sharding, lambda _: np.zeros((), np.int32))


def setup(config: ml_collections.ConfigDict, mesh: Mesh, text: Text) -> TrainSetup:
    """Builds (abstractly: nothing is allocated) everything the train step needs for `config` on `mesh`."""
    model = stage_model(config, text.dim, mesh)
    tx = optimizer_lib.make_optimizer(config.train)
    schedule = optimizer_lib.learning_rate_schedule(config.train)
    shardings = state_lib.state_shardings(config, model, tx, mesh)
    step = make_train_step(
        config,
        model.graphdef,
        None if text.encoder is None else text.encoder.apply,
        tx,
        schedule,
        mesh,
        shardings,
        text.shardings,
    )
    return TrainSetup(config, mesh, text, model, tx, schedule, shardings, step)


def check_batch_split(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices of `mesh`, and the devices that share a
    batch shard (a tensor group) must be one process's: each process loads its own examples into the shards of its
    devices, so a group spanning two would be fed two different batches (jax assembles them without an error)."""
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % (replicas * config.train.microbatches):
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by train.microbatches="
            f"{config.train.microbatches} x the {replicas} data-parallel devices of mesh {dict(mesh.shape)}"
        )
    groups = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices).reshape(replicas, -1)
    spanning = [sorted(set(group)) for group in groups.tolist() if len(set(group)) > 1]
    if spanning:
        per_process = mesh.devices.size // len(np.unique(groups))
        raise ConfigError(
            f"mesh {dict(mesh.shape)}: the {mesh.shape['tensor']} devices of a batch shard (its tensor group) span "
            f"processes {spanning[0]}, which each load their own examples; keep config.mesh.tensor within one "
            f"process's {per_process} devices"
        )


def _at_least(config: ml_collections.ConfigDict, key: str, minimum: int) -> None:
    section, field = key.split(".")
    value = config[section][field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.{key} must be >= {minimum}, got {value!r}")


def validate(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Raises ConfigError naming the first field of a training config that cannot work: the stage's own checks
    (stage.config.validate), the optimizer, sizes and intervals, token buckets, the data format and shards, and the T5
    folder's config.json. Reads file listings and one small JSON file; builds nothing."""
    stage_config.validate(config)
    if config.train.optimizer not in optimizer_lib.OPTIMIZERS:
        raise ConfigError(
            f"config.train.optimizer={config.train.optimizer!r} is not one of {', '.join(optimizer_lib.OPTIMIZERS)}"
        )
    for key, minimum in (
        ("train.batch_size", 1),
        ("train.num_steps", 1),
        ("train.log_every", 1),
        ("train.checkpoint_every", 1),
        ("train.keep_checkpoints", 1),
        ("train.warmup_steps", 0),
        ("train.sample_every", 0),
        ("train.sample_steps", 1),
        ("train.max_consecutive_nonfinite", 0),
        ("train.microbatches", 1),
        ("train.lora_rank", 0),
    ):
        _at_least(config, key, minimum)
    _validate_fine_tuning(config)
    if config.train.batch_size % config.train.microbatches:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by "
            f"train.microbatches={config.train.microbatches}"
        )
    if config.train.batch_size % process_count:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by {process_count} processes"
        )
    if config.data.prior_shards:
        if config.train.batch_size % (2 * process_count):
            raise ConfigError(
                f"config.train.batch_size={config.train.batch_size} must be divisible by 2 x {process_count} "
                "processes with data.prior_shards (every process's batch is half instance, half class examples)"
            )
        weight = config.train.prior_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ConfigError(f"config.train.prior_loss_weight={weight!r} must be a finite number >= 0")
    if not config.train.learning_rate > 0:
        raise ConfigError(f"config.train.learning_rate={config.train.learning_rate!r} must be > 0")
    _validate_buckets(config)
    if not config.data.precomputed_text:
        if not config.text.encoder:
            raise ConfigError(
                "config.text.encoder is empty: set it to a Hugging Face T5 folder "
                "(or train on precomputed embeddings: config.data.precomputed_text=True)"
            )
        T5Config.from_json(os.path.join(config.text.encoder, "config.json"))  # names the file when it is bad
    _validate_data(config)
    _validate_eval(config)


def _validate_fine_tuning(config: ml_collections.ConfigDict) -> None:
    """train.trainable and LoRA's fields, as far as they can be checked without the model's parameter paths
    (patterns that match nothing are named when the train state is laid out: train/trainable.py, stage/lora.py)."""
    for key in ("trainable", "lora_targets"):
        patterns = config.train[key]
        if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(
                f"config.train.{key}={patterns!r} must be a tuple of regular expressions, e.g. "
                f"--config.train.{key}=\"('cross_attn', 'text_proj')\""
            )
    if not config.train.lora_rank:
        return
    if not config.train.init_from:
        raise ConfigError(
            f"config.train.lora_rank={config.train.lora_rank} needs train.init_from: the trained stage whose weights "
            "the adapters adapt (they stay frozen)"
        )
    alpha = config.train.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise ConfigError(f"config.train.lora_alpha={alpha!r} must be a finite number > 0")
    if not config.train.lora_targets:
        raise ConfigError("config.train.lora_targets is empty but train.lora_rank is set: name the kernels to adapt")


def _validate_buckets(config: ml_collections.ConfigDict) -> None:
    """config.text.buckets: () or increasing token counts in [1, text.max_length] (train/buckets.py); never for IF's
    U-Net, whose attention counts the padded positions that bucketing cuts."""
    buckets, max_length = config.text.buckets, config.text.max_length
    counts = isinstance(buckets, (tuple, list)) and all(isinstance(b, int) and not isinstance(b, bool) for b in buckets)
    if not counts:
        raise ConfigError(f"config.text.buckets={buckets!r} must be a tuple of token counts, e.g. (16, 32, 64)")
    if any(not 1 <= b <= max_length for b in buckets):
        raise ConfigError(f"config.text.buckets={buckets!r} must lie in [1, text.max_length={max_length}]")
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ConfigError(f"config.text.buckets={buckets!r} must be increasing")
    if buckets and config.model.get("kind") == "if_unet":
        raise ConfigError(
            f"config.text.buckets={buckets!r} cannot be used with DeepFloyd IF's U-Net, which attends to every padded "
            "position of its text: set it to ()"
        )


def _validate_eval(config: ml_collections.ConfigDict) -> None:
    """config.eval: off (every=0), or a base stage with a T5 and every file it needs named."""
    _at_least(config, "eval.every", 0)
    if not config.eval.every:
        return
    for key, minimum in (("eval.num_images", 2), ("eval.batch_size", 1), ("eval.steps", 0), ("eval.seed", 0)):
        _at_least(config, key, minimum)
    if is_super_resolution(config):
        raise ConfigError(
            "config.eval.every is set on a super-resolution stage: evaluation during training samples base stages "
            "from captions; score a cascade with python -m imagen_jax.tools.evaluate"
        )
    if config.data.precomputed_text:
        raise ConfigError("config.eval.every needs a T5 to encode its captions; it is unset with data.precomputed_text")
    for key in ("captions", "reference", "inception"):
        if not config.eval[key]:
            raise ConfigError(f"config.eval.{key} is empty but config.eval.every={config.eval.every}")
    if not config.eval.guidance_scales:
        raise ConfigError("config.eval.guidance_scales is empty")


def _validate_data(config: ml_collections.ConfigDict) -> None:
    from imagen_jax.data.pipeline import SUPPORTED_FORMATS
    from imagen_jax.data.shards import list_shards

    if config.data.format not in SUPPORTED_FORMATS:
        raise ConfigError(
            f"config.data.format={config.data.format!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_FORMATS)} (convert webdataset .tar shards with "
            "python -m imagen_jax.tools.convert_shards)"
        )
    if not config.data.train_shards:
        raise ConfigError(
            "config.data.train_shards is empty: set it to your shard files (a glob, brace pattern, "
            "list or .txt list file; local or gs://)"
        )
    list_shards(config.data.train_shards)  # every pattern must match: a MissingError naming the one that does not
    if config.data.prior_shards:
        list_shards(config.data.prior_shards)
