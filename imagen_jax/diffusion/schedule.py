"""Continuous-time noise schedules as log signal-to-noise ratios.

The whole diffusion package speaks log-SNR: x_t = alpha_t x0 + sigma_t eps with alpha^2 = sigmoid(log_snr)
and sigma^2 = sigmoid(-log_snr). Working in log-SNR keeps float32 finite at both ends of t in [0, 1],
where alpha or sigma alone would round to exactly 0 or 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SCHEDULES = ("cosine", "linear")

# Clamp range: finite at t=0 and t=1, wide enough that the endpoints carry (almost) no signal / noise.
LOG_SNR_MIN = -20.0
LOG_SNR_MAX = 20.0
COSINE_OFFSET = 0.008


def _cosine(t: jax.Array) -> jax.Array:
    # alpha_bar = cos^2(theta), theta = pi/2 (t+s)/(1+s); log(alpha_bar/(1-alpha_bar)) = -2 log tan(theta).
    # Written via the complementary angle u = pi/2 - theta, so that 1-t is formed exactly near t=1:
    # log_snr = 2 log tan(u), and tan(u) -> 0 at t=1 is clamped instead of overflowing.
    u = (0.5 * math.pi / (1.0 + COSINE_OFFSET)) * (1.0 - t)
    return 2.0 * jnp.log(jnp.maximum(jnp.tan(u), jnp.finfo(t.dtype).tiny))


def _linear(t: jax.Array) -> jax.Array:
    # Continuous DDPM linear betas (1e-4 .. 0.02 over 1000 steps): alpha_bar = exp(-(1e-4 + 10 t^2)).
    return -jnp.log(jnp.expm1(1e-4 + 10.0 * t**2))


_SCHEDULE_FNS = {"cosine": _cosine, "linear": _linear}


def check_schedule(schedule: str) -> None:
    """Raises ValueError for an unknown schedule name (call early, before tracing)."""
    if schedule not in _SCHEDULE_FNS:
        raise ValueError(f"unknown diffusion schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def log_snr(t: jax.Array, schedule: str) -> jax.Array:
    """log(alpha_t^2 / sigma_t^2) for times t in [0, 1] (decreasing in t), clamped to a finite range."""
    check_schedule(schedule)
    t = jnp.asarray(t, jnp.float32)
    return jnp.clip(_SCHEDULE_FNS[schedule](t), LOG_SNR_MIN, LOG_SNR_MAX)


def alpha_sigma(log_snr_value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) of the variance-preserving process: alpha^2 + sigma^2 = 1."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr_value)), jnp.sqrt(jax.nn.sigmoid(-log_snr_value))
