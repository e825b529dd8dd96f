"""DeepFloyd IF's discrete diffusion: the 1000-step cosine schedule, integer-timestep grids, learned variance,
bounded thresholding, explicit noise, discrete training times, the variational bound, and IF's low-res input.

Parity with diffusers comes from tests/fixtures/if/scheduler.npz (tests/fixtures/make_if_scheduler_fixtures.py
says how it was made); the rest is checked against float64 NumPy closed forms and exact Gaussian denoisers.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from imagen_jax import diffusion
from imagen_jax.diffusion import augment, schedule, solvers, timesteps
from imagen_jax.diffusion.sampler import sampler_update

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "if", "scheduler.npz")
DISCRETE = "discrete_cosine"
MU = np.array([0.5, -0.3, 0.2, 0.0]).reshape(2, 2, 1)
VAR = np.array([0.04, 0.25, 0.09, 0.16]).reshape(2, 2, 1)

# Step configurations of the fixture's schedulers: (thresholding, threshold_max, variance).
CONFIGS = {
    "stage1": ("dynamic", 1.5, "learned_range"),
    "stage2": ("dynamic", 1.0, "learned_range"),
    "noising": ("static", math.inf, "fixed_small"),
}


@functools.cache
def _fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _text(batch):
    return jnp.zeros((batch, 2, 4), jnp.float32), jnp.ones((batch, 2), bool)


def _abar():
    return _fixture()["alphas_cumprod"].astype(np.float64)


def _lsnr(k):
    """log_snr of timestep k (int, -1 allowed) as the samplers evaluate it."""
    return diffusion.log_snr(jnp.float32(k) / 1000.0, DISCRETE)


# ------------------------------------------------------------------------------------------ schedule


def test_discrete_schedule_is_diffusers_squaredcos_cap_v2():
    fix = _fixture()
    i = np.arange(1000, dtype=np.float64)
    alpha_bar = lambda s: np.cos((s / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_array_equal(
        np.minimum(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999).astype(np.float32), fix["betas"]
    )
    np.testing.assert_array_equal(schedule.discrete_alphas_cumprod(DISCRETE), fix["alphas_cumprod"])
    abar = _abar()
    table = schedule.discrete_log_snr_table(DISCRETE)
    np.testing.assert_allclose(table, np.log(abar / (1 - abar)), rtol=1e-12)
    assert -20 < table[-1] < -19.8 and 10.0 < table[0] < 10.1  # inside the clamp: nothing is cut off

    got = np.asarray(diffusion.log_snr(jnp.arange(1000, dtype=jnp.float32) / 1000, DISCRETE), np.float64)
    np.testing.assert_allclose(got, table, rtol=1e-7, atol=1e-6)  # the float32 rounding of the table
    alpha, sigma = (np.asarray(a, np.float64) for a in diffusion.alpha_sigma(jnp.asarray(got, jnp.float32)))
    np.testing.assert_allclose(alpha**2, abar, rtol=2e-6)
    np.testing.assert_allclose(sigma**2, 1 - abar, rtol=2e-6)
    # t rounds to the nearest timestep; t >= 1 is the last one; t < 0 is "before the first step", the clamp.
    probe = jnp.array([0.2504, 0.2496, 1.0, 1.7, -0.001, -0.3], jnp.float32)
    np.testing.assert_array_equal(schedule.timestep_index(probe), [250, 250, 999, 999, -1, -1])
    np.testing.assert_allclose(
        diffusion.log_snr(probe, DISCRETE), [*table[[250, 250, 999, 999]], 20.0, 20.0], rtol=1e-6
    )
    assert diffusion.is_discrete(DISCRETE) and not diffusion.is_discrete("cosine")
    assert DISCRETE in diffusion.SCHEDULES and DISCRETE in diffusion.DISCRETE_SCHEDULES


def test_discrete_grids_are_diffusers_set_timesteps():
    fix = _fixture()
    for n in (1, 3, 16, 27, 50, 100, 1000):
        np.testing.assert_array_equal(diffusion.discrete_timesteps(n), fix[f"timesteps.leading.{n}"])
    np.testing.assert_array_equal(diffusion.discrete_timesteps(100)[:3], [990, 980, 970])
    for name in diffusion.NAMED_TIMESTEPS:
        np.testing.assert_array_equal(diffusion.discrete_timesteps(name), fix[f"timesteps.{name}"])
    count, grid = timesteps.resolve_steps("smart50", DISCRETE)
    assert count == 50 and grid.shape == (timesteps.GRID_SIZE,) and grid.dtype == np.float32
    np.testing.assert_array_equal(np.round(grid[:50] * 1000).astype(int), diffusion.NAMED_TIMESTEPS["smart50"])
    assert (grid[50:] < 0).all() and timesteps.resolve_steps(20, "cosine") == (20, None)


def test_bad_steps_are_one_line_errors():
    text, mask = _text(1)
    run = functools.partial(diffusion.sample, lambda *a: a[1], None, text, mask, jax.random.key(0), shape=(1, 2, 2, 1))
    with pytest.raises(
        ValueError, match=r"^named sampling steps \('smart50'\) need a discrete schedule, not 'cosine'$"
    ):
        run(steps="smart50")
    with pytest.raises(ValueError, match=r"unknown sampling steps 'smart51'; valid names: fast27, smart27, .*super100"):
        run(steps="smart51", schedule=DISCRETE)
    with pytest.raises(ValueError, match="must be <= 1000"):
        run(steps=1001, schedule=DISCRETE)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        run(steps=0, schedule=DISCRETE)
    with pytest.raises(ValueError, match="threshold_max must be >= 1"):
        run(steps=2, threshold_max=0.5)
    with pytest.raises(ValueError, match=r"unknown variance 'learned'; valid variances: fixed_small, learned_range"):
        run(steps=2, variance="learned")


# ------------------------------------------------------------------------------ one scheduler step


def _np_ddpm_step(key, thresholding, threshold_max):
    """diffusers' DDPMScheduler.step in float64 on the fixture's inputs (float32 alpha_bar, recorded noise)."""
    fix, abar = _fixture(), _abar()
    t, prev = int(key.rsplit(".", 1)[1]), int(fix[key + ".prev_timestep"])
    out, x = fix[key + ".model_output"].astype(np.float64), fix[key + ".sample"].astype(np.float64)
    a_t, a_prev = abar[t], abar[prev] if prev >= 0 else 1.0
    x0 = (x - np.sqrt(1 - a_t) * out[..., :3]) / np.sqrt(a_t)
    s = np.clip(np.quantile(np.abs(x0.reshape(len(x0), -1)), 0.95, axis=1), 1, threshold_max)[:, None, None, None]
    x0 = np.clip(x0, -s, s) / s if thresholding == "dynamic" else np.clip(x0, -1, 1)
    beta = 1 - a_t / a_prev
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    if t == 0:
        return x0, mean
    log_beta_tilde = np.log(max((1 - a_prev) / (1 - a_t) * beta, 1e-20))
    frac = (out[..., 3:] + 1) / 2 if out.shape[-1] == 6 else 0.0
    log_var = frac * np.log(beta) + (1 - frac) * log_beta_tilde
    return x0, mean + np.exp(0.5 * log_var) * fix[key + ".noise"]


@pytest.mark.parametrize("config", CONFIGS)
def test_single_steps_match_ddpm_scheduler(config):
    fix = _fixture()
    thresholding, threshold_max, variance = CONFIGS[config]
    keys = sorted({k.rsplit(".", 1)[0] for k in fix if k.startswith(f"step.{config}.")})
    assert len(keys) == 9
    regimes = set()
    for key in keys:
        t, prev = int(key.rsplit(".", 1)[1]), int(fix[key + ".prev_timestep"])
        out, x = jnp.asarray(fix[key + ".model_output"]), jnp.asarray(fix[key + ".sample"])
        pred, var = (out[..., :3], out[..., 3:]) if out.shape[-1] == 6 else (out, None)
        lsnr_t, lsnr_s = _lsnr(t), _lsnr(prev)
        noise = jnp.asarray(fix[key + ".noise"])
        x_s, x0 = sampler_update(
            x, pred, var, x0_prev=x, lsnr_prev=lsnr_t, lsnr_t=lsnr_t, lsnr_s=lsnr_s, noise=noise, sampler="ddpm",
            objective="eps", thresholding=thresholding, percentile=0.95, threshold_max=threshold_max,
            variance=variance, discrete=True,
        )  # fmt: skip
        got = np.asarray(x0 if t == 0 else x_s)  # the loop returns x0 at the last evaluation, as diffusers' step does
        want_x0, want = _np_ddpm_step(key, thresholding, threshold_max)
        # float32 x0 = (x - sigma eps) / alpha carries ~ulp(x) / alpha of rounding (alpha = 0.016 at timestep 990).
        atol = 1e-6 + 4e-7 / np.sqrt(_abar()[t])
        np.testing.assert_allclose(x0, want_x0, rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(x0, fix[key + ".pred_original_sample"], rtol=0, atol=atol, err_msg=key)
        # diffusers' float32 beta = 1 - alpha_bar_t / alpha_bar_prev cancels near t = 0 (timestep 10 -> 0: off by
        # 4e-5 from float64); elsewhere both agree to 1e-6. Ours forms beta from log-SNR without cancellation.
        theirs = fix[key + ".prev_sample"]
        assert np.max(np.abs(got - theirs)) <= np.max(np.abs(theirs - want)) + atol, key
        raw = np.asarray(diffusion.pred_to_x0(pred, x, *diffusion.alpha_sigma(lsnr_t), "eps"))
        q = np.quantile(np.abs(raw.reshape(4, -1)), 0.95, axis=1)
        regimes |= {"below 1" if s <= 1 else "inside" if s <= 1.5 else "above 1.5" for s in q}
    assert regimes == {"below 1", "inside", "above 1.5"}, regimes  # thresholding idle, rescaling and capped


def test_learned_range_log_variance_closed_form():
    abar = _abar()
    grid = diffusion.discrete_timesteps(16)
    for t, s in zip(grid[:-1], grid[1:]):
        beta = 1 - abar[t] / abar[s]
        beta_tilde = (1 - abar[s]) / (1 - abar[t]) * beta
        log_beta, log_beta_tilde = solvers.posterior_log_variances(_lsnr(t), _lsnr(s))
        np.testing.assert_allclose([log_beta, log_beta_tilde], np.log([beta, beta_tilde]), rtol=1e-5, atol=1e-5)
        v = jnp.array([-1.0, 0.0, 1.0])
        got = solvers.learned_range_log_variance(v, log_beta, log_beta_tilde)
        want = [np.log(beta_tilde), (np.log(beta) + np.log(beta_tilde)) / 2, np.log(beta)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # After the last step alpha_bar = 1 and the posterior variance is 0: floored at 1e-20 (diffusers' clamp).
    _, floor = solvers.posterior_log_variances(_lsnr(0), jnp.float32(1e4))
    np.testing.assert_allclose(floor, np.log(1e-20), rtol=1e-6)


def test_threshold_max_bounds_the_dynamic_scale():
    rng = np.random.default_rng(0)
    x0 = (rng.uniform(-1, 1, (4, 3, 3, 2)) * np.array([0.5, 1.2, 2.0, 4.0])[:, None, None, None]).astype(np.float32)
    s = np.clip(np.quantile(np.abs(x0.reshape(4, -1)), 0.95, axis=1), 1.0, 1.5)[:, None, None, None]
    want = np.clip(x0, -s, s) / s
    np.testing.assert_allclose(diffusion.threshold(x0, "dynamic", 0.95, threshold_max=1.5), want, rtol=1e-6)
    np.testing.assert_allclose(diffusion.dynamic_threshold(x0, 0.95, 1.0), np.clip(x0, -1, 1))
    np.testing.assert_array_equal(
        diffusion.dynamic_threshold(x0, 0.95), diffusion.dynamic_threshold(x0, 0.95, math.inf)
    )


# ----------------------------------------------------------------------------- guided pipeline loops


@functools.cache
def _fake_unet():
    """The fixture's analytic U-Net: tanh(x W + bias + timestep u), bias b_uncond where the text is dropped."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        w, b_cond, b_uncond, u = params
        h = x_t[..., 0:1] * w[0] + x_t[..., 1:2] * w[1] + x_t[..., 2:3] * w[2]
        bias = jnp.where(drop_text[:, None], b_uncond, b_cond)[:, None, None, :]
        return jnp.tanh(h + bias + jnp.round(t * 1000)[:, None, None, None] * u)

    return apply_fn


