"""The samplers' numerics: where each one evaluates the model, and how it steps from time t to s < t.

Everything is written in log-SNR, lsnr = log(alpha^2 / sigma^2); DPM-Solver's lambda = log(alpha / sigma)
is lsnr / 2. Each update takes the (thresholded) x0 estimate at time t, so guidance, thresholding and the
eps/v parameterisation stay outside the rules, in the sampling loop.

Time grids (`steps` = model evaluations, i = 0 .. steps-1; the last evaluation's x0 is the sample) of the
continuous schedules; discrete schedules evaluate every sampler at integer timesteps (timesteps.py):
- 'ddpm', 'ddim': uniform in t, t_i = 1 - i / steps; the last evaluation is at t = 1 / steps.
- 'dpmpp_2m': uniform in log-SNR from `start_log_snr` (default DPM_START_LOG_SNR = -10, alpha = 0.0067:
  where the signal starts to matter) to lsnr(0), both ends included, so the last evaluation is at t = 0.
  The starting x ~ N(0, I) stands for x at the first time (sigma there is 0.99998). Starting at the
  schedule's clamp (-20) instead put about a third of the evaluations where alpha < 0.01 and changed
  nothing. With the cosine schedule, log-SNR spacing is far better than uniform t: on Gaussian data the
  output variance at 20 steps was off by 5% instead of 34% (uniform t), because uniform t spends few
  evaluations where the fine detail is decided (high log-SNR) and ends at a noisier last x0. Lu et al. 2022
  use the same ('logSNR' spacing).
The t = 1 end (log-SNR clamped to -20, alpha = 4.5e-5): an eps-model's x0 = (x - sigma eps) / alpha
magnifies its error 22000-fold there; starting DPM-Solver++ at -10 (alpha 0.0067) cuts that to ~150-fold,
and its first step is short in log-SNR and damps it again; the uniform-t grids jump to alpha ~ 0.08 at 20
steps, so DDIM with an eps-model needs thresholding (the default) or v-prediction: with an eps bias of 0.01
and thresholding='none' its output is off by ~8.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedule import alpha_sigma, log_snr

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
# The ancestral step's variance: the posterior's ('fixed_small'), or interpolated in log space between it and the
# step's beta by a model output v in [-1, 1] ('learned_range', Nichol & Dhariwal 2021; DeepFloyd IF).
VARIANCES = ("fixed_small", "learned_range")
MIN_VARIANCE = 1e-20  # the floor under the posterior variance before its log (zero after the last step)
DPM_START_LOG_SNR = -10.0  # where DPM-Solver++'s grid starts (alpha = 0.0067, sigma = 0.99998)

_BISECTION_STEPS = 32  # halves [0, 1] below float32 resolution


def check_sampler(sampler: str) -> None:
    """Raises ValueError for an unknown sampler name (call early, before tracing)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")


