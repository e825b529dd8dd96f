"""DDPM, DDIM and DPM-Solver++(2M) sampling against the exact denoiser of Gaussian data.

For x0 ~ N(mu, S) the optimal denoiser E[x0 | x_t] is linear, so every deterministic sampler is an affine
map of its starting noise: the tests compare it with a float64 NumPy re-derivation, and measure each
sampler's exact output variance from two runs (noise 0 and noise 1) instead of by Monte Carlo.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.diffusion import solvers

MU = np.array([0.5, -0.3, 0.2, 0.0]).reshape(2, 2, 1)
VAR = np.array([0.04, 0.25, 0.09, 0.16]).reshape(2, 2, 1)
COSINE_S = 0.008


def _text(batch):
    return jnp.zeros((batch, 2, 4), jnp.float32), jnp.ones((batch, 2), bool)


@functools.cache
def _denoiser(objective, schedule="cosine"):
    """Exact E[x0 | x_t] for x0 ~ N(mu, diag(var)) (params = (mu, var)) as an eps or v prediction."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        mu, var = params
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, schedule)[:, None, None, None])
        x0 = mu + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mu)
        return diffusion.x0_to_pred(x0, x_t, alpha, sigma, objective)

    return apply_fn


def _params(tile=1):
    """(mu, var) as float32 images; tile > 1 repeats every pixel tile x tile times (more samples per image)."""
    return tuple(jnp.asarray(np.tile(a, (tile, tile, 1)), jnp.float32) for a in (MU, VAR))


def _sample(sampler, steps, *, batch=2, tile=1, objective="eps", schedule="cosine", key=0, **kwargs):
    text, mask = _text(batch)
    return diffusion.sample(
        _denoiser(objective, schedule), _params(tile), text, mask, jax.random.key(key),
        shape=(batch, 2 * tile, 2 * tile, 1), steps=steps, sampler=sampler, objective=objective,
        schedule=schedule, thresholding="none", **kwargs,
    )  # fmt: skip


def _exact_variance_error(sampler, steps):
    """max over pixels of |Var[output] / var - 1| for a deterministic sampler, from its affine map."""
    noise = jnp.stack([jnp.zeros((2, 2, 1)), jnp.ones((2, 2, 1))])
    out = np.asarray(_sample(sampler, steps, noise=noise), np.float64)
    gain = out[1] - out[0]
    # The mean (output at noise 0) is exact for samplers that start at t = 1; DPM-Solver++ starts at log-SNR -10
    # from N(0, I), leaving out the alpha = 0.0067 of signal there: its mean is off by ~0.2% of mu.
    np.testing.assert_allclose(out[0], MU, atol=1e-4 if sampler != "dpmpp_2m" else 2e-3)
    return float(np.max(np.abs(gain**2 / VAR - 1)))


def _pooled(x, tile):
    """[B, 2 tile, 2 tile, 1] -> [B tile^2, 2, 2, 1]: the tiled copies of each (mu, var) pixel as samples."""
    batch = x.shape[0]
    return np.asarray(x).reshape(batch, tile, 2, tile, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, 1)


# -------------------------------------------------------------------------------- float64 references


def _np_log_snr(t, schedule):
    if schedule == "cosine":
        return np.clip(2 * np.log(np.tan(0.5 * np.pi / (1 + COSINE_S) * (1 - t)) + 1e-300), -20, 20)
    return -np.log(np.expm1(1e-4 + 10 * t**2))


def _np_time_of_log_snr(lsnr, schedule):
    if schedule == "cosine":
        return 1 - np.arctan(np.exp(lsnr / 2)) * (1 + COSINE_S) / (0.5 * np.pi)
    return np.sqrt(np.maximum(np.log1p(np.exp(-lsnr)) - 1e-4, 0.0) / 10)


