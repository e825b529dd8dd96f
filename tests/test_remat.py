"""Rematerialisation changes what the backward pass keeps, never what it computes: every policy gives the
gradients of no remat (float32), for the base U-Net and the Efficient U-Net, and the policies that should
recompute really put checkpoints in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax import config as config_lib
from imagen_jax.diffusion import diffusion_loss
from imagen_jax.models.layers import REMAT_POLICIES
from imagen_jax.stage.model import build_model, make_apply_fn
from tests.jaxprs import equations
from tests.random_params import random_state

TEXT_DIM = 16
REMAT_PRIMITIVES = {"remat2", "checkpoint", "remat"}  # what jax.checkpoint is called in a jaxpr, across versions


def _config(kind: str, remat: str):
    c = config_lib.load_config_file("configs/demo.py" if kind == "base" else "configs/demo_sr.py")
    c.model.dim, c.model.head_dim, c.train.remat = 16, 8, remat
    if kind == "base":
        c.data.image_size, c.model.channel_mults, c.model.attn_resolutions = 8, (1, 2), (4,)
    else:
        c.data.image_size, c.model.lowres_size, c.model.self_attention = 8, 4, True
    return c


def _loss(kind: str, remat: str):
    """(the diffusion loss of random parameters on a fixed batch, the parameters, the model) for the tiny `kind`."""
    config = _config(kind, remat)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, TEXT_DIM)))
    params = nnx.to_pure_dict(random_state(abstract))
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(4, 6, TEXT_DIM)), jnp.float32)
    mask = jnp.asarray([[True] * 6, [True] * 3 + [False] * 3] * 2)
    kwargs = {}
    if kind == "sr":
        kwargs = {"lowres": jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 3)), jnp.float32), "lowres_t": jnp.full((4,), 0.3)}

    def loss(p):
        return diffusion_loss(make_apply_fn(graphdef), p, x0, text, mask, jax.random.key(0), model_kwargs=kwargs)[0]

    return loss, params, nnx.merge(graphdef, abstract)


def _loss_and_grads(kind: str, remat: str):
    loss, params, _ = _loss(kind, remat)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    return value_and_grad(params), _primitives(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)


def _primitives(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, nested ones included."""
    return {eqn.primitive.name for eqn in equations(jaxpr)}


@pytest.mark.parametrize(
    "kind, policies",
    [("base", ["block"]), pytest.param("base", [p for p in REMAT_POLICIES if p not in ("none", "block")],
     marks=pytest.mark.slow), pytest.param("sr", [p for p in REMAT_POLICIES if p != "none"], marks=pytest.mark.slow)],
)  # fmt: skip
def test_every_remat_policy_gives_the_same_gradients(kind, policies):
    (loss, grads), primitives = _loss_and_grads(kind, "none")
    assert not primitives & REMAT_PRIMITIVES
    for policy in policies:
        (loss_r, grads_r), primitives_r = _loss_and_grads(kind, policy)
        assert primitives_r & REMAT_PRIMITIVES, policy  # the program really recomputes
        np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads)


def _costs(policy: str) -> tuple[float, float, int, nnx.Module]:
    """(FLOPs of the loss's gradient, of the loss, checkpointed regions of the loss, the model) for the tiny base."""
    loss, params, model = _loss("base", policy)

    def flops(fn) -> float:
        analysis = jax.jit(fn).lower(params).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    regions = sum(eqn.primitive.name in REMAT_PRIMITIVES for eqn in equations(jax.make_jaxpr(loss)(params).jaxpr))
    return flops(jax.grad(loss)), flops(loss), regions, model


@pytest.mark.slow  # four compiles of the tiny base U-Net: ~30 s
def test_block_save_dots_keeps_convolutions_and_block_covers_the_middle_and_resamplers():
    """'block_save_dots' keeps the convolutions' outputs too (jax's dots policy alone saw none of them, and the
    backward pass recomputed half the forward's FLOPs); 'block' rematerialises the middle block's second residual
    block and the resampling layers as well as the blocks (issue 29, point 3)."""
    none, forward, _, _ = _costs("none")
    block, _, regions, model = _costs("block")
    save_dots = _costs("block_save_dots")[0]
    assert regions == len(model.blocks_in_call_order()) + 1 + len(model.downsamples) + len(
        model.upsamples
    )  # 1: the middle's res
    recomputed = {"block": (block - none) / forward, "block_save_dots": (save_dots - none) / forward}
    assert recomputed["block"] > 0.6, recomputed  # (0.635 here; 0.598 without the middle and the resamplers)
    assert recomputed["block_save_dots"] < 0.15, recomputed  # (0.074 here; 0.517 with matmul outputs alone kept)
