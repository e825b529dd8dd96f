"""The training loop, top to bottom: setup, text encoder, model, data, resume, steps, samples, checkpoints."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from imagen_jax import config as config_lib
from imagen_jax import images as images_lib
from imagen_jax.data.pipeline import DatasetStats, Position, make_dataset, numpy_batches, position_after
from imagen_jax.data.resume import gather_positions, prior_start_position, start_position
from imagen_jax.data.shards import list_shards
from imagen_jax.diffusion import augment
from imagen_jax.errors import ConfigError, TrainingDiverged
from imagen_jax.files import write_atomically
from imagen_jax.models import upsample_lowres
from imagen_jax.parallel import agree, distributed
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import lora, sampling
from imagen_jax.stage.checkpoint import Checkpointer
from imagen_jax.stage.model import lowres_size
from imagen_jax.train import buckets, compile_cache, init_from, trainable
from imagen_jax.train import setup as setup_lib
from imagen_jax.train.feed import FEED_NICE, Prefetch
from imagen_jax.train.host_writes import HostWrites
from imagen_jax.train.metrics import MetricWriter
from imagen_jax.train.periodic_eval import PeriodicEval
from imagen_jax.train.preemption import PreemptionWatch
from imagen_jax.train.progress import Progress

CONFIG_FILE = "config.json"


def _save_grid(grid: np.ndarray, path: str) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path))
    images_lib.save_png(grid, path)


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the stage `config` describes in `workdir`, resuming from its latest checkpoint. Returns the
    last logged metrics."""
    # ----------------------------------------------------------------------------------------------
    # Setup: validate everything checkable, then the mesh, then (only then) the workdir.
    # ----------------------------------------------------------------------------------------------
    config = init_from.adopt_source(config)  # an IF folder in train.init_from brings its model and recipe
    setup_lib.validate(config, jax.process_count())
    init_from.check(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    setup_lib.check_batch_split(config, mesh)
    prepare_workdir(workdir)
    log(
        f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: {jax.process_count()}, "
        f"mesh: {dict(mesh.shape)}"
    )
    cache, description = compile_cache.cache_dir(config, workdir)
    log(description)
    checkpointer = Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints)
    # Watched from here on: a SIGTERM while T5 loads, the state restores or the step compiles is answered
    # after the first step, like one during training. Every jit gets explicit NamedShardings, so no ambient
    # mesh is set: under jax.set_mesh, nnx.eval_shape would try to read logical parameter names as mesh axes.
    with compile_cache.using(cache), PreemptionWatch(checkpointer.manager) as preemption:
        compiled_before = compile_cache.counts()
        try:
            return _train(config, workdir, mesh, checkpointer, preemption)
        finally:
            if cache:
                log(_compiled_since(compiled_before))


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    checkpointer: Checkpointer,
    preemption: PreemptionWatch,
) -> dict:

    # ----------------------------------------------------------------------------------------------
    # Frozen T5 text encoder (parameters replicated, never in the optimizer), or none at all when the
    # shards carry precomputed embeddings; U-Net, optimizer, compiled step; the train state (born sharded,
    # or restored from the latest checkpoint).
    # ----------------------------------------------------------------------------------------------
    text = setup_lib.load_text(config, mesh)
    log(text.description)
    trainer = setup_lib.setup(config, mesh, text)
    log(f"U-Net: {trainer.model.num_params / 1e6:.2f}M parameters")
    log(trainable.describe(config, trainer.abstract_state()["params"]))
    # The newest checkpoint that restores (older ones are fallbacks, logged); a config whose model or
    # optimizer differs from the checkpoint's is an error listing the fields.
    restored = checkpointer.restore_latest(trainer.abstract_state(), config, log=log)
    if restored is None:
        if config.train.init_from:
            state = trainer.init_state(init_from.load_params(config, trainer.model, text.dim, text.encoder, log))
            log(f"initialised a new train state from {config.train.init_from}")
        else:
            state = trainer.init_state()
            log("initialised a new train state")
        saved_data = None
    else:
        latest, state, saved_data = restored
        log(f"resumed from checkpoint at step {latest} in {workdir}")
        if config.train.init_from:
            log(f"train.init_from={config.train.init_from!r} ignored: the run resumes from its own checkpoints")
    start_step = int(state["step"])
    if jax.process_index() == 0:  # After the restore: a mismatch error points at the config the run was saved with.
        config_json, path = json.dumps(config_lib.to_json(config), indent=2), os.path.join(workdir, CONFIG_FILE)
        HostWrites(log).attempt(CONFIG_FILE, "the run's config", lambda: write_atomically(path, config_json))

    # ----------------------------------------------------------------------------------------------
    # Data: each process reads its own shard files from its saved stream position; local batches
    # become global arrays. DreamBooth (data.prior_shards): each local batch is half instance examples, half
    # class examples from a second stream with its own saved position.
    # ----------------------------------------------------------------------------------------------
    local_batch = config.train.batch_size // jax.process_count()
    prior = bool(config.data.prior_shards)
    stream_batch = local_batch // 2 if prior else local_batch

    def stream(data_cfg: ml_collections.ConfigDict, start: Position) -> tuple[Iterator[dict], DatasetStats]:
        files = distributed.process_0s(lambda: list_shards(data_cfg.train_shards))  # one listing, the same on all
        dataset, stats = make_dataset(
            data_cfg,
            files=files,
            batch_size=stream_batch,
            seed=config.seed,
            start=start,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            text_max_length=config.text.max_length,
            text_lowercase=bool(config.text.lowercase),
        )
        return numpy_batches(dataset, stats), stats  # An epoch that delivers nothing is an error, not a hang.

    position, message = start_position(saved_data, jax.process_index(), jax.process_count())
    log(message)
    batches, data_stats = stream(config.data, position)
    prior_batches, weight = None, None
    if prior:
        prior_position, message = prior_start_position(saved_data, jax.process_index(), jax.process_count())
        log(message)
        prior_cfg = config.data.copy_and_resolve_references()
        prior_cfg.train_shards = config.data.prior_shards
        prior_batches, _ = stream(prior_cfg, prior_position)
        # mean(instance loss) + lambda mean(class loss) as one weighted mean over the batch (diffusion_loss).
        lam = float(config.train.prior_loss_weight)
        weight = np.repeat(np.array([2.0, 2.0 * lam], np.float32), stream_batch)

    encoder = text.encoder
    # Token buckets (train/buckets.py): each batch's ids cut to the bucket of the global batch's longest caption,
    # which the processes agree on from their feed threads (parallel/agree.py).
    text_lengths = buckets.lengths(config)
    agreement = agree.MaxAgreement("text_length") if encoder is not None and len(text_lengths) > 1 else None
    made = itertools.count()  # batches made: the agreement's index, the same on every process

    def next_batch() -> tuple[dict, tuple[Position, ...], list[bytes]]:
        """The next global batch, this process's stream positions after it (instance, then class stream), and
        its local captions."""
        raw = next(batches)
        positions = (position_after(raw),)
        if prior_batches is not None:
            extra = next(prior_batches)
            positions += (position_after(extra),)
            raw = {k: np.concatenate([raw[k], extra[k]]) for k in raw}
        if encoder is None:
            local = {"image": raw["image"], "text": raw["text"], "mask": raw["mask"]}
        else:
            ids, mask = encoder.tokenizer(
                [c.decode("utf-8", "replace") for c in raw["caption"]], config.text.max_length
            )
            if agreement is not None:
                length = buckets.bucket(agreement.agree(next(made), buckets.longest(mask)), text_lengths)
                ids, mask = buckets.cut(ids, mask, length)
            local = {"image": raw["image"], "ids": ids, "mask": mask}
        if weight is not None:
            local["weight"] = weight
        return mesh_lib.global_batch(local, mesh), positions, list(raw["caption"])

    # ----------------------------------------------------------------------------------------------
    # Periodic sample grids, from the EMA weights, through the same code as sample.py.
    # ----------------------------------------------------------------------------------------------
    num_steps = int(config.train.num_steps)
    progress = Progress(start_step, num_steps, int(config.train.batch_size), active=jax.process_index() == 0)
    writer = MetricWriter(workdir, echo=progress.echo)
    progress.echo(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    # Base stages draw the config's prompts; without an encoder (precomputed text), the current batch's captions.
    prompts = [] if encoder is None else list(config.train.sample_prompts)
    sample_text = None
    if prompts:  # on the mesh, like every computation of a multi-process run
        sample_text = sampling.encode(encoder, *encoder.tokenizer(prompts, config.text.max_length), mesh)
    denoiser = trainer.model.denoiser

    def ema_weights() -> dict:
        """The EMA weights as the U-Net takes them (a LoRA run's adapters merged)."""
        return lora.merged(config, state["ema"])

    def batch_text(batch: dict, n: int) -> tuple[jax.Array, jax.Array]:
        if encoder is None:
            return batch["text"][:n], batch["mask"][:n]
        return sampling.encode(encoder, batch["ids"][:n], batch["mask"][:n], mesh)

    def write_samples(step: int, batch: dict, captions: list[bytes]) -> None:
        """Base: the config's sample prompts. SR: the first images of the batch, as low-res input | sample | target.
        Every process samples (the weights and the batch span them all); process 0 writes."""
        settings = dict(steps=config.train.sample_steps, guidance_scale=config.train.sample_guidance_scale)
        seeds = [config.seed + i for i in range(max(len(prompts), min(4, local_batch)))]
        low = lowres_size(config, batch["image"].shape[1])
        if low is not None:
            n = min(4, local_batch)
            target = images_lib.from_uint8(mesh_lib.gather_rows(batch["image"], n, mesh))  # uint8 from the feed
            lowres = augment.downsample(target, low)
            text_n, mask_n = batch_text(batch, n)
            x = sampling.sample(
                config,
                denoiser,
                ema_weights(),
                text_n,
                mask_n,
                seeds[:n],
                mesh=mesh,
                lowres=lowres,
                size=target.shape[1],
                **settings,
            )
            shown = np.concatenate([upsample_lowres(lowres, target.shape[1]), x, target])
            grid, caption = images_lib.make_grid(images_lib.to_uint8(shown), columns=n), "low-res | sample | target"
        elif prompts or encoder is None:
            n = len(prompts) or min(4, local_batch)
            text_n, mask_n = sample_text if prompts else batch_text(batch, n)
            x = sampling.sample(config, denoiser, ema_weights(), text_n, mask_n, seeds[:n], mesh=mesh, **settings)
            shown = prompts or [c.decode("utf-8", "replace") for c in captions[:n]]
            grid, caption = images_lib.make_grid(images_lib.to_uint8(x)), " | ".join(shown)
        else:
            return
        if jax.process_index() == 0:
            path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
            writer.writes.attempt("sample grids", path, lambda: _save_grid(grid, path))
        writer.image(step, "samples", grid)
        writer.text(step, "samples", caption)

    # Periodic FID/KID/CLIP score (config.eval), from the EMA weights, on every process; process 0 logs it.
    periodic_eval = None
    if config.eval.every:
        periodic_eval = PeriodicEval(config, mesh, encoder, denoiser, log)
        log(
            f"evaluating every {config.eval.every} steps: {len(periodic_eval.captions)} captions per guidance scale, "
            f"batches of {periodic_eval.batch_size}"
        )

    # ----------------------------------------------------------------------------------------------
    # Train. The devices always have the next step queued: step n's results are read (which waits for
    # step n) only after step n+1 is dispatched, and the next batches are read, tokenised and put on the
    # devices by a background thread meanwhile. Non-finite steps are counted on the device (step.py).
    # ----------------------------------------------------------------------------------------------
    max_bad = int(config.train.max_consecutive_nonfinite)
    progress.echo(f"training steps {start_step} -> {num_steps}, global batch {config.train.batch_size}")
    last_metrics: dict = {}
    bad_total, saved_step = 0, None

    def observe(done: int, metrics: dict) -> bool:
        """Reads step `done`'s results (waiting for the step), reports them; True when it ended a streak of
        non-finite steps that stops the run."""
        nonlocal bad_total, last_metrics
        log_now = done % config.train.log_every == 0 or done == num_steps
        values = read(metrics if log_now else {k: metrics[k] for k in ("nonfinite", "nonfinite_streak")})
        progress.finished(done)
        bad, streak = int(values["nonfinite"]), int(values["nonfinite_streak"])
        bad_total += bad
        if bad:
            progress.echo(
                f"step {done}: non-finite loss or gradients; update skipped ({streak} in a row, {bad_total} in total)"
            )
        if log_now:
            last_metrics = {k: float(v) for k, v in values.items() if k not in ("nonfinite", "nonfinite_streak")}
            last_metrics["nonfinite_steps"] = bad_total
            last_metrics.update(progress.rates())  # images/s and steps/s, never counting the compile
            # Data counters (see data/pipeline.py); the many that stay 0 on clean data are left out.
            last_metrics.update({f"data/{k}": v for k, v in data_stats.read().items() if v or k == "delivered"})
            writer.scalars(done, last_metrics, suffix=progress.summary(done))
        return 0 < max_bad <= streak

    def save(done: int, position: tuple[Position, ...], force: bool) -> None:
        nonlocal saved_step
        if done != saved_step and (force or checkpointer.due(done)):
            checkpointer.save(done, state, config, gather_positions(*position), force=force)
            saved_step = done

    def close() -> None:
        checkpointer.close()
        writer.close()
        progress.close()

    def diverged(done: int, position: tuple[Position, ...]) -> TrainingDiverged:
        """Saves step `done` (its state is the last finite one's), closes up, and says why the run stops."""
        save(done, position, force=True)
        close()
        return TrainingDiverged(
            f"stopped at step {done}: {max_bad} consecutive steps had a non-finite loss, gradient or update "
            f"(train.max_consecutive_nonfinite={max_bad}); the checkpoint at step {done} holds the parameters of "
            f"step {done - max_bad}, the last finite one; lower train.learning_rate or check the data"
        )

    feed = Prefetch(next_batch, depth=2, name="train-feed", nice=FEED_NICE)
    streak = trainer.no_streak()
    previous = None  # (done, metrics, position) of the step dispatched before the current one
    compiled_for: set[int | None] = set()  # the text lengths the step was compiled for (None: no buckets)
    try:
        for step in range(start_step, num_steps):
            batch, position, captions = next(feed)
            length = None if agreement is None else batch["ids"].shape[1]
            if length not in compiled_for:  # the first step, and with buckets each new length's
                progress.compiling("" if length is None else f" for {length}-token captions")
                compiled_for.add(length)
            state, metrics = trainer.train_step(state, text.params, batch, streak)
            progress.dispatched()
            streak, done = metrics["nonfinite_streak"], step + 1
            if previous is not None and observe(*previous[:2]):
                # The step just dispatched was told to change nothing: `state` is still that of step `previous`.
                raise diverged(previous[0], previous[2])
            previous = (done, metrics, position)
            if config.train.sample_every and (done % config.train.sample_every == 0 or done == num_steps):
                write_samples(done, batch, captions)
            if periodic_eval is not None and (periodic_eval.due(done) or done == num_steps):
                writer.scalars(done, periodic_eval(ema_weights()), suffix="(evaluation)")
            preempted = preemption.reached(done)
            if done == num_steps or preempted:
                if observe(done, metrics):  # the last step ended a streak
                    raise diverged(done, position)
                save(done, position, force=True)
            else:
                save(done, position, force=False)
            if preempted:
                close()
                log(
                    f"preempted: stopped after step {done} with a checkpoint in {workdir}; rerun the same command "
                    "to resume"
                )
                return last_metrics
    finally:
        if agreement is not None:
            agreement.close()  # a feed thread waiting for a process that stopped first
        feed.close()
    close()
    log(f"finished at step {num_steps}; checkpoints in {workdir}")
    return last_metrics


def _compiled_since(start: tuple[int, int]) -> str:
    """'compilation cache: N programs loaded, M compiled' since `start` (compile_cache.counts() then)."""
    loaded, compiled = (now - then for now, then in zip(compile_cache.counts(), start))
    return f"compilation cache: {loaded} programs loaded, {compiled} compiled"


def read(values: dict) -> dict:
    """Device values on the host (waits until they are computed). Its own function so a test can see when the
    loop reads."""
    return jax.device_get(values)


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` after checking that it can be: a path that is a file, or whose nearest existing parent
    is a file or read-only, is a ConfigError naming it (nothing is created). gs:// paths are created as they are."""
    if "://" not in workdir:
        path = os.path.abspath(workdir)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--workdir {workdir!r} exists and is a file, not a folder")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f"--workdir {workdir!r} cannot be created: {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--workdir {workdir!r} cannot be {'written' if parent == path else 'created'}: "
                f"{parent} is not writable"
            )
    try:
        tf.io.gfile.makedirs(workdir)
    except (OSError, tf.errors.OpError) as e:
        raise ConfigError(f"--workdir {workdir!r} cannot be created: {getattr(e, 'message', None) or e}") from None