def _np_affine_map(sampler, steps, schedule):
    """(gain, offset) with output = gain * noise + offset, per pixel, for 'ddim' (eta 0) or 'dpmpp_2m'."""
    if sampler == "ddim":
        times = np.linspace(1, 0, steps + 1)
    else:
        lsnr = np.linspace(DPM_START, _np_log_snr(0.0, schedule), steps)  # the grid starts at log-SNR -10
        times = _np_time_of_log_snr(lsnr, schedule)
        times[-1] = 0.0 if steps > 1 else times[0]  # a single evaluation is the first one
    lsnrs = _np_log_snr(times, schedule)
    alphas, sigmas = np.sqrt(1 / (1 + np.exp(-lsnrs))), np.sqrt(1 / (1 + np.exp(lsnrs)))
    x, history = np.stack([np.ones_like(VAR), np.zeros_like(MU)]), None  # x_t = x[0] * noise + x[1]
    for i in range(steps):
        a, s = alphas[i], sigmas[i]
        k = a * VAR / (a**2 * VAR + s**2)
        x0 = k * x + np.stack([np.zeros_like(MU), MU - k * a * MU])  # x0_hat = mu + k (x_t - a mu)
        if i == steps - 1:
            return x0
        a_next, s_next = alphas[i + 1], sigmas[i + 1]
        if sampler == "ddim":  # x_s = a_s x0_hat + s_s eps_hat
            x = a_next * x0 + s_next * (x - a * x0) / s
            continue
        h = np.log(a_next / s_next) - np.log(a / s)
        d = x0
        if history is not None:  # D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i
            r = history[1] / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * history[0]
        x = s_next / s * x - a_next * np.expm1(-h) * d
        history = (x0, h)


DPM_START = -10.0  # where the DPM-Solver++ grid starts (solvers.DPM_START_LOG_SNR)

# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "sampler,schedule,objective",
    [("ddim", "cosine", "eps"), ("ddim", "cosine", "v"), ("dpmpp_2m", "cosine", "eps"), ("dpmpp_2m", "cosine", "v"),
     ("dpmpp_2m", "linear", "v")],
)  # fmt: skip
def test_deterministic_samplers_match_float64_reference(sampler, schedule, objective):
    noise = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))
    for steps in (1, 2, 7, 20):
        got = _sample(sampler, steps, objective=objective, schedule=schedule, noise=noise)
        gain, offset = _np_affine_map(sampler, steps, schedule)
        # x0 = (x - sigma eps) / alpha at t = 1 (alpha = 4.5e-5) loses 3 digits in float32; with 1 or 2 steps
        # (DPM-Solver++ then goes from t = 1 straight to t = 0) that x0 reaches the output undamped.
        atol = 2e-3 if steps <= 2 and objective == "eps" else 2e-4
        np.testing.assert_allclose(got, gain * np.asarray(noise, np.float64) + offset, atol=atol, err_msg=str(steps))


def test_dpmpp_grid_is_uniform_in_log_snr_from_minus_ten_with_exact_ends():
    grid = jax.jit(solvers.time_grid, static_argnums=(2, 3))
    times = grid(jnp.arange(9), jnp.int32(9), "dpmpp_2m", "cosine")
    assert float(times[-1]) == 0.0 and solvers.DPM_START_LOG_SNR == DPM_START == -10.0
    lsnr = np.asarray(diffusion.log_snr(times, "cosine"))
    np.testing.assert_allclose([lsnr[0], lsnr[-1]], [-10.0, _np_log_snr(0.0, "cosine")], atol=1e-4)
    np.testing.assert_allclose(lsnr, np.linspace(-10.0, lsnr[-1], 9), atol=1e-3)
    alphas = np.sqrt(1 / (1 + np.exp(-lsnr)))
    assert (alphas[1:] >= 0.01).all()  # no evaluation after the first where the signal is negligible
    # A start below the schedule's clamp starts at t = 1 exactly (the clamped log-SNR is flat there).
    times = grid(jnp.arange(9), jnp.int32(9), "dpmpp_2m", "cosine", -30.0)
    assert float(times[0]) == 1.0 and float(times[-1]) == 0.0
    # Near t = 1 the float32 spacing of t (6e-8) limits the log-SNR to ~5e-4.
    lsnr = np.asarray(diffusion.log_snr(times, "cosine"))
    np.testing.assert_allclose(lsnr, np.linspace(-20.0, lsnr[-1], 9), atol=1e-3)


