"""Sampling one stage: the single path that sample.py's cascade and the training loop's sample grids share.

Image i depends only on seeds[i], its text and (SR stages) its low-res input: its sampling noise and its
low-res augmentation noise both derive from seeds[i], kept apart by `AUGMENT_STREAM`. SR stages take the
noise-augmentation level of their input from `config.diffusion.sr_noise_level` unless the caller gives one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax.diffusion import augment
from imagen_jax.diffusion import sample as diffusion_sample
from imagen_jax.errors import StageError
from imagen_jax.stage.model import lowres_size

AUGMENT_STREAM = 0x5EED


def sample(
    config: ml_collections.ConfigDict,
    apply_fn: Callable,
    params: Any,
    text: jax.Array,
    text_mask: jax.Array,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    sampler: str = "ddpm",
    lowres: np.ndarray | jax.Array | None = None,
    sr_noise_level: float | None = None,
    size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> jax.Array:
    """Images in [-1,1], [B,size,size,3] (size: data.image_size, or e.g. a training crop for SR stages).

    SR stages need `lowres` [B,s,s,3] with s = `lowres_size(config, size)`; it is noise-augmented at
    `sr_noise_level` (default: the config's)."""
    size = int(config.data.image_size) if size is None else int(size)
    seeds = jnp.asarray(seeds, dtype=jnp.uint32)
    keys = jax.vmap(jax.random.key)(seeds)
    model_kwargs = None
    low = lowres_size(config, size)
    if low is not None:
        expected = (len(seeds), low, low, 3)
        if lowres is None or tuple(lowres.shape) != expected:
            got = None if lowres is None else tuple(lowres.shape)
            raise StageError(f"this {size}px super-resolution stage needs low-res input of shape {expected}, got {got}")
        level = config.diffusion.sr_noise_level if sr_noise_level is None else sr_noise_level
        augment_keys = jax.vmap(lambda k: jax.random.fold_in(k, AUGMENT_STREAM))(keys)
        z, aug_t = augment.sampling_augmentation(jnp.asarray(lowres), level, augment_keys, config.diffusion.schedule)
        model_kwargs = {"lowres": z, "lowres_t": aug_t}
    return diffusion_sample(
        apply_fn,
        params,
        text,
        text_mask,
        keys,
        shape=(len(seeds), size, size, 3),
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        schedule=config.diffusion.schedule,
        objective=config.diffusion.objective,
        thresholding=config.diffusion.thresholding,
        percentile=config.diffusion.dynamic_threshold_percentile,
        dpm_start_log_snr=config.diffusion.dpm_start_log_snr,
        progress=progress,
        chunk_size=None if progress is None else max(1, steps // 10),
        model_kwargs=model_kwargs,
    )
