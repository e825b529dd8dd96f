"""imagen-jax: Imagen (frozen T5 + diffusion U-Net cascade) in JAX/Flax NNX."""

from imagen_jax import xla_settings  # noqa: F401  (XLA_FLAGS before JAX starts; imports no JAX)
