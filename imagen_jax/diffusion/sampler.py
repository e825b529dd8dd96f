"""Sampling loops for the ancestral DDPM, DDIM and DPM-Solver++(2M) samplers, one XLA loop per chunk of steps.

The text conditioning is computed once per call, before the loop (denoiser.py): for classifier-free guidance
the conditional contexts and the null text's, concatenated along the batch. Each of the `steps` model
evaluations (one call, on the batch doubled for guidance) converts the prediction to x0, thresholds it, and
hands it to the sampler's update rule (solvers.py, which also documents the time grids); the last evaluation
returns the thresholded x0 itself.

Speed: the step loop is a `lax.fori_loop` inside `jax.jit` whose bounds are traced, so every chunk (the
last partial one included), every step count and every chunk size reuse one executable per sampler.
The loop state is (x_t, the last x0 estimate), which carries DPM-Solver++'s history across chunks. Step
noise is keyed by the global step index, so the result does not depend on the chunking.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.denoiser import Denoiser, fused
from imagen_jax.diffusion.guidance import check_percentile, check_threshold_mode, guided_prediction, threshold
from imagen_jax.diffusion.losses import ApplyFn, check_objective, pred_to_x0
from imagen_jax.diffusion.schedule import check_schedule, log_snr
from imagen_jax.diffusion.solvers import (
    DPM_START_LOG_SNR,
    check_sampler,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    step_alpha_sigma,
    time_grid,
)

ProgressFn = Callable[[int, int], None]


@functools.partial(jax.jit, static_argnames=("denoiser", "guided"))
def _condition(params, text, text_mask, *, denoiser, guided):
    """The context of every step: the text's; with guidance, [text's; null text's] along the batch."""
    context = denoiser.condition(params, text, text_mask)
    if not guided:
        return context
    null = denoiser.null_condition(params, text, text_mask)
    return jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), context, null)


def _predict(denoiser, params, x, t, context, model_kwargs, guidance_scale, guided):
    """One model call; with guidance, on [cond; uncond] concatenated along the batch."""
    batch = x.shape[0]
    if not guided:
        return denoiser.denoise(params, x, jnp.full((batch,), t), context, **model_kwargs)
    twice = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
    kwargs = jax.tree.map(twice, dict(model_kwargs))
    pred = denoiser.denoise(params, twice(x), jnp.full((2 * batch,), t), context, **kwargs)
    return guided_prediction(pred[:batch], pred[batch:], guidance_scale)


@functools.partial(
    jax.jit,
    static_argnames=("denoiser", "sampler", "schedule", "objective", "thresholding", "percentile", "guided"),
)
def _run_chunk(
    params, state, key, start, stop, steps, context, model_kwargs, guidance_scale, eta, start_log_snr,
    *, denoiser, sampler, schedule, objective, thresholding, percentile, guided,
):  # fmt: skip
    """Runs evaluations [start, stop) of `steps` on state (x at time_grid(start), previous x0); key: one per example."""

    def body(i, state):
        x, x0_prev = state
        times = time_grid(i + jnp.arange(-1, 2), steps, sampler, schedule, start_log_snr)  # previous, this, next
        lsnr_prev, lsnr_t, lsnr_s = log_snr(times, schedule)
        t = times[1]
        pred = _predict(denoiser, params, x, t, context, model_kwargs, guidance_scale, guided)
        alpha_t, sigma_t = step_alpha_sigma(lsnr_t)
        x0 = threshold(pred_to_x0(pred.astype(jnp.float32), x, alpha_t, sigma_t, objective), thresholding, percentile)
        if sampler == "dpmpp_2m":
            x_s = dpmpp_2m_step(x, x0, x0_prev, lsnr_prev, lsnr_t, lsnr_s)
        else:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(key)
            if sampler == "ddpm":
                x_s = ddpm_step(x, x0, lsnr_t, lsnr_s, noise)
            else:
                x_s = ddim_step(x, x0, lsnr_t, lsnr_s, eta, noise)
        return jnp.where(i == steps - 1, x0, x_s), x0

    return jax.lax.fori_loop(start, stop, body, state)


