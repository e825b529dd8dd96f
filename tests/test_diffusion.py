"""Diffusion package: schedules, forward process, loss, guidance/thresholding and the DDPM sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.diffusion.schedule import DISCRETE_SCHEDULES

COSINE_S = 0.008


def _np_cosine_log_snr(t):
    alpha_bar = np.cos(0.5 * np.pi * (t + COSINE_S) / (1 + COSINE_S)) ** 2
    return np.log(alpha_bar / (1 - alpha_bar))


def _np_linear_log_snr(t):
    alpha_bar = np.exp(-(1e-4 + 10 * t**2))
    return np.log(alpha_bar / (1 - alpha_bar))


def _text(batch, length=3, dim=4):
    return jnp.zeros((batch, length, dim), jnp.float32), jnp.ones((batch, length), bool)


# ----------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule,reference", [("cosine", _np_cosine_log_snr), ("linear", _np_linear_log_snr)])
def test_log_snr_matches_closed_form(schedule, reference):
    t = np.linspace(0.0, 0.999, 1001)
    got = np.asarray(diffusion.log_snr(t, schedule))
    np.testing.assert_allclose(got, reference(t), rtol=1e-4, atol=2e-4)


def test_linear_schedule_is_the_continuous_limit_of_ddpm_betas():
    betas = np.linspace(1e-4, 0.02, 1000)
    log_alpha_bar = np.cumsum(np.log1p(-betas))
    t = np.arange(1, 1001) / 1000
    log_snr = np.asarray(diffusion.log_snr(t, "linear"))
    got_log_alpha_bar = np.log(1 / (1 + np.exp(-log_snr.astype(np.float64))))
    # The continuous form drops the 0.1 t term of -log alpha_bar = 0.1 t + 9.95 t^2: close, not equal.
    np.testing.assert_allclose(got_log_alpha_bar, log_alpha_bar, atol=0.15)


@pytest.mark.parametrize("schedule", [s for s in diffusion.SCHEDULES if s not in DISCRETE_SCHEDULES])
def test_log_snr_monotone_finite_and_variance_preserving(schedule):  # discrete: tests/test_if_diffusion.py
    t = jnp.linspace(0.0, 1.0, 4097)
    lam = diffusion.log_snr(t, schedule)
    assert lam.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lam)))
    assert bool(jnp.all(jnp.diff(lam) <= 0)) and bool(jnp.all(jnp.diff(lam[:-2]) < 0))
    assert lam[0] > 8.0 and lam[-1] < -9.9
    alpha, sigma = diffusion.alpha_sigma(lam)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    extreme_alpha, extreme_sigma = diffusion.alpha_sigma(jnp.array([-20.0, 20.0]))
    assert bool(jnp.all(extreme_alpha > 0)) and bool(jnp.all(extreme_sigma > 0))


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'cosin'.*cosine, linear"):
        diffusion.log_snr(jnp.zeros(2), "cosin")


# ----------------------------------------------------------------------------- forward process, loss


def test_q_sample_against_numpy():
    x0 = np.random.default_rng(0).uniform(-1, 1, (5, 2, 2, 3)).astype(np.float32)
    noise = np.random.default_rng(1).normal(size=x0.shape).astype(np.float32)
    t = np.array([0.0, 0.25, 0.5, 0.75, 0.99], np.float32)
    alpha_bar = 1 / (1 + np.exp(-_np_cosine_log_snr(t.astype(np.float64))))
    expected = np.sqrt(alpha_bar)[:, None, None, None] * x0 + np.sqrt(1 - alpha_bar)[:, None, None, None] * noise
    got = diffusion.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise), "cosine")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_q_sample_statistics():
    x0 = jnp.full((20000, 1, 1, 1), 0.7)
    t = jnp.full((20000,), 0.4)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = np.asarray(diffusion.q_sample(x0, t, noise, "linear"))
    alpha_bar = np.exp(-(1e-4 + 10 * 0.4**2))
    assert abs(x_t.mean() - np.sqrt(alpha_bar) * 0.7) < 0.03
    assert abs(x_t.std() - np.sqrt(1 - alpha_bar)) < 0.02


@pytest.mark.parametrize("objective", diffusion.OBJECTIVES)
def test_prediction_conversions_round_trip(objective):
    rng = np.random.default_rng(2)
    x0, eps = rng.normal(size=(2, 4, 3, 3, 2)).astype(np.float32)
    lam = diffusion.log_snr(jnp.array([0.05, 0.3, 0.6, 0.95]), "cosine")[:, None, None, None]
    alpha, sigma = diffusion.alpha_sigma(lam)
    x_t = alpha * x0 + sigma * eps
    pred = diffusion.target(x0, eps, alpha, sigma, objective)
    np.testing.assert_allclose(diffusion.pred_to_x0(pred, x_t, alpha, sigma, objective), x0, atol=2e-4)
    np.testing.assert_allclose(diffusion.pred_to_eps(pred, x_t, alpha, sigma, objective), eps, atol=2e-4)
    np.testing.assert_allclose(diffusion.x0_to_pred(x0, x_t, alpha, sigma, objective), pred, atol=2e-4)
    if objective == "v":
        np.testing.assert_allclose(pred, alpha * eps - sigma * x0, atol=1e-6)


def _oracle(x0, objective, offset=0.0):
    """An apply_fn that knows x0 and returns the exact target (plus a constant offset)."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, "cosine")[:, None, None, None])
        return diffusion.x0_to_pred(x0, x_t, alpha, sigma, objective) + offset

    return apply_fn


