"""Sampling loops for the ancestral DDPM, DDIM and DPM-Solver++(2M) samplers, one XLA loop per chunk of steps.

The text conditioning is computed once per call, before the loop (denoiser.py): for classifier-free guidance
the conditional contexts and the null text's, concatenated along the batch. Each of the `steps` model
evaluations (one call, on the batch doubled for guidance) converts the prediction to x0, thresholds it, and
hands it to the sampler's update rule (solvers.py, which also documents the time grids); the last evaluation
returns the thresholded x0 itself. Discrete schedules (DeepFloyd IF) evaluate at integer timesteps, given to the
loop as a fixed-length array of times (timesteps.py).

A model may output 2C channels for C image channels (DeepFloyd IF): the prediction, then a variance output v in
[-1, 1]. Guidance combines the first C channels only, v comes from the conditional half, and only the ancestral
sampler with variance='learned_range' reads it; the others use the first C channels alone.

Editing (editing.py) changes only where the loop starts (image-to-image runs the last evaluations), which
evaluation it visits next (RePaint's resampling revisits blocks, after a jump back up) and what it does to x
between evaluations (inpainting's kept pixels). Draws are keyed by the visit, which is the evaluation index
whenever nothing is revisited, so plain sampling draws what it always drew.

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

from imagen_jax.diffusion import editing
from imagen_jax.diffusion.denoiser import Denoiser, fused
from imagen_jax.diffusion.guidance import (
    check_guidance_interval,
    check_guidance_rescale,
    check_percentile,
    check_threshold_max,
    check_threshold_mode,
    guided_prediction,
    rescaled_guidance,
    threshold,
)
from imagen_jax.diffusion.losses import ApplyFn, check_objective, pred_to_x0
from imagen_jax.diffusion.schedule import alpha_sigma, check_schedule, log_snr
from imagen_jax.diffusion.solvers import (
    DPM_START_LOG_SNR,
    check_sampler,
    check_variance,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    learned_range_log_variance,
    posterior_log_variances,
    posterior_step,
    step_alpha_sigma,
    time_grid,
)
from imagen_jax.diffusion.timesteps import resolve_steps
from imagen_jax.parallel import activations

ProgressFn = Callable[[int, int], None]


@activations.jit(static_argnames=("denoiser", "guided"))
def _condition(params, text, text_mask, *, denoiser, guided):
    """The context of every step: the text's; with guidance, [text's; null text's] along the batch."""
    context = denoiser.condition(params, text, text_mask)
    if not guided:
        return context
    null = denoiser.null_condition(params, text, text_mask)
    return jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), context, null)


def _split_variance(pred, channels):
    """(prediction, variance output or None) of a C- or 2C-channel model output."""
    if pred.shape[-1] == channels:
        return pred, None
    if pred.shape[-1] == 2 * channels:
        return pred[..., :channels], pred[..., channels:]
    raise ValueError(f"the model output has {pred.shape[-1]} channels; expected {channels} or {2 * channels}")


def _predict(denoiser, params, x, t, context, model_kwargs, guidance_scale, guided, lsnr_t, guide):
    """(prediction, variance output or None) of one model call; with guidance, on [cond; uncond] concatenated
    along the batch, guiding the prediction channels (inside the guidance interval, rescaled: `guide` = (lowest,
    highest log-SNR, rescale)) and taking the variance from the conditional half."""
    batch, channels = x.shape[0], x.shape[-1]
    if not guided:
        return _split_variance(denoiser.denoise(params, x, jnp.full((batch,), t), context, **model_kwargs), channels)
    twice = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
    kwargs = jax.tree.map(twice, dict(model_kwargs))
    pred, var = _split_variance(
        denoiser.denoise(params, twice(x), jnp.full((2 * batch,), t), context, **kwargs), channels
    )
    lowest, highest, rescale = guide
    scale = jnp.where((lsnr_t >= lowest) & (lsnr_t <= highest), guidance_scale, 1.0)
    guided_pred = rescaled_guidance(guided_prediction(pred[:batch], pred[batch:], scale), pred[:batch], rescale)
    return guided_pred, None if var is None else var[:batch]


