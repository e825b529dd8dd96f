"""Sampling one stage: the single path that sample.py's cascade and the training loop's sample grids share.

Sampling runs on a mesh: the parameters stay where their shardings put them (training's, or
`model.local_mesh`'s on one host), the batch is split over the mesh's batch axes (padded to a multiple of
their size with copies of its first example, trimmed off again) and the images come back whole to every
process. In a multi-process run every process must make the same call, like a training step.

Image i depends only on seeds[i], its text and (SR stages) its low-res input: its sampling noise and its
low-res augmentation noise both derive from seeds[i], kept apart by `AUGMENT_STREAM`. SR stages take the
noise-augmentation level of their input from `config.diffusion.sr_noise_level` unless the caller gives one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from imagen_jax.diffusion import NAMED_TIMESTEPS, Denoiser, augment, q_sample
from imagen_jax.diffusion import sample as diffusion_sample
from imagen_jax.errors import StageError
from imagen_jax.parallel import activations
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel.activations import activation_layout
from imagen_jax.stage import model as model_lib
from imagen_jax.stage.model import compute_dtype, conditioning_image, lowres_size
from imagen_jax.text import T5Encoder

AUGMENT_STREAM = 0x5EED


def sample(
    config: ml_collections.ConfigDict,
    denoiser: Denoiser,
    params: Any,
    text: np.ndarray | jax.Array,
    text_mask: np.ndarray | jax.Array,
    seeds: Sequence[int],
    *,
    mesh: Mesh,
    steps: int | str,
    guidance_scale: float,
    sampler: str = "ddpm",
    lowres: np.ndarray | jax.Array | None = None,
    sr_noise_level: float | None = None,
    size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    noise: np.ndarray | None = None,
    lowres_noise: np.ndarray | None = None,
    init_image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
    resample: int = 1,
    jump_length: int = 1,
    guidance_interval: tuple[float, float] = (-math.inf, math.inf),
    guidance_rescale: float = 0.0,
) -> np.ndarray:
    """Images in [-1,1], [B,size,size,3] (size: data.image_size, or e.g. a training crop for SR stages), on
    every process. `params` live on `mesh`; text, mask and lowres are host data or global arrays on `mesh`
    (`mesh_lib.place_rows`). `steps`: a count, or with a discrete schedule (IF's) a named step list ('smart50').

    SR stages need `lowres` [B,s,s,3] with s = `lowres_size(config, size)`; it is noise-augmented at
    `sr_noise_level` (default: the config's), after upscaling for kinds that take it at full size (IF).
    `noise` ([B,...] or [steps + 1, B, ...], see `diffusion.sample`) and `lowres_noise` (the augmentation's, shaped
    like what is augmented) replace the draws from the seeds: to reproduce another implementation's samples.
    Editing: `init_image` [B,size,size,3] in [-1,1], `mask` [B,size,size,1] (1 = regenerate), `strength`,
    `resample`, `jump_length`, and the guidance options `guidance_interval` (log-SNR) and `guidance_rescale`: see
    `diffusion.sample`."""
    size = int(config.data.image_size) if size is None else int(size)
    count = len(seeds)
    rows = mesh_lib.padded_rows(count, mesh)
    place = lambda x: mesh_lib.place_rows(x, rows, mesh)  # noqa: E731
    keys = jax.vmap(jax.random.key)(place(np.asarray(seeds, dtype=np.uint32)))
    model_kwargs = None
    low = lowres_size(config, size)
    dcfg = config.diffusion
    if low is not None:
        expected = (count, low, low, 3)
        if lowres is None or tuple(lowres.shape) != expected:
            got = None if lowres is None else tuple(lowres.shape)
            raise StageError(f"this {size}px super-resolution stage needs low-res input of shape {expected}, got {got}")
        level = dcfg.sr_noise_level if sr_noise_level is None else sr_noise_level
        image = conditioning_image(config, place(lowres), size)
        if lowres_noise is None:
            augment_keys = jax.vmap(lambda k: jax.random.fold_in(k, AUGMENT_STREAM))(keys)
            z, aug_t = augment.sampling_augmentation(image, level, augment_keys, dcfg.schedule)
        else:
            augment.check_noise_level(level)
            aug_t = jnp.full((rows,), level, jnp.float32)
            z = q_sample(image, aug_t, place(np.asarray(lowres_noise, np.float32)), dcfg.schedule)
        model_kwargs = {"lowres": z, "lowres_t": aug_t}
    if noise is not None:
        noise = np.asarray(noise, np.float32)
        if noise.ndim == 4:
            noise = place(noise)
        else:  # [steps + 1, B, ...]: rows padded as `place` pads them, the whole array on every device
            noise = np.concatenate([noise, np.repeat(noise[:, :1], rows - count, axis=1)], axis=1)
            noise = jax.device_put(noise, mesh_lib.replicated(mesh))
    # activations split like the batch, weights gathered at each use, as in training
    params = in_compute_dtype(params, compute_dtype(config.train.compute_dtype))
    with activation_layout(mesh, mesh_lib.param_rules(config.mesh)):
        x = diffusion_sample(
            denoiser,
            params,
            place(text),
            place(text_mask),
            keys,
            shape=(rows, size, size, 3),
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            schedule=dcfg.schedule,
            objective=dcfg.objective,
            thresholding=dcfg.thresholding,
            percentile=dcfg.dynamic_threshold_percentile,
            threshold_max=dcfg.threshold_max or math.inf,
            variance=dcfg.variance,
            dpm_start_log_snr=dcfg.dpm_start_log_snr,
            noise=noise,
            progress=progress,
            chunk_size=None if progress is None else max(1, step_count(steps) // 10),
            model_kwargs=model_kwargs,
            init_image=None if init_image is None else place(np.asarray(init_image, np.float32)),
            mask=None if mask is None else place(np.asarray(mask, np.float32)),
            strength=strength,
            resample=resample,
            jump_length=jump_length,
            guidance_interval=guidance_interval,
            guidance_rescale=guidance_rescale,
        )
    return mesh_lib.gather_rows(x, count, mesh)


# the EMA's kernels cast once per sampling call, not at every layer of every step (issue 29, point 5)
in_compute_dtype = jax.jit(model_lib.in_compute_dtype, static_argnums=1)


def step_count(steps: int | str) -> int:
    """Model evaluations of `steps`: the count itself, or the length of a named step list ('smart50': 50)."""
    return len(NAMED_TIMESTEPS[steps]) if isinstance(steps, str) else int(steps)


def encode(
    encoder: T5Encoder, ids: np.ndarray | jax.Array, mask: np.ndarray | jax.Array, mesh: Mesh
) -> tuple[jax.Array, jax.Array]:
    """T5 embeddings [B,L,D] and mask [B,L] of token `ids` [B,L] (host data or global arrays on `mesh`), computed
    with the encoder's parameters where they are (on `mesh`) and the batch split over its batch axes; returned
    whole on every device of `mesh`, ready for `sample`. Every process must make the same call."""
    count = len(ids)
    rows = mesh_lib.padded_rows(count, mesh)
    ids, mask = mesh_lib.place_rows(ids, rows, mesh), mesh_lib.place_rows(mask, rows, mesh)
    with activation_layout(mesh):
        return _encode(encoder.apply, encoder.state, ids, mask, count, mesh_lib.replicated(mesh))


@activations.jit(static_argnums=(0, 4, 5))
def _encode(apply: Callable, state: Any, ids: jax.Array, mask: jax.Array, count: int, out: Any):
    text = apply(state, ids, mask)[:count]
    return jax.lax.with_sharding_constraint((text, mask[:count]), out)