@pytest.mark.parametrize("objective", diffusion.OBJECTIVES)
@pytest.mark.parametrize("sampler,steps", [("ddpm", 300), ("ddim", 150), ("dpmpp_2m", 25)])
def test_samplers_recover_gaussian_data(sampler, steps, objective):
    batch, tile = 1000, 4  # 16000 samples per (mu, var) pixel
    x = _sample(sampler, steps, batch=batch, tile=tile, objective=objective, key=2)
    assert x.dtype == jnp.float32 and x.shape == (batch, 8, 8, 1)
    pooled = _pooled(x, tile)
    np.testing.assert_allclose(pooled.mean(0), MU, atol=4 * np.sqrt(VAR.max() / len(pooled)))
    # Discretisation error of the variance (float64 reference): ddpm 0.057, ddim 0.048, dpmpp_2m 0.038.
    np.testing.assert_allclose(pooled.var(0), VAR, rtol=0.1)


def test_dpmpp_needs_five_times_fewer_steps_than_ddpm_and_ddim():
    dpmpp_error = _exact_variance_error("dpmpp_2m", 15)
    assert dpmpp_error < 0.05  # measured 0.045 (0.063 when the grid started at log-SNR -20 instead of -10)
    # With five times the model evaluations DDPM is still off by 0.175 (it needs ~250 steps to reach 0.063)
    # and DDIM by 0.091 (~125 steps).
    batch, tile = 1000, 4
    ddpm_error = float(np.max(np.abs(_pooled(_sample("ddpm", 75, batch=batch, tile=tile), tile).var(0) / VAR - 1)))
    assert ddpm_error > 2 * dpmpp_error, (ddpm_error, dpmpp_error)
    assert _exact_variance_error("ddim", 75) > 1.3 * dpmpp_error


