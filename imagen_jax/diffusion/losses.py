"""Forward process, prediction parameterisations (eps, v) and the denoising training loss.

The model predicts either the noise eps (Imagen's choice) or v = alpha eps - sigma x0 (better behaved at
high noise, used by progressive distillation and many later models). Both are linear in (x_t, x0), so
conversions between them are exact up to float rounding and work on any broadcastable alpha/sigma.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedule import alpha_sigma, check_schedule, log_snr

OBJECTIVES = ("eps", "v")

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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Monte-Carlo denoising loss: MSE between the model's prediction and the objective's target.

    Per example: t ~ U(0, 1), noise ~ N(0, I), drop_text ~ Bernoulli(cond_drop_prob) (the model swaps
    in its null text for classifier-free guidance). `key` is one key for the batch, or one key per example
    ([B] keys): then every example's draws depend on its key alone, so any split of the batch into
    micro-batches draws the same. The MSE is averaged over every element, in float32.
    `model_kwargs` (e.g. {'dropout_key': k} or a low-res conditioning image) is forwarded to
    `apply_fn(params, x_t, t, text, text_mask, drop_text, **model_kwargs)` unchanged.
    """
    check_schedule(schedule)
    check_objective(objective)
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    batch = x0.shape[0]
    if key.ndim:  # one key per example
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(key)
        t = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys[:, 0])
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys[:, 1])
        drop_text = jax.vmap(lambda k: jax.random.bernoulli(k, cond_drop_prob))(keys[:, 2])
    else:
        key_t, key_noise, key_drop = jax.random.split(key, 3)
        t = jax.random.uniform(key_t, (batch,), jnp.float32)
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        drop_text = jax.random.bernoulli(key_drop, cond_drop_prob, (batch,))

    x0 = x0.astype(jnp.float32)
    alpha, sigma = alpha_sigma(_per_example(log_snr(t, schedule), x0.ndim))
    x_t = alpha * x0 + sigma * noise
    pred = apply_fn(params, x_t, t, text, text_mask, drop_text, **(model_kwargs or {}))
    loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target(x0, noise, alpha, sigma, objective)))
    return loss, {"loss": loss}
