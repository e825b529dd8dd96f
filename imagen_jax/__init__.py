"""imagen-jax: Imagen (frozen T5 + diffusion U-Net cascade) in JAX/Flax NNX."""

import flax

# Parameters carry logical axis names; imagen_jax.parallel turns them into shardings and the jitted init
# creates them sharded. Flax's eager variable sharding would instead demand a mesh at every module
# construction (tests, eval_shape), so it is off for the whole package.
flax.config.update("flax_always_shard_variable", False)