@functools.cache
def _correlated_denoiser():
    """Exact E[x0 | x_t] = mu + alpha S (alpha^2 S + sigma^2 I)^-1 (x_t - alpha mu) for pixel pairs [..., 2]."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        mu, cov = params
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, "cosine"))
        gain = (
            alpha[:, None, None]
            * cov
            @ jnp.linalg.inv(alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * jnp.eye(2))
        )
        x0 = mu + jnp.einsum("bij,bhwj->bhwi", gain, x_t - alpha[:, None, None, None] * mu)
        return diffusion.x0_to_pred(x0, x_t, alpha[:, None, None, None], sigma[:, None, None, None], "eps")

    return apply_fn


@pytest.mark.parametrize("sampler,steps", [("ddpm", 200), ("ddim", 150), ("dpmpp_2m", 25)])
def test_samplers_recover_a_correlated_gaussian(sampler, steps):
    mu, cov = np.array([0.3, -0.2]), np.array([[0.25, 0.15], [0.15, 0.16]])  # correlation 0.75
    batch = 1000
    text, mask = _text(batch)
    x = diffusion.sample(
        _correlated_denoiser(), (jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32)), text, mask,
        jax.random.key(3), shape=(batch, 8, 1, 2), steps=steps, sampler=sampler, thresholding="none",
    )  # fmt: skip
    pairs = np.asarray(x, np.float64).reshape(-1, 2)  # 8000 samples
    np.testing.assert_allclose(pairs.mean(0), mu, atol=0.015)
    np.testing.assert_allclose(np.cov(pairs.T), cov, atol=0.012)


def test_ddim_with_eta_one_is_the_ancestral_sampler():
    ddpm = _sample("ddpm", 20, key=4)
    np.testing.assert_allclose(_sample("ddim", 20, key=4, eta=1.0), ddpm, atol=1e-5)
    assert not np.allclose(_sample("ddim", 20, key=4, eta=0.5), ddpm, atol=1e-2)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_depend_only_on_the_noise(sampler):
    noise = jax.random.normal(jax.random.key(5), (2, 2, 2, 1))
    whole = _sample(sampler, 12, key=6, noise=noise)
    np.testing.assert_array_equal(_sample(sampler, 12, key=7, noise=noise, chunk_size=5), whole)
    assert not np.allclose(_sample(sampler, 12, key=7), whole)  # the key draws other noise


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_guidance_doubles_the_batch_once_and_orders_cond_uncond(sampler, eta):
    shapes = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text, *, lowres):
        # Predicts x0 = 0.5 * lowres with text and x0 = 0 without, as v.
        shapes.append(x_t.shape)
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, "cosine")[:, None, None, None])
        x0 = jnp.where(drop_text, 0.0, 0.5 * lowres)[:, None, None, None] * jnp.ones_like(x_t)
        return diffusion.x0_to_pred(x0, x_t, alpha, sigma, "v")

    text, mask = _text(3)
    lowres = np.array([1.0, 0.5, 0.2], np.float32)
    x = diffusion.sample(
        apply_fn, None, text, mask, jax.random.key(0), shape=(3, 2, 2, 1), steps=5, guidance_scale=3.0,
        objective="v", sampler=sampler, eta=eta, model_kwargs={"lowres": jnp.asarray(lowres)},
    )  # fmt: skip
    # Guided x0 = 1.5 lowres; dynamic thresholding rescales the first image (s = 1.5) only.
    np.testing.assert_allclose(x, np.broadcast_to(np.reshape([1.0, 0.75, 0.3], (3, 1, 1, 1)), x.shape), rtol=1e-4)
    assert {s[0] for s in shapes} == {6}


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.7), ("dpmpp_2m", 0.0)])
def test_chunking_progress_determinism_and_no_retracing(sampler, eta):
    traces = []

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        traces.append(1)
        return params * x_t

    text, mask = _text(2)
    run = functools.partial(
        diffusion.sample, apply_fn, jnp.float32(0.3), text, mask, shape=(2, 4, 4, 2), steps=20, sampler=sampler,
        eta=eta,
    )  # fmt: skip
    whole = run(jax.random.key(2))
    calls = []
    chunked = run(jax.random.key(2), chunk_size=7, progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(whole, chunked)
    assert calls == [(7, 20), (14, 20), (20, 20)]
    # One step per chunk: DPM-Solver++'s previous x0 must survive every chunk boundary.
    np.testing.assert_array_equal(run(jax.random.key(2), chunk_size=1), whole)
    assert not np.allclose(whole, run(jax.random.key(3)))
    assert float(jnp.max(jnp.abs(whole))) <= 1.0
    traced = len(traces)
    assert traced <= 2
    run(jax.random.key(4), chunk_size=4, steps=9)  # other chunk size and step count: same executable
    assert len(traces) == traced


def test_rejects_bad_sampler_eta_and_noise():
    text, mask = _text(2)
    run = functools.partial(diffusion.sample, _denoiser("eps"), _params(), text, mask, jax.random.key(0),
                            shape=(2, 2, 2, 1), steps=3)  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; valid samplers: ddpm, ddim, dpmpp_2m"):
        run(sampler="euler")
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"eta must be in \[0, 1\].*got {eta}"):
            run(sampler="ddim", eta=eta)
    with pytest.raises(ValueError, match=r"eta=0.5 only applies to sampler 'ddim', not 'dpmpp_2m'"):
        run(sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 2, 2\), expected the sample shape \(2, 2, 2, 1\)"):
        run(noise=jnp.zeros((2, 2, 2)))
