"""The train state (params, EMA, optimizer state, step, RNG) as a plain pytree, born sharded.

The state is a dict of pure arrays so that optax, orbax and jax.jit all see the same simple tree; the U-Net
structure lives in a separate `nnx.GraphDef` that the jitted steps close over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from imagen_jax.models import build_sr_unet, build_unet
from imagen_jax.parallel import mesh as mesh_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ValueError(f"compute dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


MODEL_KINDS = {"unet": build_unet, "efficient_unet": build_sr_unet}


def is_super_resolution(config: ml_collections.ConfigDict) -> bool:
    """SR stages condition on a low-res image; the base stage does not."""
    return config.model.get("kind", "unet") == "efficient_unet"


def build_model(config: ml_collections.ConfigDict, text_dim: int, seed: int = 0) -> nnx.Module:
    """The stage's U-Net as the config describes it (params float32, activations in train.compute_dtype)."""
    kind = config.model.get("kind", "unet")
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={kind!r} is not one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](
        config.model,
        image_size=config.data.image_size,
        text_dim=text_dim,
        rngs=nnx.Rngs(seed),
        dtype=compute_dtype(config.train.compute_dtype),
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the jitted functions close over: the U-Net's structure and the state's shardings."""

    graphdef: nnx.GraphDef
    abstract_params: Any  # nnx.State of ShapeDtypeStructs, with logical-axis metadata
    param_shardings: Any  # pure dict of NamedSharding, same tree as the params


def model_spec(config: ml_collections.ConfigDict, text_dim: int, mesh: Mesh) -> ModelSpec:
    """Shapes and shardings of the U-Net without allocating it (jax.eval_shape)."""
    abstract_model = nnx.eval_shape(lambda: build_model(config, text_dim))
    graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the U-Net has non-parameter state, which the train state does not carry: {rest}")
    rules = mesh_lib.rules_dict(config.mesh.rules)
    shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract_params, mesh, rules))
    return ModelSpec(graphdef, abstract_params, shardings)


def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh) -> dict:
    """Shardings for every leaf of the train state: optimizer moments shaped like their parameter follow its
    sharding; others (Adafactor's factored row/column statistics, counters) are small and replicated."""
    abstract = nnx.to_pure_dict(spec.abstract_params)
    opt_abstract = jax.eval_shape(tx.init, abstract)
    replicated = mesh_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda moment, param, s: s if moment.shape == param.shape else replicated,
        opt_abstract, abstract, spec.param_shardings, transform_non_params=lambda _: replicated,
    )
    return {
        "step": replicated,
        "rng": replicated,
        "params": spec.param_shardings,
        "ema": spec.param_shardings,
        "opt_state": opt_shardings,
    }


def fresh_state(config: ml_collections.ConfigDict, text_dim: int, tx: optax.GradientTransformation) -> dict:
    """A new train state; call it under jit (init_state) or jax.eval_shape (abstract_state)."""
    model = build_model(config, text_dim, seed=config.seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(config.seed)),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),
        "opt_state": tx.init(params),
    }


def init_state(config: ml_collections.ConfigDict, text_dim: int, tx: optax.GradientTransformation, shardings: dict) -> dict:
    """Initialises the train state inside jit so every array is created directly in its sharding."""
    return jax.jit(lambda: fresh_state(config, text_dim, tx), out_shardings=shardings)()


def abstract_state(config: ml_collections.ConfigDict, text_dim: int, tx: optax.GradientTransformation, shardings: dict) -> dict:
    """ShapeDtypeStructs carrying shardings: orbax's restore target, valid for any mesh."""
    shapes = jax.eval_shape(lambda: fresh_state(config, text_dim, tx))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