def _np_pipeline_loop(loop, threshold_max, sampler):
    """The IF pipeline's loop in float64 on the fixture's inputs: fake U-Net, guidance on the eps channels, the
    variance of the conditional half, diffusers' DDPM step (learned_range) or DDIM step (eps from the thresholded
    x0), the recorded noise."""
    fix, abar = _fixture(), _abar()
    w, b_cond, b_uncond, u = (fix[f"fake_unet.{k}"].astype(np.float64) for k in ("w", "b_cond", "b_uncond", "u"))
    noise, grid = fix[f"{loop}.noise"].astype(np.float64), fix[f"{loop}.timesteps"]
    scale = float(fix[f"{loop}.guidance"])
    x = noise[0]
    for i, t in enumerate(grid):
        out_cond, out_uncond = (np.tanh(x @ w + b + t * u) for b in (b_cond, b_uncond))
        eps = out_uncond[..., :3] + scale * (out_cond[..., :3] - out_uncond[..., :3])
        a_t, a_prev = abar[t], abar[grid[i + 1]] if i + 1 < len(grid) else 1.0
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        s = np.clip(np.quantile(np.abs(x0.reshape(len(x0), -1)), 0.95, axis=1), 1, threshold_max)[:, None, None, None]
        x0 = np.clip(x0, -s, s) / s
        if i + 1 == len(grid):
            return x0
        if sampler == "ddim":
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
            continue
        beta = 1 - a_t / a_prev
        mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
        frac = (out_cond[..., 3:] + 1) / 2
        log_var = frac * np.log(beta) + (1 - frac) * np.log(max((1 - a_prev) / (1 - a_t) * beta, 1e-20))
        x = mean + np.exp(0.5 * log_var) * noise[i + 1]