def check_variance(variance: str) -> None:
    """Raises ValueError for an unknown variance mode (call early, before tracing)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid variances: {', '.join(VARIANCES)}")


def time_of_log_snr(target: jax.Array, schedule: str) -> jax.Array:
    """The t in [0, 1] with log_snr(t) = target (elementwise), by bisection: works for any decreasing schedule.

    Unrolled, so that on accelerators the whole search is one small fused kernel per sampling step.
    """

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_early = log_snr(mid, schedule) > target  # too little noise at mid: the answer lies later
        return jnp.where(too_early, mid, lo), jnp.where(too_early, hi, mid)

    bounds = (jnp.zeros_like(target, jnp.float32), jnp.ones_like(target, jnp.float32))
    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, bounds, unroll=True)
    return 0.5 * (lo + hi)


def time_grid(
    i: jax.Array, steps: jax.Array, sampler: str, schedule: str, start_log_snr: jax.Array | float = DPM_START_LOG_SNR
) -> jax.Array:
    """Times of model evaluations i (an int array; traced steps; i past either end is clamped for 'dpmpp_2m',
    whose grid starts at log-SNR `start_log_snr`, or at t = 1 when that is below the schedule's clamp)."""
    check_sampler(sampler)
    steps_f = steps.astype(jnp.float32)
    if sampler != "dpmpp_2m":
        return 1.0 - i.astype(jnp.float32) / steps_f
    i = jnp.clip(i, 0, steps - 1)
    frac = i.astype(jnp.float32) / jnp.maximum(steps_f - 1.0, 1.0)
    clamp, hi = log_snr(jnp.float32(1.0), schedule), log_snr(jnp.float32(0.0), schedule)
    lo = jnp.maximum(jnp.float32(start_log_snr), clamp)
    t = time_of_log_snr(lo + frac * (hi - lo), schedule)
    # Exact ends: the clamped log-SNR is flat near t = 1, where bisection would stop short of 1.
    first = jnp.where(lo <= clamp, 1.0, time_of_log_snr(lo, schedule))
    return jnp.where(i == 0, first, jnp.where(i == steps - 1, 0.0, t))


def step_alpha_sigma(lsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`alpha_sigma` for a sampler step, behind an optimization barrier. Without it XLA rewrites x / sigma into
    x * rsqrt(...) in some programs and not in others (the same loop partitioned over devices, say), and rsqrt
    rounds differently: sampling on a mesh would then differ from one device in the last bits."""
    return jax.lax.optimization_barrier(alpha_sigma(lsnr))


def ddpm_step(x_t: jax.Array, x0: jax.Array, lsnr_t: jax.Array, lsnr_s: jax.Array, noise: jax.Array) -> jax.Array:
    """Ancestral step (Ho et al. 2020): a draw from the posterior q(x_s | x_t, x0), in VDM's log-SNR form."""
    alpha_t, _ = step_alpha_sigma(lsnr_t)
    alpha_s, sigma_s = step_alpha_sigma(lsnr_s)
    # c = 1 - SNR_t / SNR_s: the share of x_s's noise that x_t does not determine.
    c = -jnp.expm1(lsnr_t - lsnr_s)
    mean = alpha_s * ((1.0 - c) / alpha_t * x_t + c * x0)
    return mean + jnp.sqrt(jnp.square(sigma_s) * c) * noise


def posterior_log_variances(lsnr_t: jax.Array, lsnr_s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log beta, log max(beta_tilde, 1e-20)) of the step from t to s < t, the two ends of a learned variance.

    beta = 1 - alpha_bar_t / alpha_bar_s is the step's own beta (on a spaced grid, not the training schedule's
    beta at t: diffusers' `current_beta_t`), beta_tilde = beta (1 - alpha_bar_s) / (1 - alpha_bar_t) the variance
    of q(x_s | x_t, x0). Both come from c = 1 - SNR_t / SNR_s = beta / sigma_t^2 without cancellation.
    """
    c = -jnp.expm1(lsnr_t - lsnr_s)
    log_c = jnp.log(jnp.maximum(c, jnp.finfo(jnp.float32).tiny))
    log_beta = log_c + jax.nn.log_sigmoid(-lsnr_t)
    log_beta_tilde = jnp.maximum(log_c + jax.nn.log_sigmoid(-lsnr_s), math.log(MIN_VARIANCE))
    return log_beta, log_beta_tilde


def learned_range_log_variance(v: jax.Array, log_beta: jax.Array, log_beta_tilde: jax.Array) -> jax.Array:
    """f log beta + (1 - f) log beta_tilde with f = (v + 1) / 2: v = -1 is the posterior variance, v = 1 beta."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def posterior_step(
    x_t: jax.Array, x0: jax.Array, lsnr_t: jax.Array, lsnr_s: jax.Array, log_variance: jax.Array, noise: jax.Array
) -> jax.Array:
    """Ancestral step with a given (e.g. learned) log variance: posterior mean of q(x_s | x_t, x0) + noise.

    The mean alpha_s (SNR_t / SNR_s x_t / alpha_t + c x0) forms SNR_t / SNR_s = 1 - c directly. `ddpm_step`'s
    float32 1 - c is off by 1% on DeepFloyd IF's first step (timestep 999 -> 976, alpha_t = 5e-5, x_t coefficient
    1.4e-3) and is 0 for 999 -> 800 (coefficient 1.5e-4); `ddpm_step` keeps its form so that earlier samples of
    continuous schedules reproduce bit for bit.
    """
    alpha_t, _ = step_alpha_sigma(lsnr_t)
    alpha_s, _ = step_alpha_sigma(lsnr_s)
    d = lsnr_t - lsnr_s
    mean = alpha_s * (jnp.exp(d) / alpha_t * x_t - jnp.expm1(d) * x0)
    return mean + jnp.exp(0.5 * log_variance) * noise


def ddim_step(
    x_t: jax.Array, x0: jax.Array, lsnr_t: jax.Array, lsnr_s: jax.Array, eta: jax.Array, noise: jax.Array
) -> jax.Array:
    """DDIM step (Song et al. 2021): x_s = alpha_s x0 + sqrt(sigma_s^2 - v) eps + sqrt(v) noise.

    v = eta^2 times the ancestral posterior variance: eta = 0 is the deterministic DDIM ODE step, eta = 1
    is exactly the ancestral step. eps is recomputed from the given x0, so a thresholded x0 stays consistent.
    """
    alpha_t, sigma_t = step_alpha_sigma(lsnr_t)
    alpha_s, sigma_s = step_alpha_sigma(lsnr_s)
    eps = (x_t - alpha_t * x0) / sigma_t
    c = -jnp.expm1(lsnr_t - lsnr_s)
    share = jnp.square(eta) * c  # v / sigma_s^2, in [0, 1] for eta in [0, 1]
    return alpha_s * x0 + sigma_s * (jnp.sqrt(1.0 - share) * eps + jnp.sqrt(share) * noise)


def dpmpp_2m_step(
    x_t: jax.Array,
    x0: jax.Array,
    x0_prev: jax.Array,
    lsnr_prev: jax.Array,
    lsnr_t: jax.Array,
    lsnr_s: jax.Array,
) -> jax.Array:
    """DPM-Solver++(2M) step (Lu et al. 2022, alg. 2): exponential integrator in lambda on the data prediction.

    x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D with h = lambda_s - lambda_t and
    D = x0 + (x0 - x0_prev) h / (2 h_prev): the previous evaluation (at lsnr_prev) extrapolates x0 linearly
    in lambda. With lsnr_prev = lsnr_t (no history, h_prev = 0) this is the first-order step (DDIM in lambda).
    """
    h = 0.5 * (lsnr_s - lsnr_t)
    h_prev = 0.5 * (lsnr_t - lsnr_prev)
    has_prev = h_prev > 0
    weight = jnp.where(has_prev, h / (2.0 * jnp.where(has_prev, h_prev, 1.0)), 0.0)
    d = x0 + weight * (x0 - x0_prev)
    _, sigma_t = step_alpha_sigma(lsnr_t)
    alpha_s, sigma_s = step_alpha_sigma(lsnr_s)
    return (sigma_s / sigma_t) * x_t - alpha_s * jnp.expm1(-h) * d
