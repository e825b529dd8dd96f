"""Inpainting (with RePaint resampling), image-to-image and the guidance options, on exact Gaussian denoisers.

For x0 ~ N(mu, C) the optimal denoiser is linear, and so is the answer inpainting should give: the kept pixels
fix the regenerated ones' distribution to the Gaussian conditional. The tests sample that and compare.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.diffusion import editing

# Two pixels of one image, correlated: x0 = [a, b] ~ N(MU, COV); inpainting regenerates a and keeps b.
MU = np.array([0.2, -0.1])
COV = np.array([[0.16, 0.12], [0.12, 0.16]])  # correlation 0.75


def _text(batch):
    return jnp.zeros((batch, 2, 4), jnp.float32), jnp.ones((batch, 2), bool)


@functools.cache
def _pair_denoiser():
    """Exact E[x0 | x_t] for x_t [B, 2, 1, 1] (the two pixels) as an eps prediction; drop_text shifts the mean
    by 0.3, so guidance has something to amplify."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text):
        mu, cov = params
        alpha, sigma = diffusion.alpha_sigma(diffusion.log_snr(t, "cosine"))
        mu = mu + 0.3 * drop_text[:, None]
        gain = (
            alpha[:, None, None]
            * cov
            @ jnp.linalg.inv(alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * jnp.eye(2))
        )
        flat = x_t.reshape(x_t.shape[0], 2)
        x0 = mu + jnp.einsum("bij,bj->bi", gain, flat - alpha[:, None] * mu)
        x0 = x0.reshape(x_t.shape)
        a, s = alpha[:, None, None, None], sigma[:, None, None, None]
        return diffusion.x0_to_pred(x0, x_t, a, s, "eps")

    return apply_fn


def _sample(batch, key=0, **kwargs):
    text, mask = _text(batch)
    params = (jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32))
    kwargs.setdefault("thresholding", "none")
    return diffusion.sample(_pair_denoiser(), params, text, mask, jax.random.key(key), shape=(batch, 2, 1, 1), **kwargs)


def _inpaint(batch, known, sampler="ddpm", steps=50, **kwargs):
    image = np.zeros((batch, 2, 1, 1), np.float32)
    image[:, 1] = known
    mask = np.zeros((batch, 2, 1, 1), np.float32)
    mask[:, 0] = 1.0  # regenerate pixel a
    return np.asarray(
        _sample(batch, sampler=sampler, steps=steps, init_image=jnp.asarray(image), mask=jnp.asarray(mask), **kwargs)
    )


def test_inpainting_keeps_pixels_exactly_and_repaint_fills_from_the_conditional():
    known = MU[1] + 2.0 * np.sqrt(COV[1, 1])  # an atypical kept pixel: plain replacement lags behind it
    want_mean = MU[0] + COV[0, 1] / COV[1, 1] * (known - MU[1])
    plain = _inpaint(2000, known)
    repaint = _inpaint(2000, known, resample=10, jump_length=1)
    for out in (plain, repaint):
        np.testing.assert_array_equal(out[:, 1], np.float32(known))  # kept: the input itself
    plain_error, repaint_error = (abs(out[:, 0].mean() - want_mean) for out in (plain, repaint))
    # Plain replacement lags behind the kept pixel (measured: mean 0.546 for 0.8); resampling mostly repairs it
    # (0.748): the seam RePaint repairs, seen here as the regenerated pixel's bias.
    assert plain_error > 0.15 and repaint_error < 0.3 * plain_error, (plain_error, repaint_error, want_mean)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_inpaint_and_resample(sampler):
    known = MU[1] + 1.0
    want_mean = MU[0] + COV[0, 1] / COV[1, 1] * (known - MU[1])
    plain, repaint = (_inpaint(500, known, sampler=sampler, steps=20, resample=r) for r in (1, 5))
    for out in (plain, repaint):
        np.testing.assert_array_equal(out[:, 1], np.float32(known))
    # measured: mean 0.52 plain, 0.76 (ddim) and 0.79 (dpmpp_2m) resampled, for 0.95
    plain_error, repaint_error = (abs(out[:, 0].mean() - want_mean) for out in (plain, repaint))
    assert plain_error > 0.3 and repaint_error < 0.6 * plain_error, (plain_error, repaint_error)


def test_repaint_order_repeats_each_block_and_visits_the_last_step_once():
    order = editing.evaluation_order(7, first=1, resample=3, jump_length=2)
    assert order.tolist() == [1, 1, 1, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4, 5, 6]  # blocks counted back from the end
    assert editing.evaluation_order(4).tolist() == [0, 1, 2, 3]
    calls = []
    _inpaint(2, 0.0, steps=7, resample=3, jump_length=2, progress=lambda d, t: calls.append((d, t)), chunk_size=5)
    visits = len(editing.evaluation_order(7, 0, 3, 2))
    assert visits == 19 and calls[-1] == (visits, visits)  # progress counts the evaluations that run


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_image_to_image_ends_are_the_input_and_text_to_image(sampler):
    image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 2, 1, 1)), jnp.float32)
    run = functools.partial(_sample, 3, key=5, sampler=sampler, steps=20)
    np.testing.assert_array_equal(run(init_image=image, strength=0.0), image)
    np.testing.assert_array_equal(run(init_image=image, strength=1.0), run())
    # In between, the input decides more the less is regenerated.
    distance = [float(jnp.mean(jnp.abs(run(init_image=image, strength=s) - image))) for s in (0.1, 0.5, 0.9)]
    assert distance[0] < distance[1] < distance[2], distance
    assert distance[0] < 0.25  # two of 20 evaluations: a small pull towards the data's mean