@pytest.mark.parametrize("objective", diffusion.OBJECTIVES)
def test_loss_of_oracle_is_zero_and_is_a_mean(objective):
    x0 = jax.random.uniform(jax.random.key(3), (64, 4, 4, 3), minval=-1, maxval=1)
    text, mask = _text(64)
    key = jax.random.key(4)
    loss, metrics = diffusion.diffusion_loss(_oracle(x0, objective), None, x0, text, mask, key, objective=objective)
    assert float(loss) < 1e-6 and float(metrics["loss"]) == float(loss)
    shifted, _ = diffusion.diffusion_loss(_oracle(x0, objective, 0.5), None, x0, text, mask, key, objective=objective)
    np.testing.assert_allclose(shifted, 0.25, rtol=1e-4)


def test_loss_of_zero_predictor_has_the_known_expectation():
    zero = lambda params, x_t, t, *_: jnp.zeros_like(x_t)  # noqa: E731
    batch, c = 8192, 0.5
    x0 = jnp.full((batch, 4, 4, 1), c)
    text, mask = _text(batch)
    eps_loss, _ = diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(5), objective="eps")
    assert abs(float(eps_loss) - 1.0) < 0.02  # E[eps^2] = 1
    # v = alpha eps - sigma x0: E[v^2] = E_t[alpha^2] + c^2 E_t[sigma^2] = c^2 + (1 - c^2) E_t[alpha_bar(t)].
    t = (np.arange(100000) + 0.5) / 100000
    mean_alpha_bar = np.mean(1 / (1 + np.exp(-_np_cosine_log_snr(t))))
    expected = c**2 + (1 - c**2) * mean_alpha_bar
    v_loss, _ = diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(6), objective="v")
    assert abs(float(v_loss) - expected) < 0.02, (float(v_loss), expected)


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_cond_drop_prob_and_model_kwargs_reach_the_model(prob):
    seen = {}

    def apply_fn(params, x_t, t, text, text_mask, drop_text, *, lowres):
        seen["drop"] = np.asarray(drop_text)
        seen["lowres"] = lowres
        seen["t"] = np.asarray(t)
        return jnp.zeros_like(x_t)

    batch = 10000
    x0 = jnp.zeros((batch, 1, 1, 1))
    text, mask = _text(batch)
    diffusion.diffusion_loss(
        apply_fn, None, x0, text, mask, jax.random.key(7), cond_drop_prob=prob, model_kwargs={"lowres": "lr"}
    )
    assert seen["drop"].dtype == bool and abs(seen["drop"].mean() - prob) < 0.02
    assert seen["lowres"] == "lr"
    assert 0 <= seen["t"].min() and seen["t"].max() <= 1 and abs(seen["t"].mean() - 0.5) < 0.02


