"""Forward process, prediction parameterisations (eps, v) and the denoising training loss.

The model predicts either the noise eps (Imagen's choice) or v = alpha eps - sigma x0 (better behaved at
high noise, used by progressive distillation and many later models). Both are linear in (x_t, x0), so
conversions between them are exact up to float rounding and work on any broadcastable alpha/sigma.

A model with a learned variance (DeepFloyd IF) outputs 2C channels: the prediction, then v in [-1, 1] that
interpolates the log variance of each reverse step (solvers.learned_range_log_variance). The MSE trains the
prediction; the variance channels learn only from the variational bound (`variance_loss='vlb'`: Nichol &
Dhariwal 2021's hybrid loss, with the mean held fixed), over the 1000 steps of a discrete schedule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from imagen_jax.diffusion.schedule import (
    NUM_TIMESTEPS,
    alpha_sigma,
    check_schedule,
    discrete_alphas_cumprod,
    is_discrete,
    log_snr,
    sample_times,
    timestep_index,
)

OBJECTIVES = ("eps", "v")
VARIANCE_LOSSES = ("none", "vlb")
VLB_WEIGHT = 0.001  # lambda of the hybrid loss L_simple + lambda L_vlb (Nichol & Dhariwal 2021)

ApplyFn = Callable[..., jax.Array]


def check_objective(objective: str) -> None:
    """Raises ValueError for an unknown prediction objective (call early, before tracing)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown diffusion objective {objective!r}; valid objectives: {', '.join(OBJECTIVES)}")


def _per_example(a: jax.Array, ndim: int) -> jax.Array:
    """[B] -> [B, 1, ..., 1] so a per-example scalar broadcasts against an image batch."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, schedule: str) -> jax.Array:
    """x_t = alpha_t x0 + sigma_t noise for per-example times t [B]."""
    alpha, sigma = alpha_sigma(_per_example(log_snr(t, schedule), x0.ndim))
    return alpha * x0 + sigma * noise


def target(x0: jax.Array, noise: jax.Array, alpha: jax.Array, sigma: jax.Array, objective: str) -> jax.Array:
    """What the model is trained to predict: eps, or v = alpha eps - sigma x0."""
    check_objective(objective)
    if objective == "eps":
        return noise
    return alpha * noise - sigma * x0


def pred_to_x0(pred: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, objective: str) -> jax.Array:
    """The model's estimate of x0 from its eps or v prediction."""
    check_objective(objective)
    if objective == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred


def pred_to_eps(pred: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, objective: str) -> jax.Array:
    """The model's estimate of the noise eps from its eps or v prediction."""
    check_objective(objective)
    if objective == "eps":
        return pred
    return sigma * x_t + alpha * pred


def x0_to_pred(x0: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, objective: str) -> jax.Array:
    """The eps or v prediction that corresponds to an x0 estimate (e.g. an analytic or distilled denoiser)."""
    check_objective(objective)
    eps = (x_t - alpha * x0) / sigma
    if objective == "eps":
        return eps
    return alpha * eps - sigma * x0


def check_variance_loss(variance_loss: str, schedule: str) -> None:
    """Raises ValueError for an unknown variance loss, or 'vlb' with a continuous schedule (call before tracing)."""
    if variance_loss not in VARIANCE_LOSSES:
        raise ValueError(
            f"unknown variance loss {variance_loss!r}; valid variance losses: {', '.join(VARIANCE_LOSSES)}"
        )
    if variance_loss == "vlb" and not is_discrete(schedule):
        raise ValueError(f"variance_loss='vlb' needs a discrete schedule (e.g. 'discrete_cosine'), not {schedule!r}")


