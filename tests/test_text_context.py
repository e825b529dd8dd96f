"""The U-Nets split for sampling (models/text_context.py, diffusion/denoiser.py): the text conditioning computed
once (keys and values of every cross-attention included), then `denoise` per step, gives what the whole model
gives, for both U-Nets, conditional rows, null-text rows and whole guided sampling runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax import diffusion
from imagen_jax.flax_settings import init_rngs
from imagen_jax.models import build_sr_unet, build_unet
from imagen_jax.stage.model import make_apply_fn, make_denoiser
from tests import test_efficient_unet, test_unet
from tests.random_params import random_state

IMAGE, TEXT_DIM, LEN, BATCH = 16, 8, 5, 3
KINDS = ("unet", "efficient_unet")


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    """(kind, graphdef, random params) of a tiny U-Net of each kind (cross-attention at one or more levels)."""
    if request.param == "unet":
        build, cfg = build_unet, dict(test_unet.TINY, dropout=0.0, attn_resolutions=(16, 8))
    else:
        build, cfg = build_sr_unet, dict(test_efficient_unet.TINY, dropout=0.0)
    abstract = nnx.eval_shape(lambda: build(cfg, image_size=IMAGE, text_dim=TEXT_DIM, rngs=init_rngs(0)))
    graphdef, state = nnx.split(abstract)
    return request.param, graphdef, random_state(state)


def _inputs(kind, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, IMAGE, IMAGE, 3)), jnp.float32)
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    text = jnp.asarray(rng.normal(size=(BATCH, LEN, TEXT_DIM)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    kwargs = {}
    if kind == "efficient_unet":
        lowres = rng.uniform(-1, 1, size=(BATCH, IMAGE // 2, IMAGE // 2, 3))
        kwargs = {"lowres": jnp.asarray(lowres, jnp.float32), "lowres_t": jnp.asarray([0.2, 0.5, 0.1], jnp.float32)}
    return x, t, text, mask, kwargs


def test_precomputed_context_gives_the_whole_models_prediction(model):
    kind, graphdef, params = model
    x, t, text, mask, kwargs = _inputs(kind)
    drop = jnp.asarray([False, True, False])
    fused = jax.jit(make_apply_fn(graphdef))(params, x, t, text, mask, drop, **kwargs)

    @jax.jit
    def split(params, x, t, text, mask, drop, kwargs):
        model = nnx.merge(graphdef, params)
        context = model.text_context(text, mask, drop, precompute=True)
        assert context.tokens is None and len(context.keys_values) == len(model.blocks_in_call_order())
        assert any(kv is not None for kv in context.keys_values)
        return model.denoise(x, t, context, **kwargs)

    np.testing.assert_allclose(split(params, x, t, text, mask, drop, kwargs), fused, rtol=1e-5, atol=1e-5)


def test_null_context_is_the_dropped_text_without_reading_the_text(model):
    kind, graphdef, params = model
    x, t, text, mask, kwargs = _inputs(kind)
    denoiser = make_denoiser(graphdef)
    null = jax.jit(denoiser.null_condition)(params, text, mask)
    assert null.mask.shape == (BATCH, LEN) and null.pooled.shape[0] == BATCH
    unread = jax.jit(denoiser.null_condition)(params, jnp.full_like(text, jnp.nan), mask)
    for a, b in zip(jax.tree.leaves(null), jax.tree.leaves(unread), strict=True):
        np.testing.assert_array_equal(a, b)
    dropped = jax.jit(make_apply_fn(graphdef))(params, x, t, text, mask, jnp.ones((BATCH,), bool), **kwargs)
    pred = jax.jit(denoiser.denoise)(params, x, t, null, **kwargs)
    np.testing.assert_allclose(pred, dropped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,guidance_scale", [("ddpm", 3.0), ("ddim", 1.0)])
def test_split_sampling_draws_the_images_of_the_whole_model(model, sampler, guidance_scale):
    kind, graphdef, params = model
    _, _, text, mask, kwargs = _inputs(kind, seed=1)
    common = dict(
        shape=(BATCH, IMAGE, IMAGE, 3), steps=4, sampler=sampler, guidance_scale=guidance_scale, objective="v",
        model_kwargs=kwargs,
    )  # fmt: skip
    split = diffusion.sample(make_denoiser(graphdef), params, text, mask, jax.random.key(3), **common)
    whole = diffusion.sample(make_apply_fn(graphdef), params, text, mask, jax.random.key(3), **common)
    assert float(jnp.std(split)) > 0.05
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-5)