@pytest.mark.parametrize(
    "loop,steps,sampler,threshold_max",
    [("loop_leading3", 3, "ddpm", 1.5), ("loop_fast27", "fast27", "ddpm", 1.0), ("loop_ddim5", 5, "ddim", 1.5)],
)
def test_guided_loops_match_the_if_pipeline(loop, steps, sampler, threshold_max):
    fix = _fixture()
    noise = jnp.asarray(fix[f"{loop}.noise"])
    count, grid = timesteps.resolve_steps(steps, DISCRETE)
    np.testing.assert_array_equal(np.round(grid[:count] * 1000), fix[f"{loop}.timesteps"])
    params = tuple(jnp.asarray(fix[f"fake_unet.{k}"]) for k in ("w", "b_cond", "b_uncond", "u"))
    text, mask = _text(2)
    image = diffusion.sample(
        _fake_unet(), params, text, mask, jax.random.key(0), shape=(2, 8, 8, 3), steps=steps, schedule=DISCRETE,
        guidance_scale=float(fix[f"{loop}.guidance"]), sampler=sampler, variance="learned_range", percentile=0.95,
        threshold_max=threshold_max, noise=noise,
    )  # fmt: skip
    image, theirs = np.asarray(image, np.float64), fix[f"{loop}.image"]
    want = _np_pipeline_loop(loop, threshold_max, sampler)
    assert np.max(np.abs(image - want)) < 5e-6
    # diffusers' own float32 rounding: its beta = 1 - alpha_bar_t / alpha_bar_prev cancels at fast27's one-step
    # gaps and its last steps (1.3e-5 from float64 there; 2.6e-7 for leading3, 9.5e-7 for ddim5).
    assert np.max(np.abs(theirs - want)) < 2e-5
    assert np.max(np.abs(image - theirs)) < (2e-5 if loop == "loop_fast27" else 2e-6)
    # The key is not used when every draw is given.
    again = diffusion.sample(
        _fake_unet(), params, text, mask, jax.random.key(1), shape=(2, 8, 8, 3), steps=steps, schedule=DISCRETE,
        guidance_scale=float(fix[f"{loop}.guidance"]), sampler=sampler, variance="learned_range", percentile=0.95,
        threshold_max=threshold_max, noise=noise, chunk_size=2,
    )  # fmt: skip
    np.testing.assert_array_equal(again, image)


