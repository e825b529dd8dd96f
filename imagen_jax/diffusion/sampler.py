"""Ancestral DDPM sampling in continuous time, compiled as one XLA loop per chunk of steps.

Times run uniformly from 1 to 0 over `steps` steps. Each step from t to s < t makes one model call (on
the batch doubled for classifier-free guidance), converts the prediction to x0, thresholds it, and draws
x_s from the Gaussian posterior q(x_s | x_t, x0); the last step returns the thresholded x0 itself.

Speed: the step loop is a `lax.fori_loop` inside `jax.jit` whose bounds are traced, so every chunk (the
last partial one included), every step count and every chunk size reuse one executable. Step noise is
keyed by the global step index, so the result does not depend on the chunking.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.guidance import check_percentile, check_threshold_mode, guided_prediction, threshold
from imagen_jax.diffusion.losses import ApplyFn, check_objective, pred_to_x0
from imagen_jax.diffusion.schedule import alpha_sigma, check_schedule, log_snr

ProgressFn = Callable[[int, int], None]


def _posterior(x_t, x0, log_snr_t, log_snr_s):
    """Mean and variance of q(x_s | x_t, x0) for s < t (Kingma et al. 2021, VDM, eq. in log-SNR form)."""
    alpha_t, _ = alpha_sigma(log_snr_t)
    alpha_s, sigma_s = alpha_sigma(log_snr_s)
    # c = 1 - SNR_t / SNR_s: the share of x_t's noise that is not yet explained at time s.
    c = -jnp.expm1(log_snr_t - log_snr_s)
    mean = alpha_s * ((1.0 - c) / alpha_t * x_t + c * x0)
    return mean, jnp.square(sigma_s) * c


def _predict(apply_fn, params, x, t, text, text_mask, model_kwargs, guidance_scale, guided):
    """One model call; with guidance, on [cond; uncond] concatenated along the batch."""
    batch = x.shape[0]
    if not guided:
        drop = jnp.zeros((batch,), bool)
        return apply_fn(params, x, jnp.full((batch,), t), text, text_mask, drop, **model_kwargs)
    twice = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
    drop = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    kwargs = jax.tree.map(twice, dict(model_kwargs))
    pred = apply_fn(params, twice(x), jnp.full((2 * batch,), t), twice(text), twice(text_mask), drop, **kwargs)
    return guided_prediction(pred[:batch], pred[batch:], guidance_scale)


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "schedule", "objective", "thresholding", "percentile", "guided")
)
def _run_chunk(
    params, x, key, start, stop, steps, text, text_mask, model_kwargs, guidance_scale,
    *, apply_fn, schedule, objective, thresholding, percentile, guided,
):  # fmt: skip
    """Runs steps [start, stop) of `steps` on x (the state at time 1 - start/steps); key: one per example."""

    def body(i, x):
        t = 1.0 - i.astype(jnp.float32) / steps.astype(jnp.float32)
        s = 1.0 - (i + 1).astype(jnp.float32) / steps.astype(jnp.float32)
        log_snr_t, log_snr_s = log_snr(t, schedule), log_snr(s, schedule)
        pred = _predict(apply_fn, params, x, t, text, text_mask, model_kwargs, guidance_scale, guided)
        alpha_t, sigma_t = alpha_sigma(log_snr_t)
        x0 = threshold(pred_to_x0(pred.astype(jnp.float32), x, alpha_t, sigma_t, objective), thresholding, percentile)
        mean, var = _posterior(x, x0, log_snr_t, log_snr_s)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(key)
        return jnp.where(i == steps - 1, x0, mean + jnp.sqrt(var) * noise)

    return jax.lax.fori_loop(start, stop, body, x)


def sample(
    apply_fn: ApplyFn,
    params: Any,
    text: jax.Array,
    text_mask: jax.Array,
    key: jax.Array,
    *,
    shape: tuple[int, ...],
    steps: int,
    guidance_scale: float = 1.0,
    schedule: str = "cosine",
    objective: str = "eps",
    thresholding: str = "dynamic",
    percentile: float = 0.995,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Draws x0 [B, H, W, C] (float32; in [-1, 1] unless thresholding='none') for text [B, L, D].

    `apply_fn(params, x_t, t, text, text_mask, drop_text, **model_kwargs)` is a jit static argument: pass
    the same function object every call (not a fresh lambda or functools.partial) or each call recompiles.
    `shape` is the full batch shape [B, H, W, C]. `model_kwargs` leaves (e.g. the low-res image of an SR
    stage) must have the batch as leading axis; they are doubled along with x for guidance.
    `guidance_scale` 1.0 runs the conditional model alone; any other value costs one model call on a
    doubled batch per step. The loop runs in compiled chunks of `chunk_size` steps (default: all) and
    calls `progress(steps_done, steps)` after each chunk has finished. Same key -> same sample.
    `key` is one key for the batch, or a [B] array of keys, one per example: example b's noise then
    depends only on key[b], so an image is reproducible from its own seed whatever batch it is in.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    chunk_size = steps if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(shape) < 2 or shape[0] != text.shape[0]:
        raise ValueError(f"shape {tuple(shape)} must be [B, ...] with B = text batch {text.shape[0]}")
    check_schedule(schedule)
    check_objective(objective)
    check_threshold_mode(thresholding)
    check_percentile(percentile)

    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise ValueError("key must be a typed PRNG key (jax.random.key), not raw key data")
    keys = jax.random.split(key, shape[0]) if key.ndim == 0 else key
    if keys.shape != (shape[0],):
        raise ValueError(f"key must be one key or {shape[0]} keys (one per example), got shape {key.shape}")
    pairs = jax.vmap(jax.random.split)(keys)
    key_init, key_steps = pairs[:, 0], pairs[:, 1]
    x = jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(key_init)
    run = functools.partial(
        _run_chunk,
        apply_fn=apply_fn,
        schedule=schedule,
        objective=objective,
        thresholding=thresholding,
        percentile=float(percentile),
        guided=guidance_scale != 1.0,
    )
    steps_arr = jnp.asarray(steps, jnp.int32)
    scale = jnp.asarray(guidance_scale, jnp.float32)
    kwargs = dict(model_kwargs or {})
    for chunk in range(math.ceil(steps / chunk_size)):
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, steps)
        x = run(params, x, key_steps, jnp.int32(start), jnp.int32(stop), steps_arr, text, text_mask, kwargs, scale)
        if progress is not None:
            x.block_until_ready()
            progress(stop, steps)
    return x