def test_image_to_image_runs_the_last_evaluations_from_the_noised_input():
    """DDIM from strength S: the same as a run whose noise is the input noised to the first evaluation's time."""
    image = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 2, 1, 1)), jnp.float32)
    calls = []
    out = _sample(
        2, key=3, sampler="ddim", steps=10, init_image=image, strength=0.35, progress=lambda d, t: calls.append((d, t))
    )
    assert editing.first_evaluation(10, 0.35) == 7 and calls == [(3, 3)]
    assert not np.allclose(out, image, atol=1e-3)


def test_guidance_interval_and_rescale_off_are_plain_guidance_exactly():
    run = functools.partial(_sample, 4, key=2, sampler="ddim", steps=12, guidance_scale=4.0)
    plain = run()
    np.testing.assert_array_equal(run(guidance_interval=(-np.inf, np.inf)), plain)
    np.testing.assert_array_equal(run(guidance_interval=(-30.0, 30.0)), plain)  # covers every step's log-SNR
    np.testing.assert_array_equal(run(guidance_rescale=0.0), plain)
    # An interval no step falls in is the conditional model alone (guidance 1); a partial one lies in between.
    unguided = _sample(4, key=2, sampler="ddim", steps=12)
    np.testing.assert_allclose(run(guidance_interval=(25.0, 30.0)), unguided, atol=1e-5)
    partial = run(guidance_interval=(-2.0, 2.0))
    assert not np.allclose(partial, plain, atol=1e-3) and not np.allclose(partial, unguided, atol=1e-3)
    assert not np.allclose(run(guidance_rescale=0.7), plain, atol=1e-3)


def test_guidance_rescale_matches_the_papers_formula():
    rng = np.random.default_rng(0)
    cond, uncond = (rng.normal(size=(3, 4, 4, 2)).astype(np.float32) for _ in range(2))
    guided = uncond + 5.0 * (cond - uncond)
    phi = 0.7
    ratio = cond.std(axis=(1, 2, 3), keepdims=True) / guided.std(axis=(1, 2, 3), keepdims=True)
    want = phi * guided * ratio + (1 - phi) * guided
    got = diffusion.guidance.rescaled_guidance(jnp.asarray(guided), jnp.asarray(cond), phi)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        jnp.std(diffusion.guidance.rescaled_guidance(guided, cond, 1.0)[0]), cond[0].std(), rtol=1e-5
    )


def test_editing_arguments_are_checked():
    image = jnp.zeros((2, 2, 1, 1))
    mask = jnp.ones((2, 2, 1, 1))
    run = functools.partial(_sample, 2, steps=5)
    with pytest.raises(ValueError, match="strength must be in"):
        run(init_image=image, strength=1.5)
    with pytest.raises(ValueError, match="mask needs the init_image"):
        run(mask=mask)
    with pytest.raises(ValueError, match="mask has shape"):
        run(init_image=image, mask=jnp.ones((2, 2, 2, 1)))
    with pytest.raises(ValueError, match="needs a mask"):
        run(init_image=image, resample=3)
    with pytest.raises(ValueError, match="inpaint_jump must be an integer"):
        run(init_image=image, mask=mask, resample=2, jump_length=0)
    with pytest.raises(ValueError, match="guidance interval"):
        run(guidance_interval=(2.0, -2.0))
    with pytest.raises(ValueError, match="guidance rescale"):
        run(guidance_rescale=-0.1)


def test_sample_py_edit_files_are_checked_before_loading(tmp_path):
    from PIL import Image

    from imagen_jax.errors import UsageError
    from imagen_jax.sample_files import Edit
    from imagen_jax.tools import eval_edit

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(tmp_path / "mask.png")
    (tmp_path / "notes.png").write_text("not an image")
    image, mask, notes = (str(tmp_path / n) for n in ("in.png", "mask.png", "notes.png"))
    with pytest.raises(UsageError, match=r"--mask '.*mask.png' is 16x8 but --init_image '.*in.png' is 16x16"):
        Edit(init_image=image, mask=mask).check(1)
    with pytest.raises(UsageError, match=r"--init_image '.*notes.png' is not a readable image"):
        Edit(init_image=notes).check(1)
    with pytest.raises(UsageError, match="--inpaint_resample 3 \\(RePaint\\) needs --mask"):
        Edit(init_image=image, inpaint_resample=3).check(1)
    with pytest.raises(UsageError, match="--strength 0.5 \\(image-to-image\\) needs --init_image"):
        Edit(strengths=[0.5]).check(1)
    with pytest.raises(UsageError, match="--guidance_rescale has 1 values for 2 stages"):
        Edit(guidance_rescales=[0.5]).check(2)
    # eval_edit's seam error: the squared step across the border on background rows (a shape's edge excluded)
    flat = np.full((1, 8, 8, 3), 40, np.uint8)
    seam = flat.copy()
    seam[:, :, 4:] = 50
    seam[:, 2:4, 2:6] = 220  # a shape across the border: its rows do not count
    assert eval_edit.seam_error(flat) == 0.0 and eval_edit.seam_error(seam) == 100.0
    assert eval_edit.half_mask(4, "left")[:, :2].all() and not eval_edit.half_mask(4, "left")[:, 2:].any()