def sampler_update(
    x: jax.Array,
    pred: jax.Array,
    var: jax.Array | None,
    x0_prev: jax.Array,
    lsnr_prev: jax.Array,
    lsnr_t: jax.Array,
    lsnr_s: jax.Array,
    noise: jax.Array | None,
    eta: jax.Array | float = 0.0,
    *,
    sampler: str,
    objective: str,
    thresholding: str,
    percentile: float,
    threshold_max: float = math.inf,
    variance: str = "fixed_small",
    discrete: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(x at the next time s, thresholded x0) from x at time t and the (guided) model output there: one step of
    the sampling loop, past the model call. `var`: the variance output of a 2C-channel model, or None; `noise`:
    the ancestral draw (unused by 'dpmpp_2m'); lsnr_prev is the previous evaluation's log-SNR (= lsnr_t at the
    first). Discrete schedules (`discrete`) take the ancestral step in the form that keeps DeepFloyd IF's
    first step exact (solvers.posterior_step); continuous ones keep `ddpm_step` unless the variance is learned.
    """
    alpha_t, sigma_t = step_alpha_sigma(lsnr_t)
    x0 = pred_to_x0(pred.astype(jnp.float32), x, alpha_t, sigma_t, objective)
    x0 = threshold(x0, thresholding, percentile, threshold_max)
    if sampler == "dpmpp_2m":
        return dpmpp_2m_step(x, x0, x0_prev, lsnr_prev, lsnr_t, lsnr_s), x0
    if sampler == "ddim":
        return ddim_step(x, x0, lsnr_t, lsnr_s, eta, noise), x0
    if variance == "fixed_small" and not discrete:
        return ddpm_step(x, x0, lsnr_t, lsnr_s, noise), x0
    log_beta, log_beta_tilde = posterior_log_variances(lsnr_t, lsnr_s)
    if variance == "learned_range":
        if var is None:
            raise ValueError("variance='learned_range' needs a model output of 2C channels (C: the image's)")
        log_var = learned_range_log_variance(var.astype(jnp.float32), log_beta, log_beta_tilde)
    else:
        log_var = log_beta_tilde
    return posterior_step(x, x0, lsnr_t, lsnr_s, log_var, noise), x0


def _times(indices, steps, grid, sampler, schedule, start_log_snr):
    """Times of evaluation `indices` (an int array; the time after the last evaluation is past its end)."""
    if grid is None:
        return time_grid(indices, steps, sampler, schedule, start_log_snr)
    return grid[jnp.clip(indices, 0, grid.shape[0] - 1)]


@functools.partial(jax.jit, static_argnames=("sampler", "schedule"))
def _log_snr_at(index, steps, grid, start_log_snr, *, sampler, schedule):
    """The log-SNR of evaluation `index`: where image-to-image and inpainting start."""
    return log_snr(_times(index, steps, grid, sampler, schedule, start_log_snr), schedule)


KNOWN_STREAM, JUMP_STREAM = 0x6B6E, 0x6A70  # noise streams of inpainting's kept region and RePaint's jumps


@activations.jit(
    static_argnames=(
        "denoiser", "sampler", "schedule", "objective", "thresholding", "percentile", "threshold_max", "variance",
        "guided",
    ),
)  # fmt: skip
def _run_chunk(
    params, state, key, start, stop, steps, context, model_kwargs, guidance_scale, eta, start_log_snr, grid,
    step_noise, first, order, edit, guide, *, denoiser, sampler, schedule, objective, thresholding, percentile,
    threshold_max, variance, guided,
):  # fmt: skip
    """Runs visits [start, stop) of the run's evaluations on state (x at the start's time, previous x0); key: one per
    example. Visit k evaluates index k, or order[k] with RePaint resampling (a descending index is a jump back
    up); `first`: the run's first visit (image-to-image starts late). `grid`: a discrete schedule's padded times
    (else None); `step_noise`: [steps + 1, B, ...] or None; `edit`: inpainting's {'image', 'mask'} or None."""

    def draw(stream, k):  # one normal draw per example, from its key's `stream`, for visit k
        fold = lambda b: jax.random.fold_in(jax.random.fold_in(b, stream), k)  # noqa: E731
        return jax.vmap(lambda b: jax.random.normal(fold(b), state[0].shape[1:]))(key)

    def body(k, state):
        x, x0_prev = state
        i = k if order is None else order[k]
        before = k - 1 if order is None else order[jnp.maximum(k - 1, 0)]  # the previous visit's index
        continuing = (k > first) & (before + 1 == i)
        # previous evaluation (for DPM-Solver++'s history; none at the start or after a jump), this, next, and
        # where the previous visit's step left x (a jump starts there)
        indices = jnp.stack([jnp.where(continuing, i - 1, i), i, i + 1, before + 1])
        times = _times(indices, steps, grid, sampler, schedule, start_log_snr)
        lsnr_prev, lsnr_t, lsnr_s, lsnr_left = log_snr(times, schedule)
        if order is not None:  # RePaint: noise x from where the last step left it back up to this evaluation
            jumped = editing.forward_jump(x, lsnr_left, lsnr_t, draw(JUMP_STREAM, k))
            x = jnp.where(continuing | (k == first), x, jumped)
        pred, var = _predict(
            denoiser, params, x, times[1], context, model_kwargs, guidance_scale, guided, lsnr_t, guide
        )
        noise = None  # DPM-Solver++ draws none
        if sampler != "dpmpp_2m" and step_noise is not None:
            noise = step_noise[k + 1]
        elif sampler != "dpmpp_2m":
            noise = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(b, k), x.shape[1:], jnp.float32))(key)
        x_s, x0 = sampler_update(
            x, pred, var, x0_prev, lsnr_prev, lsnr_t, lsnr_s, noise, eta, sampler=sampler, objective=objective,
            thresholding=thresholding, percentile=percentile, threshold_max=threshold_max, variance=variance,
            discrete=grid is not None,
        )  # fmt: skip
        result = x0
        if edit is not None:  # inpainting: the kept pixels from the input, noised to the next time or exact
            x_s = editing.keep_known(x_s, edit["image"], edit["mask"], lsnr_s, draw(KNOWN_STREAM, k + 1))
            result = editing.compose(x0, edit["image"], edit["mask"])
        return jnp.where(i == steps - 1, result, x_s), x0

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
    steps: int | str,
    guidance_scale: float = 1.0,
    schedule: str = "cosine",
    objective: str = "eps",
    thresholding: str = "dynamic",
    percentile: float = 0.995,
    threshold_max: float = math.inf,
    sampler: str = "ddpm",
    variance: str = "fixed_small",
    eta: float = 0.0,
    dpm_start_log_snr: float = DPM_START_LOG_SNR,
    noise: jax.Array | None = None,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    init_image: jax.Array | None = None,
    mask: jax.Array | None = None,
    strength: float = 1.0,
    resample: int = 1,
    jump_length: int = 1,
    guidance_interval: tuple[float, float] = (-math.inf, math.inf),
    guidance_rescale: float = 0.0,
) -> jax.Array:
    """Draws x0 [B, H, W, C] (float32; in [-1, 1] unless thresholding='none') for text [B, L, D].

    `sampler`: 'ddpm' (ancestral), 'ddim' (with `eta` in [0, 1]: 0 deterministic, 1 the ancestral
    sampler again) or 'dpmpp_2m' (DPM-Solver++(2M), deterministic; ~20 steps do what DDPM needs hundreds
    for; its grid starts at log-SNR `dpm_start_log_snr`, see solvers.py). `steps` is the number of model
    evaluations for every sampler; with a discrete schedule (e.g. 'discrete_cosine', DeepFloyd IF's) the
    evaluations are at integer timesteps: "leading" spacing for a count, or a named list of timesteps.NAMED_TIMESTEPS
    ('smart50', 'fast27', ...; steps = the list's length), and `dpm_start_log_snr` does not apply.
    `model` is a `Denoiser` (text conditioning once, then one call per step) or a plain
    `apply_fn(params, x_t, t, text, text_mask, drop_text, **model_kwargs)` (sampled as `fused(apply_fn)`).
    It is a jit static argument: pass the same object every call (not a fresh lambda or functools.partial)
    or each call recompiles. It outputs C channels (C = shape[-1]), or 2C: the prediction and a variance
    output v in [-1, 1], used by 'ddpm' with `variance='learned_range'` (log variance f log beta + (1 - f)
    log beta_tilde, f = (v + 1) / 2) and ignored otherwise; `variance='fixed_small'` is the posterior variance.
    `shape` is the full batch shape [B, H, W, C]. `model_kwargs` leaves (e.g. the low-res image of an SR
    stage) must have the batch as leading axis; they are doubled along with x for guidance.
    `guidance_scale` 1.0 runs the conditional model alone; any other value costs one model call on a
    doubled batch per step. `threshold_max` bounds dynamic thresholding's scale (DeepFloyd IF: 1.5 stage I,
    1.0 stage II). The loop runs in compiled chunks of `chunk_size` steps (default: all) and
    calls `progress(steps_done, steps)` after each chunk has finished. Same key -> same sample.
    `key` is one key for the batch, or a [B] array of keys, one per example: example b's noise then
    depends only on key[b], so an image is reproducible from its own seed whatever batch it is in.
    `noise` (optional) replaces noise drawn from `key`: of `shape`, the starting x (at t = 1 or the first
    timestep); the deterministic samplers then map it to the same image whatever the key. Or [steps + 1, *shape]:
    noise[0] is the start and noise[i + 1] the noise of evaluation i's step (ancestral 'ddpm', 'ddim' with
    eta > 0; the last evaluation returns x0 and ignores noise[steps]), to reproduce another implementation's
    draws; this form compiles once per step count.

    Editing (editing.py): `init_image` [B, H, W, C] in [-1, 1] with `strength` S < 1 is image-to-image (only the
    last floor(S steps) evaluations run, from the input noised to the first of them); with `mask` ([B, H, W, 1],
    1 = regenerate, 0 = keep) it is inpainted: kept pixels come from the input (forward-noised to every step's
    time, and exactly in the result), with `resample` r > 1 RePaint's resampling (every `jump_length` evaluations
    are repeated r times in all, after a jump back up; about r times the evaluations). `progress` then counts
    the evaluations that really run. Guidance options (guidance.py): classifier-free guidance only where the
    log-SNR lies in `guidance_interval` (elsewhere the conditional prediction, scale 1), and `guidance_rescale`.
    """
    check_schedule(schedule)
    steps, grid = resolve_steps(steps, schedule)
    chunk_size = steps if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(shape) < 2 or shape[0] != text.shape[0]:
        raise ValueError(f"shape {tuple(shape)} must be [B, ...] with B = text batch {text.shape[0]}")
    check_sampler(sampler)
    _check_eta(sampler, eta)
    check_objective(objective)
    check_threshold_mode(thresholding)
    check_percentile(percentile)
    check_threshold_max(threshold_max)
    check_variance(variance)
    check_guidance_interval(guidance_interval)
    check_guidance_rescale(guidance_rescale)
    editing.check_strength(strength)
    editing.check_resampling(resample, jump_length)
    first, order = 0, None
    if init_image is not None:
        if tuple(init_image.shape) != tuple(shape):
            raise ValueError(f"init_image has shape {tuple(init_image.shape)}, expected the sample's {tuple(shape)}")
        first = editing.first_evaluation(steps, strength)
    if mask is not None:
        if init_image is None:
            raise ValueError("a mask needs the init_image it masks")
        if tuple(mask.shape) != (*shape[:-1], 1):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(*shape[:-1], 1)} (one channel)")
    elif resample > 1:
        raise ValueError(f"resample={resample} (RePaint) needs a mask: it only applies to inpainting")
    if resample > 1:
        order = editing.evaluation_order(steps, first, resample, jump_length)
    visits = steps if order is None else first + order.size

    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise ValueError("key must be a typed PRNG key (jax.random.key), not raw key data")
    keys = jax.random.split(key, shape[0]) if key.ndim == 0 else key
    if keys.shape != (shape[0],):
        raise ValueError(f"key must be one key or {shape[0]} keys (one per example), got shape {key.shape}")
    pairs = jax.vmap(jax.random.split)(keys)
    key_init, key_steps = pairs[:, 0], pairs[:, 1]
    step_noise = None
    if noise is None:
        x = jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(key_init)
    elif tuple(noise.shape) == tuple(shape):
        x = jnp.asarray(noise, jnp.float32)
    elif tuple(noise.shape) == (steps + 1, *shape) and order is None:
        step_noise = jnp.asarray(noise, jnp.float32)
        x = step_noise[0]
    else:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected the sample shape {tuple(shape)} or "
            f"{(steps + 1, *shape)} (the start and each step's noise; not with RePaint resampling)"
        )
    if init_image is not None and first == steps:  # strength 0: nothing to run
        return jnp.asarray(init_image, jnp.float32)
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
        threshold_max=float(threshold_max),
        variance=variance,
        guided=guided,
    )
    # Host scalars (numpy), not arrays on one device, so that a multi-process run passes only global arrays.
    steps_arr = np.asarray(steps, np.int32)
    scale, eta_arr = np.asarray(guidance_scale, np.float32), np.asarray(eta, np.float32)
    start_lsnr = np.asarray(dpm_start_log_snr, np.float32)
    kwargs = dict(model_kwargs or {})
    guide = tuple(np.asarray(v, np.float32) for v in (*guidance_interval, guidance_rescale))
    edit = None
    if init_image is not None and (first > 0 or mask is not None):
        start_lsnr_x = _log_snr_at(np.int32(first), steps_arr, grid, start_lsnr, sampler=sampler, schedule=schedule)
        image = jnp.asarray(init_image, jnp.float32)
        if first > 0:  # image-to-image: the input noised to the first evaluation's time, by the start noise
            alpha, sigma = alpha_sigma(start_lsnr_x)
            x = alpha * image + sigma * x
        if mask is not None:
            edit = {"image": image, "mask": jnp.asarray(mask, jnp.float32)}
            start_noise = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(b, KNOWN_STREAM), x.shape[1:]))
            x = editing.keep_known(x, image, edit["mask"], start_lsnr_x, start_noise(key_steps))
    order_arr = None if order is None else np.concatenate([np.zeros(first, np.int32), order])
    state = (x, jnp.zeros_like(x))
    for chunk in range(math.ceil((visits - first) / chunk_size)):
        start, stop = first + chunk * chunk_size, min(first + (chunk + 1) * chunk_size, visits)
        state = run(
            params, state, key_steps, np.int32(start), np.int32(stop), steps_arr, context, kwargs, scale, eta_arr,
            start_lsnr, grid, step_noise, np.int32(first), order_arr, edit, guide,
        )  # fmt: skip
        if progress is not None:
            state[0].block_until_ready()
            progress(stop - first, visits - first)
    return state[0]
