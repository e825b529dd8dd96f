"""The train state (params, EMA, optimizer state, step, RNG) as a plain pytree, born sharded.

The state is a dict of pure arrays so that optax, orbax and jax.jit all see the same simple tree; the U-Net
structure lives in a separate `nnx.GraphDef` that the jitted steps close over. Its params are the model's (with a
LoRA run's adapters beside their kernels: stage/lora.py); the optimizer state covers only the trained ones
(train/trainable.py), so frozen parameters cost no optimizer memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import lora
from imagen_jax.stage.model import StageModel, build_model
from imagen_jax.train import trainable


def train_params(config: ml_collections.ConfigDict, model: StageModel) -> tuple[dict, dict]:
    """(abstract params, shardings) of the train state's params: the model's, plus a LoRA run's adapters."""
    return lora.with_adapters(config, model.abstract_params, model.param_shardings)


def state_shardings(
    config: ml_collections.ConfigDict, model: StageModel, tx: optax.GradientTransformation, mesh: Mesh
) -> dict:
    """Shardings for every leaf of the train state: optimizer moments shaped like their (trained) parameter follow
    its sharding; others (Adafactor's factored row/column statistics, counters) are small and replicated."""
    abstract, param_shardings = train_params(config, model)
    trained = trainable.trained_paths(config, abstract)
    abstract_trained, shardings_trained = (trainable.split(t, trained)[0] for t in (abstract, param_shardings))
    opt_abstract = jax.eval_shape(tx.init, abstract_trained)
    replicated = mesh_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda moment, param, s: s if moment.shape == param.shape else replicated,
        opt_abstract,
        abstract_trained,
        shardings_trained,
        transform_non_params=lambda _: replicated,
    )
    return {
        "step": replicated,
        "rng": replicated,
        "params": param_shardings,
        "ema": param_shardings,
        "opt_state": opt_shardings,
    }


def _state_from_params(config: ml_collections.ConfigDict, tx: optax.GradientTransformation, params: dict) -> dict:
    """The train state at step 0 around the model's ``params`` (a LoRA run adds fresh adapters), which are also the
    EMA's start; the optimizer state covers the trained parameters alone."""
    key = jax.random.key(config.seed)
    params = lora.add_adapters(config, params, jax.random.fold_in(key, 1))
    return {
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(key),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),
        "opt_state": tx.init(trainable.split(params, trainable.trained_paths(config, params))[0]),
    }


def fresh_state(config: ml_collections.ConfigDict, text_dim: int, tx: optax.GradientTransformation) -> dict:
    """A new train state; call it under jit (init_state) or jax.eval_shape (abstract_state)."""
    model = build_model(config, text_dim, seed=config.seed)
    return _state_from_params(config, tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def init_state(
    config: ml_collections.ConfigDict,
    text_dim: int,
    tx: optax.GradientTransformation,
    shardings: dict,
    params: dict | None = None,
) -> dict:
    """Initialises the train state inside jit so every array is created directly in its sharding; with `params`
    (placed in their shardings: train.init_from) those are the parameters and the EMA's start instead of a random
    initialisation."""
    if params is None:
        return jax.jit(lambda: fresh_state(config, text_dim, tx), out_shardings=shardings)()
    return jax.jit(lambda given: _state_from_params(config, tx, given), out_shardings=shardings)(params)


def abstract_state(
    config: ml_collections.ConfigDict, text_dim: int, tx: optax.GradientTransformation, shardings: dict
) -> dict:
    """ShapeDtypeStructs carrying shardings: orbax's restore target, valid for any mesh."""
    shapes = jax.eval_shape(lambda: fresh_state(config, text_dim, tx))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