def test_variance_channels_guidance_and_errors():
    calls = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        # eps = 0.1 x (cond) or -0.1 x (uncond); v = +1 (cond) or -1 (uncond): the variance must be the cond one.
        calls.append(x_t.shape)
        sign = jnp.where(drop_text, -1.0, 1.0)[:, None, None, None]
        return jnp.concatenate([0.1 * sign * x_t, sign * jnp.ones_like(x_t)], axis=-1)

    text, mask = _text(2)
    noise = jax.random.normal(jax.random.key(3), (4, 2, 3, 3, 1))
    run = functools.partial(
        diffusion.sample, apply_fn, None, text, mask, jax.random.key(0), shape=(2, 3, 3, 1), steps=3,
        schedule=DISCRETE, guidance_scale=2.0, thresholding="none", noise=noise,
    )  # fmt: skip
    learned = run(variance="learned_range")

    def reference(log_var_of):
        x = np.asarray(noise[0], np.float64)
        grid = diffusion.discrete_timesteps(3)
        for i, t in enumerate(grid):
            lsnr_t = float(_lsnr(t))
            a2 = 1 / (1 + np.exp(-lsnr_t))
            eps = 0.3 * x  # uncond + 2 (cond - uncond) = -0.1 x + 2 (0.2 x)
            x0 = (x - np.sqrt(1 - a2) * eps) / np.sqrt(a2)
            if i == len(grid) - 1:
                return x0
            a2_s = float(_abar()[grid[i + 1]])
            beta = 1 - a2 / a2_s
            beta_tilde = (1 - a2_s) / (1 - a2) * beta
            mean = np.sqrt(a2_s) * beta / (1 - a2) * x0 + np.sqrt(1 - beta) * (1 - a2_s) / (1 - a2) * x
            x = mean + np.sqrt(np.exp(log_var_of(beta, beta_tilde))) * np.asarray(noise[i + 1], np.float64)

    np.testing.assert_allclose(learned, reference(lambda b, bt: np.log(b)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(), reference(lambda b, bt: np.log(bt)), rtol=1e-4, atol=1e-4)  # fixed_small
    assert {shape[0] for shape in calls} == {4}
    # DDIM and DPM-Solver++ read the eps channels only: a C-channel model with those eps samples the same.
    eps_only = lambda p, x, t, tx, m, drop: 0.1 * jnp.where(drop, -1.0, 1.0)[:, None, None, None] * x  # noqa: E731
    for sampler in ("ddim", "dpmpp_2m"):
        both = run(sampler=sampler, variance="learned_range", noise=noise[0])
        np.testing.assert_array_equal(both, diffusion.sample(eps_only, None, text, mask, jax.random.key(0),
            shape=(2, 3, 3, 1), steps=3, schedule=DISCRETE, guidance_scale=2.0, thresholding="none", noise=noise[0],
            sampler=sampler))  # fmt: skip
    with pytest.raises(ValueError, match="needs a model output of 2C channels"):
        diffusion.sample(eps_only, None, text, mask, jax.random.key(0), shape=(2, 3, 3, 1), steps=3,
                         schedule=DISCRETE, variance="learned_range")  # fmt: skip
    with pytest.raises(ValueError, match="the model output has 3 channels; expected 1 or 2"):
        diffusion.sample(lambda p, x, *a: jnp.concatenate([x] * 3, -1), None, text, mask, jax.random.key(0),
                         shape=(2, 3, 3, 1), steps=3, schedule=DISCRETE)  # fmt: skip
    with pytest.raises(ValueError, match=r"expected the sample shape \(2, 3, 3, 1\) or \(4, 2, 3, 3, 1\)"):
        run(noise=noise[:3])


def test_one_executable_for_every_discrete_grid_and_explicit_noise():
    traces = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        traces.append(1)
        return jnp.concatenate([params * x_t, jnp.zeros_like(x_t)], -1)

    text, mask = _text(2)
    run = functools.partial(diffusion.sample, apply_fn, jnp.float32(0.3), text, mask, shape=(2, 4, 4, 1),
                            schedule=DISCRETE, variance="learned_range", thresholding="static")  # fmt: skip
    whole = run(jax.random.key(2), steps="smart27")
    np.testing.assert_array_equal(run(jax.random.key(2), steps="smart27", chunk_size=5), whole)
    traced = len(traces)
    for steps in (10, "super40", 1, 100):
        run(jax.random.key(3), steps=steps)
    assert len(traces) == traced
    # Explicit noise drawn like the key's gives the same image.
    keys = jax.vmap(jax.random.split)(jax.random.split(jax.random.key(2), 2))
    start = jax.vmap(lambda k: jax.random.normal(k, (4, 4, 1)))(keys[:, 0])
    draws = [
        jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), (4, 4, 1)))(keys[:, 1]) for i in range(27)
    ]
    explicit = run(jax.random.key(9), steps="smart27", noise=jnp.stack([start, *draws]))
    np.testing.assert_allclose(explicit, whole, rtol=0, atol=1e-6)  # another program: last-bit differences


