"""The low-res conditioning of super-resolution stages: made from the target by antialiased downsampling
(training), then corrupted by noise conditioning augmentation (Imagen section 2.5, after Ho et al. 2021).

The SR model is conditioned on a low-resolution image corrupted by the stage's own forward diffusion at an
augmentation time `aug_t`, and is told `aug_t`. Training draws aug_t ~ U(0, 1) per example, so the model
learns to fix everything from clean to pure noise; sampling uses one fixed level (`--sr_noise_level`; the
paper found 0.1-0.3 best), which hides the base stage's artefacts from the SR stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.losses import q_sample


def downsample(images: jax.Array, size: int) -> jax.Array:
    """[B,H,W,C] -> [B,size,size,C], antialiased (bicubic with a widened kernel): the training low-res input.

    At sampling the low-res input is the previous stage's output instead; both are upsampled back inside
    the SR model by the same `upsample_lowres`.
    """
    b, _, _, c = images.shape
    out = jax.image.resize(images.astype(jnp.float32), (b, size, size, c), method="cubic", antialias=True)
    return jnp.clip(out, -1.0, 1.0)


def check_noise_level(level: float) -> None:
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"sr noise level (augmentation time) must be in [0, 1], got {level}")


def augment_lowres(lowres: jax.Array, aug_t: jax.Array, key: jax.Array, schedule: str) -> jax.Array:
    """q(z_aug | lowres): alpha(aug_t) * lowres + sigma(aug_t) * noise, per example; key: one or [B] keys."""
    if key.ndim == 0:
        noise = jax.random.normal(key, lowres.shape, jnp.float32)
    else:
        noise = jax.vmap(lambda k: jax.random.normal(k, lowres.shape[1:], jnp.float32))(key)
    return q_sample(lowres.astype(jnp.float32), aug_t, noise, schedule)


def training_augmentation(
    lowres: jax.Array, key: jax.Array, schedule: str, max_t: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Random augmentation for a training batch: returns (augmented lowres, aug_t ~ U(0, max_t) per example).
    key: one for the batch, or [B] keys (each example's draws then depend on its key alone). The paper draws
    from U(0, 1); a smaller max_t spends a short training run on the levels sampling uses."""
    if key.ndim:
        keys = jax.vmap(jax.random.split)(key)
        aug_t = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 0.0, max_t))(keys[:, 0])
        return augment_lowres(lowres, aug_t, keys[:, 1], schedule), aug_t
    t_key, noise_key = jax.random.split(key)
    aug_t = jax.random.uniform(t_key, (lowres.shape[0],), jnp.float32, 0.0, max_t)
    return augment_lowres(lowres, aug_t, noise_key, schedule), aug_t


def sampling_augmentation(
    lowres: jax.Array, level: float, key: jax.Array, schedule: str
) -> tuple[jax.Array, jax.Array]:
    """Fixed-level augmentation at sampling: returns (augmented lowres, aug_t = level for every example)."""
    check_noise_level(level)
    aug_t = jnp.full((lowres.shape[0],), level, jnp.float32)
    return augment_lowres(lowres, aug_t, key, schedule), aug_t
