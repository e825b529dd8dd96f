"""The training loop, top to bottom: setup, text encoder, model, data, resume, steps, samples, checkpoints."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from imagen_jax import config as config_lib
from imagen_jax import images as images_lib
from imagen_jax.data.pipeline import Position, make_dataset, numpy_batches, position_after, precomputed_text_metadata
from imagen_jax.data.resume import gather_positions, start_position
from imagen_jax.diffusion import augment
from imagen_jax.diffusion import sample as diffusion_sample
from imagen_jax.files import write_atomically
from imagen_jax.models import upsample_lowres
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder
from imagen_jax.train import optimizer as optimizer_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train.checkpoint import Checkpointer
from imagen_jax.train.metrics import MetricWriter
from imagen_jax.train.preemption import PreemptionWatch
from imagen_jax.train.step import make_apply_fn, make_train_step

CONFIG_FILE = "config.json"


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the stage `config` describes in `workdir`, resuming from its latest checkpoint. Returns the
    last logged metrics."""
    # ----------------------------------------------------------------------------------------------
    # Setup: validate, workdir, mesh.
    # ----------------------------------------------------------------------------------------------
    validate(config)
    tf.io.gfile.makedirs(workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % replicas:
        raise config_lib.ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by the {replicas} data-parallel devices")
    log(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: {jax.process_count()}, mesh: {dict(mesh.shape)}")
    checkpointer = Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints)
    # Watched from here on: a SIGTERM while T5 loads, the state restores or the step compiles is answered
    # after the first step, like one during training. Every jit gets explicit NamedShardings, so no ambient
    # mesh is set: under jax.set_mesh, nnx.eval_shape would try to read logical parameter names as mesh axes.
    with PreemptionWatch(checkpointer.manager) as preemption:
        return _train(config, workdir, mesh, checkpointer, preemption)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, checkpointer: Checkpointer,
           preemption: PreemptionWatch) -> dict:

    # ----------------------------------------------------------------------------------------------
    # Frozen T5 text encoder (parameters replicated, never in the optimizer), or none at all when the
    # shards carry precomputed embeddings.
    # ----------------------------------------------------------------------------------------------
    precomputed = bool(config.data.precomputed_text)
    if precomputed:
        encoder, t5_params, t5_shardings = None, {}, {}
        stored = precomputed_text_metadata(config.data)
        text_dim = int(stored["dim"])
        log(f"text: precomputed T5 embeddings from {stored['encoder']} (dim {text_dim}, {stored['dtype']}); no encoder built")
    else:
        encoder = T5Encoder.from_pretrained(config.text.encoder, dtype=state_lib.compute_dtype(config.text.dtype))
        t5_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), encoder.state)
        t5_params = jax.device_put(encoder.state, t5_shardings)
        text_dim = encoder.dim
        log(f"text encoder: {config.text.encoder} (d_model {text_dim}, max_length {config.text.max_length})")

    # ----------------------------------------------------------------------------------------------
    # U-Net, optimizer, train state (born sharded, or restored from the latest checkpoint).
    # ----------------------------------------------------------------------------------------------
    spec = state_lib.model_spec(config, text_dim, mesh)
    tx = optimizer_lib.make_optimizer(config.train)
    schedule = optimizer_lib.learning_rate_schedule(config.train)
    shardings = state_lib.state_shardings(spec, tx, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_params))
    log(f"U-Net: {num_params / 1e6:.2f}M parameters")
    # The newest checkpoint that restores (older ones are fallbacks, logged); a config whose model or
    # optimizer differs from the checkpoint's is an error listing the fields.
    restored = checkpointer.restore_latest(state_lib.abstract_state(config, text_dim, tx, shardings), config, log=log)
    if restored is None:
        state = state_lib.init_state(config, text_dim, tx, shardings)
        saved_data = None
        log("initialised a new train state")
    else:
        latest, state, saved_data = restored
        log(f"resumed from checkpoint at step {latest} in {workdir}")
    start_step = int(state["step"])
    if jax.process_index() == 0:  # After the restore: a mismatch error points at the config the run was saved with.
        write_atomically(os.path.join(workdir, CONFIG_FILE), json.dumps(config_lib.to_json(config), indent=2))

    # ----------------------------------------------------------------------------------------------
    # Data: each process reads its own shard files from its saved stream position; local batches
    # become global arrays.
    # ----------------------------------------------------------------------------------------------
    local_batch = config.train.batch_size // jax.process_count()
    position, message = start_position(saved_data, jax.process_index(), jax.process_count())
    log(message)
    dataset, data_stats = make_dataset(
        config.data, batch_size=local_batch, seed=config.seed, start=position,
        process_index=jax.process_index(), process_count=jax.process_count(), text_max_length=config.text.max_length,
    )
    batches = numpy_batches(dataset, data_stats)  # An epoch that delivers nothing is an error, not a hang.

    def next_batch() -> tuple[dict, Position, list[bytes]]:
        """The next global batch, this process's stream position after it, and its local captions."""
        raw = next(batches)
        if precomputed:
            local = {"image": raw["image"], "text": raw["text"], "mask": raw["mask"]}
        else:
            ids, mask = encoder.tokenizer([c.decode("utf-8", "replace") for c in raw["caption"]], config.text.max_length)
            local = {"image": raw["image"], "ids": ids, "mask": mask}
        return mesh_lib.global_batch(local, mesh), position_after(raw), list(raw["caption"])

    # ----------------------------------------------------------------------------------------------
    # Compiled train step; periodic samples use the EMA weights.
    # ----------------------------------------------------------------------------------------------
    train_step = make_train_step(config, spec.graphdef, None if precomputed else encoder.apply, tx, schedule, mesh,
                                 shardings, t5_shardings)
    apply_fn = make_apply_fn(spec.graphdef)
    # Without an encoder (precomputed text), sample grids use the captions of the current batch.
    prompts = [] if precomputed else list(config.train.sample_prompts)
    sample_text = encoder.encode(prompts, max_length=config.text.max_length) if prompts else None

    def batch_text(batch: dict, n: int) -> tuple[jax.Array, jax.Array]:
        if precomputed:
            return batch["text"][:n], batch["mask"][:n]
        return encoder.apply(encoder.state, batch["ids"][:n], batch["mask"][:n]), batch["mask"][:n]
    writer = MetricWriter(workdir)

    super_resolution = state_lib.is_super_resolution(config)

    def write_samples(step: int, batch: dict, captions: list[bytes]) -> None:
        """Base: the config's sample prompts. SR: the first images of the batch, as low-res input | sample | target."""
        common = dict(
            steps=config.train.sample_steps, guidance_scale=config.train.sample_guidance_scale,
            schedule=config.diffusion.schedule, objective=config.diffusion.objective,
            thresholding=config.diffusion.thresholding, percentile=config.diffusion.dynamic_threshold_percentile,
        )
        if super_resolution:
            n = min(4, local_batch)
            target = jax.device_get(batch["image"])[:n]
            text, text_mask = batch_text(batch, n)
            size = target.shape[1]
            lowres = augment.downsample(target, size * config.model.lowres_size // config.data.image_size)
            z, aug_t = augment.sampling_augmentation(lowres, 0.2, jax.random.key(config.seed + 1), config.diffusion.schedule)
            x = diffusion_sample(apply_fn, state["ema"], text, text_mask, jax.random.key(config.seed),
                                 shape=target.shape, model_kwargs={"lowres": z, "lowres_t": aug_t}, **common)
            shown = jnp.concatenate([upsample_lowres(lowres, size), x, target])
            grid, caption = images_lib.make_grid(images_lib.to_uint8(jax.device_get(shown)), columns=n), "low-res | sample | target"
        elif prompts or precomputed:
            size, n = config.data.image_size, len(prompts) or min(4, local_batch)
            text, text_mask = sample_text if prompts else batch_text(batch, n)
            x = diffusion_sample(apply_fn, state["ema"], text, text_mask, jax.random.key(config.seed),
                                 shape=(n, size, size, 3), **common)
            shown = prompts or [c.decode("utf-8", "replace") for c in captions[:n]]
            grid, caption = images_lib.make_grid(images_lib.to_uint8(jax.device_get(x))), " | ".join(shown)
        else:
            return
        if jax.process_index() == 0:
            tf.io.gfile.makedirs(os.path.join(workdir, "samples"))
            images_lib.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        writer.image(step, "samples", grid)
        writer.text(step, "samples", caption)

    # ----------------------------------------------------------------------------------------------
    # Train.
    # ----------------------------------------------------------------------------------------------
    num_steps = int(config.train.num_steps)
    max_bad = int(config.train.max_consecutive_nonfinite)
    log(f"training steps {start_step} -> {num_steps}, global batch {config.train.batch_size}")
    last_metrics: dict = {}
    t_log, steps_since_log = time.perf_counter(), 0
    bad_streak, bad_total = 0, 0
    for step in range(start_step, num_steps):
        batch, position, captions = next_batch()
        state, metrics = train_step(state, t5_params, batch)
        steps_since_log += 1
        done = step + 1
        # A non-finite step changed nothing but the counters (see step.py); count it, stop on a streak.
        bad = int(jax.device_get(metrics["nonfinite"]))
        bad_streak, bad_total = (bad_streak + 1) * bad, bad_total + bad
        if bad:
            log(f"step {done}: non-finite loss or gradients; update skipped ({bad_streak} in a row, {bad_total} in total)")
        if done % config.train.log_every == 0 or done == num_steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - t_log
            last_metrics = {k: float(v) for k, v in metrics.items() if k != "nonfinite"}
            last_metrics["nonfinite_steps"] = bad_total
            last_metrics["images_per_sec"] = steps_since_log * config.train.batch_size / elapsed
            # Data counters (see data/pipeline.py); the many that stay 0 on clean data are left out.
            last_metrics.update({f"data/{k}": v for k, v in data_stats.read().items() if v or k == "delivered"})
            writer.scalars(done, last_metrics)
            t_log, steps_since_log = time.perf_counter(), 0
        if config.train.sample_every and (done % config.train.sample_every == 0 or done == num_steps):
            write_samples(done, batch, captions)
        diverged = 0 < max_bad <= bad_streak
        preempted = preemption.reached(done)
        stop = done == num_steps or diverged or preempted
        if stop or checkpointer.due(done):
            checkpointer.save(done, state, config, gather_positions(position), force=stop)
        if preempted:
            checkpointer.close()
            writer.close()
            log(f"preempted: stopped after step {done} with a checkpoint in {workdir}; rerun the same command to resume")
            return last_metrics
        if diverged:
            checkpointer.close()
            writer.close()
            raise TrainingDiverged(
                f"stopped at step {done}: {bad_streak} consecutive steps had a non-finite loss, gradient or update "
                f"(train.max_consecutive_nonfinite={max_bad}); the checkpoint at step {done} holds the parameters of "
                f"step {done - bad_streak}, the last finite one; lower train.learning_rate or check the data")
    checkpointer.close()
    writer.close()
    log(f"finished at step {num_steps}; checkpoints in {workdir}")
    return last_metrics


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message says where the last good state is."""


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks that would otherwise fail late and obscurely."""
    if config.train.batch_size % jax.process_count():
        raise config_lib.ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by {jax.process_count()} processes")
    if config.train.num_steps < 1:
        raise config_lib.ConfigError(f"config.train.num_steps must be >= 1, got {config.train.num_steps}")
    if not config.text.encoder and not config.data.precomputed_text:
        raise config_lib.ConfigError("config.text.encoder is empty: set it to a Hugging Face T5 folder "
                                     "(or train on precomputed embeddings: config.data.precomputed_text=True)")