# --------------------------------------------------------------------- samplers on Gaussian data


@functools.cache
def _gaussian(objective, channels_out=1, v_value=-1.0):
    """Exact E[x0 | x_t] for x0 ~ N(mu, diag(var)) as an eps or v prediction (plus constant variance channels)."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        mu, var = params
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, DISCRETE)[:, None, None, None])
        x0 = mu + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mu)
        pred = diffusion.x0_to_pred(x0, x_t, alpha, sigma, objective)
        return pred if channels_out == 1 else jnp.concatenate([pred, jnp.full_like(pred, v_value)], -1)

    return apply_fn


def _params(tile=1):
    return tuple(jnp.asarray(np.tile(a, (tile, tile, 1)), jnp.float32) for a in (MU, VAR))


def _np_deterministic(sampler, grid):
    """(gain, offset): output = gain * start noise + offset, per pixel, float64, for 'ddim' (eta 0) or 'dpmpp_2m'
    on the timesteps `grid`, x0 from the exact denoiser."""
    abar = _abar()[grid]
    alphas, sigmas = np.sqrt(abar), np.sqrt(1 - abar)
    x, history = np.stack([np.ones_like(VAR), np.zeros_like(MU)]), None
    for i in range(len(grid)):
        a, s = alphas[i], sigmas[i]
        k = a * VAR / (a**2 * VAR + s**2)
        x0 = k * x + np.stack([np.zeros_like(MU), MU - k * a * MU])
        if i == len(grid) - 1:
            return x0
        a_next, s_next = alphas[i + 1], sigmas[i + 1]
        if sampler == "ddim":
            x = a_next * x0 + s_next * (x - a * x0) / s
            continue
        h = np.log(a_next / s_next) - np.log(a / s)
        d = x0
        if history is not None:
            r = history[1] / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * history[0]
        x = s_next / s * x - a_next * np.expm1(-h) * d
        history = (x0, h)


def _np_ancestral_moments(grid, learned_beta=False):
    """Exact mean/variance of the ancestral sampler on the timesteps `grid` (posterior variance, or beta)."""
    abar = _abar()[grid]
    mean, variance = np.zeros_like(MU), np.ones_like(VAR)
    for i in range(len(grid)):
        a2_t = abar[i]
        gain = np.sqrt(a2_t) * VAR / (a2_t * VAR + 1 - a2_t)
        mean_x0 = MU + gain * (mean - np.sqrt(a2_t) * MU)
        if i == len(grid) - 1:
            return mean_x0, gain**2 * variance
        a2_s = abar[i + 1]
        beta = 1 - a2_t / a2_s
        c_0, c_x = np.sqrt(a2_s) * beta / (1 - a2_t), np.sqrt(1 - beta) * (1 - a2_s) / (1 - a2_t)
        mean = c_x * mean + c_0 * mean_x0
        step_var = beta if learned_beta else (1 - a2_s) / (1 - a2_t) * beta
        variance = (c_x + c_0 * gain) ** 2 * variance + step_var


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [100, "smart50", "fast27"])
def test_deterministic_samplers_on_discrete_grids_match_float64(sampler, steps):
    noise = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))
    text, mask = _text(2)
    for objective in ("v", "eps"):
        got = diffusion.sample(
            _gaussian(objective), _params(), text, mask, jax.random.key(0), shape=(2, 2, 2, 1), steps=steps,
            schedule=DISCRETE, objective=objective, sampler=sampler, thresholding="none", noise=noise,
        )  # fmt: skip
        gain, offset = _np_deterministic(sampler, diffusion.discrete_timesteps(steps))
        # An eps-model's x0 at timestep 999 (alpha = 4.9e-5) loses ~3 digits in float32 (named lists start there).
        atol = 1e-3 if objective == "eps" else 2e-4
        np.testing.assert_allclose(got, gain * np.asarray(noise, np.float64) + offset, atol=atol, err_msg=objective)
        assert np.all(np.isfinite(np.asarray(got)))
    # Sensible: the output variance within 16% of the data's (float64: DDIM 0.063, 0.095, 0.146 at 100 leading steps,
    # smart50, fast27; DPM-Solver++ 0.038, 0.043, 0.156). Leading grids start at timestep 1000 - 1000 // N, short
    # of 999, and leave out that much signal: the mean is off by 0.002 at 100 steps.
    np.testing.assert_allclose(gain**2, VAR, rtol=0.16)
    np.testing.assert_allclose(offset, MU, atol=3e-3)


@pytest.mark.parametrize("steps,variance,v_value", [(50, "fixed_small", -1.0), ("smart50", "learned_range", 1.0)])
def test_ancestral_sampler_on_discrete_grids_matches_exact_moments(steps, variance, v_value):
    batch, tile = 500, 4  # 8000 samples per (mu, var) pixel
    text, mask = _text(batch)
    x = diffusion.sample(
        _gaussian("eps", 2, v_value), _params(tile), text, mask, jax.random.key(5), steps=steps, schedule=DISCRETE,
        shape=(batch, 2 * tile, 2 * tile, 1), variance=variance, thresholding="none",
    )  # fmt: skip
    pooled = np.asarray(x).reshape(batch, tile, 2, tile, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, 1)
    mean, var = _np_ancestral_moments(diffusion.discrete_timesteps(steps), learned_beta=v_value == 1.0)
    np.testing.assert_allclose(pooled.mean(0), mean, atol=4 * np.sqrt(VAR.max() / len(pooled)))
    np.testing.assert_allclose(pooled.var(0), var, rtol=0.06)


# ------------------------------------------------------------------------------------------ training


def test_discrete_training_times():
    def timesteps_of(t):  # asserts t = k / 1000 in float32 (XLA divides by multiplying: off by at most one ulp)
        k = np.round(np.asarray(t, np.float64) * 1000).astype(np.int64)
        np.testing.assert_allclose(np.asarray(t), k / 1000, rtol=1.2e-7, atol=0)
        return k

    k = timesteps_of(diffusion.sample_times(jax.random.key(0), (20000,), DISCRETE))
    assert k.min() == 0 and k.max() == 999 and abs(k.mean() - 499.5) < 5
    seen = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        seen.append(t)
        return jnp.zeros_like(x_t)

    text, mask = _text(8)
    for key in (jax.random.key(1), jax.random.split(jax.random.key(1), 8)):
        diffusion.diffusion_loss(apply_fn, None, jnp.zeros((8, 2, 2, 3)), text, mask, key, schedule=DISCRETE)
        timesteps_of(seen[-1])
    z, aug_t = augment.training_augmentation(jnp.zeros((4000, 1, 1, 1)), jax.random.key(2), DISCRETE, 0.5)
    k = timesteps_of(aug_t)
    assert k.min() == 0 and k.max() == 499


def _np_vlb(x0, x_t, k, eps, v):
    """improved-DDPM's L_k in bits per dimension, float64, from the fixture's alpha_bar."""
    abar = _abar()
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    shape = (-1,) + (1,) * (x0.ndim - 1)
    at = lambda table: table[k].reshape(shape)  # noqa: E731
    x0_pred = (x_t - np.sqrt(1 - at(abar)) * eps) / np.sqrt(at(abar))
    c_0, c_x = at(beta * np.sqrt(abar_prev) / (1 - abar)), at((1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar))
    true_mean, model_mean = c_0 * x0 + c_x * x_t, c_0 * x0_pred + c_x * x_t
    frac = (v + 1) / 2
    model_log_var = frac * np.log(at(beta)) + (1 - frac) * at(post_log_var)
    true_log_var = at(post_log_var)
    kl = 0.5 * (-1 + model_log_var - true_log_var + np.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))  # fmt: skip
    std = np.exp(0.5 * model_log_var)
    upper, lower = ndtr((x0 - model_mean + 1 / 255) / std), ndtr((x0 - model_mean - 1 / 255) / std)
    with np.errstate(divide="ignore"):  # the branches np.where drops
        log_p = np.where(x0 < -0.999, np.log(upper), np.where(x0 > 0.999, np.log(1 - lower), np.log(upper - lower)))
    axes = tuple(range(1, x0.ndim))
    return np.where(k == 0, -log_p.mean(axes), kl.mean(axes)) / np.log(2)


def test_vlb_matches_improved_ddpm_closed_form():
    rng = np.random.default_rng(0)
    k = np.array([0, 0, 1, 2, 10, 250, 500, 998, 999])
    b = len(k)
    x0 = (rng.integers(0, 256, (b, 4, 4, 3)) / 127.5 - 1).astype(np.float32)  # 8-bit data, both edges included
    x0[:, 0, 0, 0], x0[:, 0, 1, 0] = -1.0, 1.0
    abar = _abar()[k].reshape(-1, 1, 1, 1)
    eps = rng.normal(size=x0.shape)
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps).astype(np.float32)
    pred = (eps + 0.1 * rng.normal(size=x0.shape)).astype(np.float32)
    v = rng.uniform(-1, 1, x0.shape).astype(np.float32)
    t = jnp.asarray(k / 1000, jnp.float32)
    got = diffusion.vlb_terms(jnp.asarray(pred), jnp.asarray(v), jnp.asarray(x_t), jnp.asarray(x0), t, DISCRETE, "eps")
    want = _np_vlb(x0.astype(np.float64), x_t.astype(np.float64), k, pred.astype(np.float64), v.astype(np.float64))
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    # The bound trains the variance only: no gradient reaches the prediction.
    loss = lambda p, v: jnp.sum(diffusion.vlb_terms(p, v, jnp.asarray(x_t), jnp.asarray(x0), t, DISCRETE, "eps"))  # noqa: E731
    grad_pred, grad_v = jax.grad(loss, argnums=(0, 1))(jnp.asarray(pred), jnp.asarray(v))
    assert float(jnp.max(jnp.abs(grad_pred))) == 0.0 and float(jnp.max(jnp.abs(grad_v))) > 0


def test_hybrid_loss_on_a_two_c_channel_model():
    x0 = jax.random.uniform(jax.random.key(0), (6, 4, 4, 3), minval=-1, maxval=1)
    text, mask = _text(6)
    seen = {}

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        seen["x_t"], seen["t"] = x_t, t
        return jnp.concatenate([params * x_t, jnp.full_like(x_t, 0.3)], -1)

    key = jax.random.key(1)
    plain, aux = diffusion.diffusion_loss(apply_fn, jnp.float32(0.5), x0, text, mask, key, schedule=DISCRETE)
    assert set(aux) == {"loss"}
    total, aux = diffusion.diffusion_loss(
        apply_fn, jnp.float32(0.5), x0, text, mask, key, schedule=DISCRETE, variance_loss="vlb"
    )
    # The eps MSE of the first C channels (the same draws), plus 0.001 * 1000 * L_k.
    np.testing.assert_allclose(aux["mse"], plain, rtol=1e-6)
    x_t, t = seen["x_t"], seen["t"]
    alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, DISCRETE)[:, None, None, None])
    noise = (x_t - alpha * x0) / sigma
    np.testing.assert_allclose(plain, jnp.mean(jnp.square(0.5 * x_t - noise)), rtol=1e-4)
    vlb = diffusion.vlb_terms(0.5 * x_t, jnp.full_like(x_t, 0.3), x_t, x0, t, DISCRETE, "eps")
    np.testing.assert_allclose(aux["vlb"], jnp.mean(vlb), rtol=1e-5)
    np.testing.assert_allclose(total, plain + jnp.mean(vlb), rtol=1e-5)
    with pytest.raises(ValueError, match="variance_loss='vlb' needs a discrete schedule"):
        diffusion.diffusion_loss(apply_fn, 0.5, x0, text, mask, key, variance_loss="vlb")
    with pytest.raises(ValueError, match="needs a model output of 6 channels"):
        diffusion.diffusion_loss(lambda p, x, *a: x, 0.5, x0, text, mask, key, schedule=DISCRETE, variance_loss="vlb")
    with pytest.raises(ValueError, match=r"unknown variance loss 'kl'; valid variance losses: none, vlb"):
        diffusion.diffusion_loss(apply_fn, 0.5, x0, text, mask, key, schedule=DISCRETE, variance_loss="kl")


# ------------------------------------------------------------------------------- low-res preparation


def test_noise_augmentation_at_level_quarter_is_add_noise_250():
    fix = _fixture()
    x, noise = jnp.asarray(fix["add_noise.x"]), jnp.asarray(fix["add_noise.noise"])
    got = diffusion.q_sample(x, jnp.full((2,), 0.25), noise, DISCRETE)
    np.testing.assert_allclose(got, fix["add_noise.250"], rtol=1e-6, atol=1e-6)
    key = jax.random.key(4)
    z, aug_t = augment.sampling_augmentation(x, 0.25, key, DISCRETE)
    drawn = jax.random.normal(key, x.shape, jnp.float32)  # the draw augment_lowres makes from one key
    np.testing.assert_array_equal(z, diffusion.q_sample(x, aug_t, drawn, DISCRETE))
    np.testing.assert_array_equal(aug_t, 0.25)


def test_resize_align_corners_is_torch_bilinear_align_corners():
    fix = _fixture()
    x = jnp.asarray(fix["upscale.x"])
    for size in ((32, 32), (64, 64), (24, 40), (7, 7)):
        want = fix[f"upscale.{size[0]}x{size[1]}"]
        got = augment.resize_align_corners(x, size if size[0] != size[1] else size[0])
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=str(size))
    # Corners land on corners, and the identity size is a copy.
    up = augment.resize_align_corners(x, 64)
    np.testing.assert_array_equal(up[:, [0, 0, -1, -1], [0, -1, 0, -1]], x[:, [0, 0, -1, -1], [0, -1, 0, -1]])
    np.testing.assert_array_equal(augment.resize_align_corners(x, 16), x)