def _check_eta(sampler: str, eta: float) -> None:
    """eta in [0, 1], and nonzero only for DDIM (elsewhere it would be silently ignored)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: ancestral noise), got {eta}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to sampler 'ddim', not {sampler!r}")


def sample(
    model: Denoiser | ApplyFn,
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
    sampler: str = "ddpm",
    eta: float = 0.0,
    dpm_start_log_snr: float = DPM_START_LOG_SNR,
    noise: jax.Array | None = None,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Draws x0 [B, H, W, C] (float32; in [-1, 1] unless thresholding='none') for text [B, L, D].

    `sampler`: 'ddpm' (ancestral), 'ddim' (with `eta` in [0, 1]: 0 deterministic, 1 the ancestral
    sampler again) or 'dpmpp_2m' (DPM-Solver++(2M), deterministic; ~20 steps do what DDPM needs hundreds
    for; its grid starts at log-SNR `dpm_start_log_snr`, see solvers.py). `steps` is the number of model
    evaluations for every sampler.
    `model` is a `Denoiser` (text conditioning once, then one call per step) or a plain
    `apply_fn(params, x_t, t, text, text_mask, drop_text, **model_kwargs)` (sampled as `fused(apply_fn)`).
    It is a jit static argument: pass the same object every call (not a fresh lambda or functools.partial)
    or each call recompiles.
    `shape` is the full batch shape [B, H, W, C]. `model_kwargs` leaves (e.g. the low-res image of an SR
    stage) must have the batch as leading axis; they are doubled along with x for guidance.
    `guidance_scale` 1.0 runs the conditional model alone; any other value costs one model call on a
    doubled batch per step. The loop runs in compiled chunks of `chunk_size` steps (default: all) and
    calls `progress(steps_done, steps)` after each chunk has finished. Same key -> same sample.
    `key` is one key for the batch, or a [B] array of keys, one per example: example b's noise then
    depends only on key[b], so an image is reproducible from its own seed whatever batch it is in.
    `noise` (optional, `shape`) replaces the starting x at t = 1 drawn from `key`; the deterministic
    samplers then map it to the same image whatever the key.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    chunk_size = steps if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(shape) < 2 or shape[0] != text.shape[0]:
        raise ValueError(f"shape {tuple(shape)} must be [B, ...] with B = text batch {text.shape[0]}")
    check_sampler(sampler)
    _check_eta(sampler, eta)
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
    if noise is None:
        x = jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(key_init)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected the sample shape {tuple(shape)}")
    else:
        x = jnp.asarray(noise, jnp.float32)
    denoiser = model if isinstance(model, Denoiser) else fused(model)
    guided = guidance_scale != 1.0
    context = _condition(params, text, text_mask, denoiser=denoiser, guided=guided)
    run = functools.partial(
        _run_chunk,
        denoiser=denoiser,
        sampler=sampler,
        schedule=schedule,
        objective=objective,
        thresholding=thresholding,
        percentile=float(percentile),
        guided=guided,
    )
    # Host scalars (numpy), not arrays on one device, so that a multi-process run passes only global arrays.
    steps_arr = np.asarray(steps, np.int32)
    scale, eta_arr = np.asarray(guidance_scale, np.float32), np.asarray(eta, np.float32)
    start_lsnr = np.asarray(dpm_start_log_snr, np.float32)
    kwargs = dict(model_kwargs or {})
    state = (x, jnp.zeros_like(x))
    for chunk in range(math.ceil(steps / chunk_size)):
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, steps)
        state = run(
            params, state, key_steps, np.int32(start), np.int32(stop), steps_arr, context, kwargs, scale, eta_arr,
            start_lsnr,
        )  # fmt: skip
        if progress is not None:
            state[0].block_until_ready()
            progress(stop, steps)
    return state[0]
