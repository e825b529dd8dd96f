"""The low-res conditioning of super-resolution stages: made from the target by antialiased downsampling
(training), then corrupted by noise conditioning augmentation (Imagen section 2.5, after Ho et al. 2021).

The SR model is conditioned on a low-resolution image corrupted by the stage's own forward diffusion at an
augmentation time `aug_t`, and is told `aug_t`. Training draws aug_t ~ U(0, 1) per example, so the model
learns to fix everything from clean to pure noise; sampling uses one fixed level (`--sr_noise_level`; the
paper found 0.1-0.3 best), which hides the base stage's artefacts from the SR stage.

With a discrete schedule aug_t stands for timestep round(aug_t * 1000): DeepFloyd IF's stage II noises its
input at level 0.25 (timestep 250, diffusers' `noise_level=250`) after upscaling it with `resize_align_corners`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.losses import q_sample
from imagen_jax.diffusion.schedule import NUM_TIMESTEPS, is_discrete


def downsample(images: jax.Array, size: int) -> jax.Array:
    """[B,H,W,C] -> [B,size,size,C], antialiased (bicubic with a widened kernel): the training low-res input.

    At sampling the low-res input is the previous stage's output instead; both are upsampled back inside
    the SR model by the same `upsample_lowres`.
    """
    b, _, _, c = images.shape
    out = jax.image.resize(images.astype(jnp.float32), (b, size, size, c), method="cubic", antialias=True)
    return jnp.clip(out, -1.0, 1.0)


def _align_corners_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) of each output position, computed in float32 as PyTorch does:
    source coordinate i * (in - 1) / (out - 1), its floor, and the fraction past it."""
    scale = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0.0)
    src = scale * np.arange(size_out, dtype=np.float32)
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return lo, np.minimum(lo + 1, size_in - 1), frac


def resize_align_corners(images: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """[B,H,W,C] -> [B,h,w,C] (size: s or (h, w)), bilinear with corners aligned: PyTorch's
    F.interpolate(mode='bilinear', align_corners=True), with which DeepFloyd IF upscales its stage II input.
    jax.image.resize samples at half-pixel centres instead. Separable, as gathers and float32 blends (no matmul,
    so no reduced-precision passes on accelerators)."""
    height, width = (size, size) if isinstance(size, int) else size
    x = images.astype(jnp.float32)
    for axis, size_out in ((2, width), (1, height)):  # width, then height: PyTorch's rounding order
        lo, hi, frac = _align_corners_taps(x.shape[axis], size_out)
        shape = [1] * x.ndim
        shape[axis] = size_out
        w = jnp.asarray(frac).reshape(shape)
        x = (1.0 - w) * jnp.take(x, lo, axis=axis) + w * jnp.take(x, hi, axis=axis)
    return x


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


def _discrete_levels(aug_t: jax.Array, schedule: str) -> jax.Array:
    """A discrete schedule's aug_t ~ U(0, max_t) as the timestep it falls in, k / 1000 with k = floor(1000 aug_t)."""
    if not is_discrete(schedule):
        return aug_t
    k = jnp.minimum(jnp.floor(aug_t * NUM_TIMESTEPS), NUM_TIMESTEPS - 1)
    return k / NUM_TIMESTEPS


def training_augmentation(
    lowres: jax.Array, key: jax.Array, schedule: str, max_t: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Random augmentation for a training batch: returns (augmented lowres, aug_t ~ U(0, max_t) per example;
    a discrete schedule: k / 1000, k uniform below 1000 max_t). key: one for the batch, or [B] keys (each
    example's draws then depend on its key alone). The paper draws from U(0, 1); a smaller max_t spends a
    short training run on the levels sampling uses."""
    if key.ndim:
        keys = jax.vmap(jax.random.split)(key)
        aug_t = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 0.0, max_t))(keys[:, 0])
        aug_t = _discrete_levels(aug_t, schedule)
        return augment_lowres(lowres, aug_t, keys[:, 1], schedule), aug_t
    t_key, noise_key = jax.random.split(key)
    aug_t = _discrete_levels(jax.random.uniform(t_key, (lowres.shape[0],), jnp.float32, 0.0, max_t), schedule)
    return augment_lowres(lowres, aug_t, noise_key, schedule), aug_t


def sampling_augmentation(
    lowres: jax.Array, level: float, key: jax.Array, schedule: str
) -> tuple[jax.Array, jax.Array]:
    """Fixed-level augmentation at sampling: returns (augmented lowres, aug_t = level for every example).
    With a discrete schedule, level 0.25 is diffusers' `add_noise(lowres, noise, 250)`."""
    check_noise_level(level)
    aug_t = jnp.full((lowres.shape[0],), level, jnp.float32)
    return augment_lowres(lowres, aug_t, key, schedule), aug_t