def test_loss_is_deterministic_in_the_key_and_rejects_bad_settings():
    zero = lambda params, x_t, t, *_: jnp.zeros_like(x_t)  # noqa: E731
    x0 = jnp.ones((4, 2, 2, 1))
    text, mask = _text(4)
    a, _ = diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(8), objective="v")
    b, _ = diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(8), objective="v")
    c, _ = diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(9), objective="v")
    assert float(a) == float(b) and float(a) != float(c)
    with pytest.raises(ValueError, match=r"'x0'.*eps, v"):
        diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(8), objective="x0")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        diffusion.diffusion_loss(zero, None, x0, text, mask, jax.random.key(8), cond_drop_prob=1.5)


# ------------------------------------------------------------------------------ guidance, thresholds


def test_guided_prediction():
    cond, uncond = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
    np.testing.assert_allclose(diffusion.guided_prediction(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(diffusion.guided_prediction(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(diffusion.guided_prediction(cond, uncond, 3.0), [2.0, 0.0])


def test_dynamic_threshold_against_numpy():
    x0 = np.random.default_rng(10).normal(scale=[[[[0.3]]], [[[2.0]]], [[[5.0]]]], size=(3, 8, 8, 3))
    x0 = x0.astype(np.float32)
    s = np.maximum(np.quantile(np.abs(x0.reshape(3, -1)).astype(np.float64), 0.9, axis=1), 1.0)
    expected = np.clip(x0, -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None]
    got = diffusion.dynamic_threshold(jnp.asarray(x0), 0.9)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], x0[0])  # s clamped to 1 and nothing beyond 1: untouched
    assert float(jnp.max(jnp.abs(got))) <= 1.0


def test_threshold_modes():
    x0 = jnp.array([[-3.0, -0.5, 0.5, 2.0]])
    np.testing.assert_array_equal(diffusion.threshold(x0, "none"), x0)
    np.testing.assert_array_equal(diffusion.threshold(x0, "static"), [[-1.0, -0.5, 0.5, 1.0]])
    np.testing.assert_allclose(diffusion.threshold(x0, "dynamic", 1.0), x0 / 3.0)
    with pytest.raises(ValueError, match=r"'clip'.*dynamic, static, none"):
        diffusion.threshold(x0, "clip")
    with pytest.raises(ValueError, match="percentile"):
        diffusion.threshold(x0, "dynamic", 99.5)


# ---------------------------------------------------------------------------------------- sampler

MU = np.array([0.5, -0.3, 0.2, 0.0], np.float32).reshape(2, 2, 1)
VAR = np.array([0.04, 0.25, 0.09, 0.16], np.float32).reshape(2, 2, 1)
TILE = (1, 4, 4, 1)  # every (mu, var) pixel is repeated 16 times per image: more samples for the same cost


def _gaussian_denoiser(objective, schedule="cosine"):
    """The exact E[x0 | x_t] for x0 ~ N(mu, diag(var)), returned as an eps or v prediction."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        mu, var = params
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, schedule)[:, None, None, None])
        x0 = mu + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mu)
        return diffusion.x0_to_pred(x0, x_t, alpha, sigma, objective)

    return apply_fn


def _np_sampler_moments(log_snr_fn, mu, var, steps):
    """Exact mean/variance of the discretised ancestral sampler on Gaussian data (linear-Gaussian recursion).

    Written in the DDPM form alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
    With finitely many steps the sampler under-disperses slightly (the posterior ignores Var[x0 | x_t]).
    """
    mean, variance = np.zeros_like(mu), np.ones_like(var)
    for i in range(steps):
        t, s = np.float64(1 - i / steps), np.float64(1 - (i + 1) / steps)
        a2_t, a2_s = (1 / (1 + np.exp(-np.clip(log_snr_fn(u), -20, 20))) for u in (t, s))
        a_t, a_s, s2_t, s2_s = np.sqrt(a2_t), np.sqrt(a2_s), 1 - a2_t, 1 - a2_s
        gain = a_t * var / (a2_t * var + s2_t)  # x0_hat = mu + gain (x_t - a_t mu)
        mean_x0, var_x0, cov = mu + gain * (mean - a_t * mu), gain**2 * variance, gain * variance
        if i == steps - 1:
            return mean_x0, var_x0
        a_ts = a_t / a_s
        s2_ts = s2_t - a_ts**2 * s2_s
        c_x, c_0 = a_ts * s2_s / s2_t, a_s * s2_ts / s2_t
        mean = c_x * mean + c_0 * mean_x0
        variance = c_x**2 * variance + c_0**2 * var_x0 + 2 * c_x * c_0 * cov + s2_ts * s2_s / s2_t


@pytest.mark.parametrize(
    "objective,schedule,reference",
    [("eps", "cosine", _np_cosine_log_snr), ("v", "cosine", _np_cosine_log_snr), ("v", "linear", _np_linear_log_snr)],
)
def test_sampler_recovers_gaussian_data(objective, schedule, reference):
    batch, steps = 2000, 100
    text, mask = _text(batch)
    params = (jnp.asarray(np.tile(MU, TILE[1:])), jnp.asarray(np.tile(VAR, TILE[1:])))
    x = diffusion.sample(
        _gaussian_denoiser(objective, schedule), params, text, mask, jax.random.key(11),
        shape=(batch, 8, 8, 1), steps=steps, schedule=schedule, objective=objective, thresholding="none",
    )  # fmt: skip
    x = np.asarray(x)
    assert x.dtype == np.float32 and x.shape == (batch, 8, 8, 1)
    pooled = x.reshape(batch, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, 1)  # 32000 per pixel
    want_mean, want_var = _np_sampler_moments(reference, MU.astype(np.float64), VAR.astype(np.float64), steps)
    np.testing.assert_allclose(pooled.mean(0), want_mean, atol=4 * np.sqrt(VAR.max() / len(pooled)))
    np.testing.assert_allclose(pooled.var(0), want_var, rtol=0.04)
    np.testing.assert_allclose(pooled.var(0), VAR, rtol=0.3)  # and the discretisation error is small


def test_sampler_guidance_doubles_the_batch_once_and_orders_cond_uncond():
    shapes = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text, *, lowres):
        # Predicts x0 = 0.5 * lowres with text and x0 = 0 without, as eps.
        shapes.append(x_t.shape)
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, "cosine")[:, None, None, None])
        x0 = jnp.where(drop_text, 0.0, 0.5 * lowres)[:, None, None, None] * jnp.ones_like(x_t)
        return diffusion.x0_to_pred(x0, x_t, alpha, sigma, "eps")

    text, mask = _text(3)
    lowres = np.array([1.0, 0.5, 0.2], np.float32)
    common = dict(shape=(3, 2, 2, 1), steps=4, model_kwargs={"lowres": jnp.asarray(lowres)})
    thresholded = np.array([1.0, 0.75, 0.3])  # only the first image exceeds 1: rescaled by its s = 1.5
    for mode, expected in [("none", 1.5 * lowres), ("dynamic", thresholded)]:
        x = diffusion.sample(apply_fn, None, text, mask, jax.random.key(0), guidance_scale=3.0, thresholding=mode,
                             **common)  # fmt: skip
        np.testing.assert_allclose(x, np.broadcast_to(expected[:, None, None, None], x.shape), rtol=1e-4)
    assert {s[0] for s in shapes} == {6}
    x = diffusion.sample(apply_fn, None, text, mask, jax.random.key(0), thresholding="none", **common)
    np.testing.assert_allclose(x, np.broadcast_to(0.5 * lowres[:, None, None, None], x.shape), rtol=1e-4)
    assert shapes[-1][0] == 3


def test_sampler_scale_one_equals_doubled_path_when_cond_equals_uncond():
    fn = _gaussian_denoiser("eps")
    params = (jnp.asarray(MU), jnp.asarray(VAR))
    text, mask = _text(16)
    run = lambda scale: diffusion.sample(  # noqa: E731
        fn, params, text, mask, jax.random.key(1), shape=(16, 2, 2, 1), steps=10, guidance_scale=scale
    )
    np.testing.assert_allclose(run(1.0), run(4.0), atol=1e-5)


def test_sampler_chunking_progress_determinism_and_no_retracing():
    traces = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        traces.append(1)
        return params * x_t

    text, mask = _text(2)
    run = lambda key, **kw: diffusion.sample(  # noqa: E731
        apply_fn, jnp.float32(0.3), text, mask, key, shape=(2, 4, 4, 2), steps=20, **kw
    )
    whole = run(jax.random.key(2))
    calls = []
    chunked = run(jax.random.key(2), chunk_size=7, progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(whole, chunked)
    assert calls == [(7, 20), (14, 20), (20, 20)]
    assert not np.allclose(whole, run(jax.random.key(3)))
    assert float(jnp.max(jnp.abs(whole))) <= 1.0
    traced = len(traces)
    assert traced <= 2
    run(jax.random.key(4), chunk_size=4)  # 5 chunks, another chunk size: same executable
    diffusion.sample(apply_fn, jnp.float32(0.5), text, mask, jax.random.key(5), shape=(2, 4, 4, 2), steps=9)
    assert len(traces) == traced


def test_sampler_rejects_bad_arguments():
    text, mask = _text(2)
    fn = lambda params, x_t, *_: x_t  # noqa: E731
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        diffusion.sample(fn, None, text, mask, jax.random.key(0), shape=(2, 4, 4, 3), steps=0)
    with pytest.raises(ValueError, match="chunk_size"):
        diffusion.sample(fn, None, text, mask, jax.random.key(0), shape=(2, 4, 4, 3), steps=3, chunk_size=0)
    with pytest.raises(ValueError, match="text batch 2"):
        diffusion.sample(fn, None, text, mask, jax.random.key(0), shape=(3, 4, 4, 3), steps=3)
    with pytest.raises(ValueError, match="'ddim'"):
        diffusion.sample(fn, None, text, mask, jax.random.key(0), shape=(2, 4, 4, 3), steps=3, thresholding="ddim")


def _per_example_apply(params, x, t, text, text_mask, drop_text):
    """A toy eps-model whose output depends on each example's own text and x only."""
    return 0.5 * x + params * text.mean(axis=(1, 2))[:, None, None, None]


def test_per_example_keys_make_each_image_independent_of_its_batch():
    from imagen_jax.diffusion import sample

    text = jnp.stack([jnp.full((3, 4), 0.3), jnp.full((3, 4), -0.7)])
    mask = jnp.ones((2, 3), bool)
    keys = jax.vmap(jax.random.key)(jnp.array([11, 12], jnp.uint32))
    kwargs = dict(shape=(2, 4, 4, 1), steps=6, guidance_scale=2.0, thresholding="none")
    both = sample(_per_example_apply, jnp.float32(1.0), text, mask, keys, **kwargs)
    kwargs["shape"] = (1, 4, 4, 1)
    alone = sample(_per_example_apply, jnp.float32(1.0), text[1:], mask[1:], keys[1:], **kwargs)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(alone[0]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(both[0]), np.asarray(both[1]))
    with pytest.raises(ValueError, match="one per example"):
        sample(_per_example_apply, jnp.float32(1.0), text, mask, keys[:1], **dict(kwargs, shape=(2, 4, 4, 1)))
