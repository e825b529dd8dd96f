"""The jitted train step: frozen T5 -> diffusion loss -> optimizer update -> EMA.

The frozen T5 encodes the step's whole batch once, before the micro-batch loop: its weights are gathered once per
step however many micro-batches there are (issue 29, point 1), and its activations are never kept (no gradient).

One pure function over the train-state pytree, compiled once with explicit in/out shardings and the state
donated, so a step never holds two copies of the parameters. Images arrive as uint8 (a quarter of float32's
bytes to transfer) and are mapped to [-1,1] here, on the device.

Non-finite steps are counted on the device, so the loop never waits for a step to decide on the next: each
step takes the streak of consecutive non-finite steps before it and returns the new one. A step whose loss,
gradients or parameters are not finite keeps the old parameters, EMA and optimizer moments; once the streak
has reached `train.max_consecutive_nonfinite`, a step changes nothing at all (not even its counter), so
the loop, reading the streak a step late, stops with exactly the state of the step that ended the streak.

With train.microbatches = k the batch is processed in k parts by a compiled loop that sums gradients (gradient
accumulation): the same update as one pass over the whole batch (every example draws its noise, time and text
dropout from its own key), with a k-th of the activations in memory. Only the model's dropout masks are drawn per part.

Only the trained parameters (train/trainable.py) are differentiated, optimized and averaged into the EMA; the frozen
ones enter the loss as constants and leave the step bit for bit as they came. A LoRA run's adapters are merged into
their kernels inside the loss, at use (stage/lora.py), so the gradient reaches the adapters alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import images as images_lib
from imagen_jax.diffusion import augment, diffusion_loss
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel.activations import activation_layout
from imagen_jax.stage import lora
from imagen_jax.stage.model import (
    FROZEN_PARAMS,
    conditioning_image,
    lowres_size,
    make_apply_fn,
    train_size,
)
from imagen_jax.train import trainable


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay warmed up as (1 + step) / (10 + step), so early averages are not dominated by the init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    text_fn: Callable | None,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: dict,
    t5_shardings: Any,
) -> Callable[[dict, Any, dict], tuple[dict, dict]]:
    """Returns step(state, t5_params, batch, streak) -> (state, metrics), jitted with shardings and donation.

    text_fn(t5_params, ids, mask) -> [B,L,D] is the frozen encoder's pure forward (T5Encoder.apply).

    batch: {'image': [B,H,W,3] uint8 (or floats already in [-1,1]), 'ids': [B,L] int32, 'mask': [B,L] bool},
    sharded over the batch axes. With precomputed text (text_fn None, t5_params {}), 'text' [B,L,D] replaces
    'ids'. An optional 'weight' [B] float32 scales each example's loss (DreamBooth's prior preservation).
    streak: int32 scalar, the non-finite steps in a row before this one (0 to start; then the last step's
    metrics['nonfinite_streak']).
    """
    apply_fn = make_apply_fn(graphdef)
    dcfg = config.diffusion
    use_dropout = float(config.model.dropout) > 0
    lowres = lowres_size(config, train_size(config))  # SR stages: the low-res side of a training crop
    microbatches = int(config.train.microbatches)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES))
    max_nonfinite = int(config.train.max_consecutive_nonfinite)  # 0: never stop
    rules = mesh_lib.param_rules(config.mesh)
    trained_paths = trainable.trained_paths(config, state_shardings["params"])
    trained_shardings = trainable.split(state_shardings["params"], trained_paths)[0]

    def encode(t5_params: Any, batch: dict) -> dict:
        """The batch with T5's embeddings as 'text' (the frozen T5 runs inside the step, on the whole batch; its
        params are an argument, never differentiated), or as it came with precomputed text."""
        if text_fn is None:
            return batch
        with activation_layout(mesh, rules):  # T5 pins its activations to the mesh (batch, tensor)
            text = jax.lax.stop_gradient(text_fn(t5_params, batch["ids"], batch["mask"]))
        return {**{k: v for k, v in batch.items() if k != "ids"}, "text": text}

    def micro_loss(params: Any, frozen: Any, part: dict, dropout_key: jax.Array) -> tuple[jax.Array, dict]:
        """The loss of one micro-batch (`params`: the trained parameters, `frozen`: the others); `part` carries each
        example's own keys ('loss_key', 'augment_key')."""
        params = lora.merged(config, trainable.combine(params, frozen))
        # the U-Net pins its activations to the mesh (batch, tensor) and its weights at each use
        with activation_layout(mesh, rules):
            return _micro_loss(params, part, dropout_key)

    def _micro_loss(params: Any, part: dict, dropout_key: jax.Array) -> tuple[jax.Array, dict]:
        # The float32 parameters as they are: the layers cast them to the compute dtype where used, and their
        # gradients come back in float32 (models/layers.py `_project`).
        text = part["text"]
        model_kwargs = {"dropout_key": dropout_key} if use_dropout else {}
        if lowres is not None:
            z = conditioning_image(config, augment.downsample(part["image"], lowres), part["image"].shape[1])
            model_kwargs["lowres"], model_kwargs["lowres_t"] = augment.training_augmentation(
                z, part["augment_key"], dcfg.schedule, float(dcfg.sr_train_noise_max)
            )
        return diffusion_loss(
            apply_fn,
            params,
            part["image"],
            text,
            part["mask"],
            part["loss_key"],
            schedule=dcfg.schedule,
            objective=dcfg.objective,
            cond_drop_prob=dcfg.cond_drop_prob,
            model_kwargs=model_kwargs,
            variance_loss=dcfg.variance_loss,
            variance_loss_weight=float(dcfg.variance_loss_weight),
            weights=part.get("weight"),  # DreamBooth: instance and class examples weighed apart (loop.py)
        )

    def grad_fn(params: Any, frozen: Any, part: dict, dropout_key: jax.Array) -> tuple:
        """((loss, aux), grads of the trained `params`), the gradients laid out like the parameters
        (reduce-scattered under FSDP, never a whole copy per device; the micro-batch loop's running sum too)."""
        (loss, aux), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, frozen, part, dropout_key)
        return (loss, aux), jax.lax.with_sharding_constraint(grads, trained_shardings)

    def loss_and_grads(params: Any, frozen: Any, batch: dict, dropout_key: jax.Array) -> tuple:
        """Mean loss and gradients over the batch, in `microbatches` sequential parts (a compiled loop that
        sums gradients; activations are held for one part at a time). Micro-batch i takes examples
        i, i + k, i + 2k, ... of every device's shard, so each part stays spread over all devices."""
        if microbatches == 1:
            return grad_fn(params, frozen, batch, dropout_key)
        parts = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1), micro_sharding
            ),
            batch,
        )

        def accumulate(carry: tuple, inputs: tuple) -> tuple:
            part, index = inputs
            (loss, aux), grads = grad_fn(params, frozen, part, jax.random.fold_in(dropout_key, index))
            return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

        zero = jax.tree.map(
            jnp.zeros_like, jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], parts), dropout_key)
        )
        total, _ = jax.lax.scan(accumulate, zero, (parts, jnp.arange(microbatches)))
        return jax.tree.map(lambda x: x / microbatches, total)

    def step(state: dict, t5_params: Any, batch: dict, streak: jax.Array) -> tuple[dict, dict]:
        if batch["image"].dtype == jnp.uint8:
            batch = {**batch, "image": images_lib.from_uint8(batch["image"])}
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        loss_key, dropout_key, augment_key = jax.random.split(key, 3)
        # One key per example (by its index in the global batch): the draws do not depend on the micro-batching.
        index = jnp.arange(batch["image"].shape[0])
        batch = {
            **batch,
            "loss_key": jax.vmap(lambda i: jax.random.fold_in(loss_key, i))(index),
            "augment_key": jax.vmap(lambda i: jax.random.fold_in(augment_key, i))(index),
        }
        # Frozen parameters (IF's null_text always: decoupled weight decay would move even a parameter without
        # gradient) get no gradient, no update and no EMA step: they leave the step exactly as they came.
        trained, frozen = trainable.split(state["params"], trained_paths)
        (loss, aux), grads = loss_and_grads(trained, frozen, encode(t5_params, batch), dropout_key)
        updates, opt_state = tx.update(grads, state["opt_state"], trained)
        trained = optax.apply_updates(trained, updates)
        # FROZEN_PARAMS (IF's null_text) in a full run have optimizer moments but never move: decoupled weight
        # decay would move even a parameter without gradient.
        trained = {k: state["params"][k] if k in FROZEN_PARAMS else v for k, v in trained.items()}
        params = trainable.combine(trained, frozen)
        decay = ema_decay(state["step"], config.train.ema_decay)
        ema_trained, ema_frozen = trainable.split(state["ema"], trained_paths)
        ema = trainable.combine(
            jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), ema_trained, trained), ema_frozen
        )
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
        # Numerical guard: a step whose loss, gradients or new parameters are not finite keeps the old
        # parameters, EMA and optimizer moments; counters (step, the schedule's count) still advance.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        # After a full streak nothing moves, counters included: the loop has been told to stop.
        halted = (streak >= max_nonfinite) if max_nonfinite else jnp.zeros((), bool)
        keep_floats, keep_ints = ~finite | halted, halted

        def guard(new: Any, old: Any) -> Any:
            keep = keep_ints if jnp.issubdtype(new.dtype, jnp.integer) else keep_floats
            return jnp.where(keep, old, new)

        params, ema, opt_state = (
            jax.tree.map(guard, new, old)
            for new, old in ((params, state["params"]), (ema, state["ema"]), (opt_state, state["opt_state"]))
        )
        streak = jnp.where(halted, streak, jnp.where(finite, 0, streak + 1)).astype(jnp.int32)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "learning_rate": schedule(state["step"]),
            "nonfinite": 1 - finite.astype(jnp.int32),
            "nonfinite_streak": streak,
            **aux,
        }
        new_state = {
            "step": state["step"] + 1 - halted.astype(jnp.int32),
            "rng": state["rng"],
            "params": params,
            "ema": ema,
            "opt_state": opt_state,
        }
        return new_state, metrics

    batch_sharding = mesh_lib.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, t5_shardings, batch_sharding, mesh_lib.replicated(mesh)),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
