"""Flax settings the whole package relies on; imported by every module that builds NNX variables (models, text).

Parameters carry logical axis names; imagen_jax.parallel turns them into shardings and the jitted init creates
them sharded. Flax's eager variable sharding would instead demand a mesh at every module construction (tests,
eval_shape), so it is off. Not done in imagen_jax/__init__.py, so that command lines can parse their arguments
without importing Flax and JAX first.

Every model is initialised from `init_rngs(seed)`: flax's key stream with a cheaper counter update (`_Draws`).
"""

import flax
import jax
from flax import nnx

flax.config.update("flax_always_shard_variable", False)


class _Draws(nnx.RngStream):
    """flax's `RngStream` drawing the same keys (`fold_in(key, count)`, then count + 1), its count replaced whole.
    flax's own `count[...] += 1` compares the new count's `.sharding` with the old, which on a tracer builds an
    error message by scanning the whole trace: building a model under `jit` or `eval_shape` (every init, every
    abstract model) took time quadratic in its parameters, ~10 s for the 2B-parameter U-Net, ~1 s this way."""

    def __call__(self) -> jax.Array:
        key = jax.random.fold_in(self.key[...], self.count[...])
        self.count.set_value(self.count[...] + 1)
        return key


def init_rngs(seed: int | jax.Array) -> nnx.Rngs:
    """`nnx.Rngs(seed)` (an int or a key) drawing through `_Draws`: the same keys, so the same initial weights."""
    rngs = nnx.Rngs(seed)
    rngs.default = _Draws(rngs.default.key[...], tag="default")
    return rngs
