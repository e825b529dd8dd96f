"""Noise schedules as log signal-to-noise ratios: continuous ones, and the 1000-step discrete DDPM schedule of
DeepFloyd IF.

The whole diffusion package speaks log-SNR: x_t = alpha_t x0 + sigma_t eps with alpha^2 = sigmoid(log_snr)
and sigma^2 = sigmoid(-log_snr). Working in log-SNR keeps float32 finite at both ends of t in [0, 1],
where alpha or sigma alone would round to exactly 0 or 1.

Discrete schedules (DISCRETE_SCHEDULES) are a table of NUM_TIMESTEPS values: time t stands for timestep
k = round(t * 1000), so t = k / 1000 is timestep k exactly (IF's U-Net rounds t * 1000 the same way), t >= 1
is clamped to the last timestep 999, and any t < 0 is "before the first step" (alpha_bar = 1), given as the
clamp LOG_SNR_MAX. Samplers evaluate them only at such t (timesteps.py); training draws t = k / 1000.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

DISCRETE_SCHEDULES = ("discrete_cosine",)
SCHEDULES = ("cosine", "linear", *DISCRETE_SCHEDULES)
NUM_TIMESTEPS = 1000  # the discrete schedules' training timesteps

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


def discrete_cosine_alphas_cumprod() -> np.ndarray:
    """alpha_bar of timesteps 0..999 (float32) as diffusers' DDPMScheduler(beta_schedule='squaredcos_cap_v2')
    makes them, so that sampling reproduces its numbers: betas from the continuous cosine alpha_bar(s) =
    cos^2((s / 1000 + 0.008) / 1.008 pi/2), beta_i = min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) in float64,
    rounded to float32; then the running product of the float32 (1 - beta), accumulated in float64 and rounded
    to float32 at every step (what torch.cumprod does on the CPU)."""
    s = np.arange(NUM_TIMESTEPS + 1, dtype=np.float64) / NUM_TIMESTEPS
    alpha_bar = np.cos((s + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def _discrete_log_snr_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    a = alphas_cumprod.astype(np.float64)
    return np.clip(np.log(a) - np.log1p(-a), LOG_SNR_MIN, LOG_SNR_MAX)


# Built once on import: the float32 alpha_bar diffusers steps with, and from it the float64 log-SNR of each timestep.
_DISCRETE_ALPHAS_CUMPROD = {"discrete_cosine": discrete_cosine_alphas_cumprod()}
_DISCRETE_TABLES = {name: _discrete_log_snr_table(a) for name, a in _DISCRETE_ALPHAS_CUMPROD.items()}


def is_discrete(schedule: str) -> bool:
    """Whether `schedule` is a table over NUM_TIMESTEPS integer timesteps (see the module docstring)."""
    return schedule in _DISCRETE_TABLES


def _check_discrete(schedule: str) -> None:
    if not is_discrete(schedule):
        raise ValueError(f"schedule {schedule!r} is not discrete; discrete schedules: {', '.join(DISCRETE_SCHEDULES)}")


def discrete_alphas_cumprod(schedule: str) -> np.ndarray:
    """The float32 alpha_bar of timesteps 0..999 of a discrete schedule (a copy)."""
    _check_discrete(schedule)
    return _DISCRETE_ALPHAS_CUMPROD[schedule].copy()


def discrete_log_snr_table(schedule: str) -> np.ndarray:
    """The float64 log-SNR of timesteps 0..999 of a discrete schedule (a copy)."""
    _check_discrete(schedule)
    return _DISCRETE_TABLES[schedule].copy()


def timestep_index(t: jax.Array) -> jax.Array:
    """The integer timestep of a discrete schedule's time t: round(t * 1000), clamped to [-1, 999], with every
    t < 0 mapped to -1 ("before the first step")."""
    t = jnp.asarray(t, jnp.float32)
    k = jnp.clip(jnp.round(t * NUM_TIMESTEPS), 0, NUM_TIMESTEPS - 1).astype(jnp.int32)
    return jnp.where(t < 0, -1, k)


def _discrete(schedule: str):
    table = _DISCRETE_TABLES[schedule].astype(np.float32)

    def fn(t: jax.Array) -> jax.Array:
        k = timestep_index(t)
        return jnp.where(k < 0, jnp.float32(LOG_SNR_MAX), jnp.asarray(table)[jnp.maximum(k, 0)])

    return fn


_SCHEDULE_FNS = {"cosine": _cosine, "linear": _linear, **{name: _discrete(name) for name in DISCRETE_SCHEDULES}}


def check_schedule(schedule: str) -> None:
    """Raises ValueError for an unknown schedule name (call early, before tracing)."""
    if schedule not in _SCHEDULE_FNS:
        raise ValueError(f"unknown diffusion schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def log_snr(t: jax.Array, schedule: str) -> jax.Array:
    """log(alpha_t^2 / sigma_t^2) for times t in [0, 1] (decreasing in t), clamped to a finite range.
    Discrete schedules: the value of timestep round(t * 1000); LOG_SNR_MAX for t < 0."""
    check_schedule(schedule)
    t = jnp.asarray(t, jnp.float32)
    return jnp.clip(_SCHEDULE_FNS[schedule](t), LOG_SNR_MIN, LOG_SNR_MAX)


def sample_times(key: jax.Array, shape: tuple[int, ...], schedule: str) -> jax.Array:
    """Training times: t ~ U(0, 1), or for a discrete schedule t = k / 1000 with k uniform in 0..999 (float32)."""
    if is_discrete(schedule):
        return jax.random.randint(key, shape, 0, NUM_TIMESTEPS).astype(jnp.float32) / NUM_TIMESTEPS
    return jax.random.uniform(key, shape, jnp.float32)


def alpha_sigma(log_snr_value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) of the variance-preserving process: alpha^2 + sigma^2 = 1."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr_value)), jnp.sqrt(jax.nn.sigmoid(-log_snr_value))
