"""Flax settings the whole package relies on; imported by every module that builds NNX variables (models, text).

Parameters carry logical axis names; imagen_jax.parallel turns them into shardings and the jitted init creates
them sharded. Flax's eager variable sharding would instead demand a mesh at every module construction (tests,
eval_shape), so it is off. Not done in imagen_jax/__init__.py, so that command lines can parse their arguments
without importing Flax and JAX first.
"""

import flax

flax.config.update("flax_always_shard_variable", False)