@functools.cache
def _vlb_tables(schedule: str) -> dict[str, np.ndarray]:
    """Per-timestep constants of the bound (float32 [1000]), from the schedule's alpha_bar in float64: the step's
    beta (alpha_bar_{-1} = 1), the posterior q(x_{k-1} | x_k, x0)'s mean coefficients and log variance, the
    latter at k = 0 (where it is 0) replaced by k = 1's, as improved-DDPM does."""
    abar = discrete_alphas_cumprod(schedule).astype(np.float64)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1.0 - abar / abar_prev
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    tables = {
        "log_beta": np.log(beta),
        "post_log_var": np.log(np.concatenate([post_var[1:2], post_var[1:]])),
        "coef_x0": beta * np.sqrt(abar_prev) / (1.0 - abar),
        "coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar),
    }
    return {name: value.astype(np.float32) for name, value in tables.items()}


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """log P(x) per element, in nats, for data x in [-1, 1] on 256 levels under N(mean, exp(log_scale)^2): the
    mass of x's bin (width 2/255), the outermost bins reaching to -inf / +inf (Ho et al. 2020's decoder).
    Differences of the upper tails where x lies above the mean keep small bins exact in float32."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    upper, lower = inv_std * (centered + 1.0 / 255.0), inv_std * (centered - 1.0 / 255.0)
    mass = jnp.where(centered > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_mass = jnp.log(jnp.maximum(mass, 1e-12))
    return jnp.where(x < -0.999, log_ndtr(upper), jnp.where(x > 0.999, log_ndtr(-lower), log_mass))


def vlb_terms(
    pred: jax.Array, v: jax.Array, x_t: jax.Array, x0: jax.Array, t: jax.Array, schedule: str, objective: str
) -> jax.Array:
    """The variational bound's term L_k of each example [B], in bits per dimension, for a discrete schedule.

    k = round(t * 1000): KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) for k > 0, the decoder's -log p(x0 | x_1)
    at k = 0, where p has the mean of the prediction `pred` (eps or v; no thresholding, as in training) and the
    log variance f log beta_k + (1 - f) log beta_tilde_k, f = (v + 1) / 2. Only `v` gets gradients: the mean
    is held fixed (stop-gradient), so the bound trains the variance alone.
    """
    check_objective(objective)
    tables = {name: jnp.asarray(value) for name, value in _vlb_tables(schedule).items()}
    k = jnp.maximum(timestep_index(t), 0)
    at = lambda name: _per_example(tables[name][k], x_t.ndim)  # noqa: E731
    alpha, sigma = alpha_sigma(_per_example(log_snr(t, schedule), x_t.ndim))
    x0_pred = pred_to_x0(jax.lax.stop_gradient(pred).astype(jnp.float32), x_t, alpha, sigma, objective)
    model_mean = at("coef_x0") * x0_pred + at("coef_xt") * x_t
    true_mean = at("coef_x0") * x0 + at("coef_xt") * x_t
    frac = (v.astype(jnp.float32) + 1.0) / 2.0
    model_log_var = frac * at("log_beta") + (1.0 - frac) * at("post_log_var")
    kl = normal_kl(true_mean, at("post_log_var"), model_mean, model_log_var)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    axes = tuple(range(1, x_t.ndim))
    return jnp.where(k == 0, jnp.mean(nll, axes), jnp.mean(kl, axes)) / math.log(2.0)


def diffusion_loss(
    apply_fn: ApplyFn,
    params: Any,
    x0: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    key: jax.Array,
    *,
    schedule: str = "cosine",
    objective: str = "eps",
    cond_drop_prob: float = 0.1,
    model_kwargs: Mapping[str, Any] | None = None,
    variance_loss: str = "none",
    variance_loss_weight: float = VLB_WEIGHT,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Monte-Carlo denoising loss: MSE between the model's prediction and the objective's target.

    Per example: t ~ U(0, 1) (a discrete schedule: t = k / 1000, k uniform in 0..999), noise ~ N(0, I),
    drop_text ~ Bernoulli(cond_drop_prob) (the model swaps in its null text for classifier-free guidance).
    `key` is one key for the batch, or one key per example ([B] keys): then every example's draws depend on
    its key alone, so any split of the batch into micro-batches draws the same. The MSE is averaged over
    every element, in float32. `model_kwargs` (e.g. {'dropout_key': k} or a low-res conditioning image) is
    forwarded to `apply_fn(params, x_t, t, text, text_mask, drop_text, **model_kwargs)` unchanged.
    A model output of 2C channels (C = x0's) is a prediction and a variance output: the MSE takes the first C.
    `variance_loss='vlb'` (discrete schedules, 2C channels) adds `variance_loss_weight` times the whole bound,
    estimated as 1000 times the sampled term L_k (`vlb_terms`, bits per dimension): the default 0.001 is
    improved-DDPM's hybrid loss, L_simple + L_k. The aux dict then also holds 'mse' and 'vlb' (mean L_k).
    `weights` [B] scales each example's loss, summed and divided by B (DreamBooth's prior preservation weighs
    instance and class examples apart); None is the plain mean.
    """
    check_schedule(schedule)
    check_objective(objective)
    check_variance_loss(variance_loss, schedule)
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    batch = x0.shape[0]
    if key.ndim:  # one key per example
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(key)
        t = jax.vmap(lambda k: sample_times(k, (), schedule))(keys[:, 0])
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys[:, 1])
        drop_text = jax.vmap(lambda k: jax.random.bernoulli(k, cond_drop_prob))(keys[:, 2])
    else:
        key_t, key_noise, key_drop = jax.random.split(key, 3)
        t = sample_times(key_t, (batch,), schedule)
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        drop_text = jax.random.bernoulli(key_drop, cond_drop_prob, (batch,))

    x0 = x0.astype(jnp.float32)
    alpha, sigma = alpha_sigma(_per_example(log_snr(t, schedule), x0.ndim))
    x_t = alpha * x0 + sigma * noise
    pred = apply_fn(params, x_t, t, text, text_mask, drop_text, **(model_kwargs or {}))
    channels = x0.shape[-1]
    v = None
    if pred.shape[-1] == 2 * channels:
        pred, v = pred[..., :channels], pred[..., channels:]
    elif pred.shape[-1] != channels:
        raise ValueError(f"the model output has {pred.shape[-1]} channels; expected {channels} or {2 * channels}")
    squared = jnp.square(pred.astype(jnp.float32) - target(x0, noise, alpha, sigma, objective))
    axes = tuple(range(1, x0.ndim))
    mean = jnp.mean if weights is None else lambda per_example: jnp.mean(per_example * weights)
    loss = jnp.mean(squared) if weights is None else mean(jnp.mean(squared, axes))
    if variance_loss == "none":
        return loss, {"loss": loss}
    if v is None:
        raise ValueError(f"variance_loss='vlb' needs a model output of {2 * channels} channels, got {channels}")
    vlb = mean(vlb_terms(pred, v, x_t, x0, t, schedule, objective))
    total = loss + variance_loss_weight * NUM_TIMESTEPS * vlb
    return total, {"loss": total, "mse": loss, "vlb": vlb}
