"""imagen-jax: Imagen (frozen T5 + diffusion U-Net cascade) in JAX/Flax NNX."""
