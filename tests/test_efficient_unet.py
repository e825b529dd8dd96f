"""Tests for the super-resolution Efficient U-Net (imagen_jax.models.efficient_unet)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.config import load_config_file
from imagen_jax.flax_settings import init_rngs
from imagen_jax.models import EfficientUNet, build_sr_unet, build_unet, upsample_lowres
from tests.jaxprs import equations
from tests.random_params import random_state

TINY = dict(
    kind="efficient_unet",
    dim=16,
    channel_mults=(1, 2),
    num_res_blocks=(2, 1),
    self_attention=True,
    cross_attention=True,
    ffn_mult=2,
    head_dim=8,
    dropout=0.1,
    in_channels=3,
    out_channels=3,
    lowres_size=8,
)
IMAGE, TEXT_DIM, LEN, BATCH = 16, 8, 5, 2
VOCABULARY = {"conv_h", "conv_w", "channels_in", "channels_out", "inner", "text_embed", None}


def _abstract(cfg=TINY, image_size=IMAGE, text_dim=TEXT_DIM, dtype=jnp.float32) -> EfficientUNet:
    return nnx.eval_shape(
        lambda: build_sr_unet(cfg, image_size=image_size, text_dim=text_dim, rngs=init_rngs(0), dtype=dtype)
    )


def _count(model) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _apply_fn(graphdef):
    def apply(state, x, t, text, mask, lowres, lowres_t, drop=None, key=None):
        model = nnx.merge(graphdef, state)
        return model(x, t, text, mask, drop, key, lowres=lowres, lowres_t=lowres_t)

    return apply


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, random params, jitted apply) of the tiny float32 model: the train-step pattern."""
    graphdef, abstract_state = nnx.split(_abstract())
    return graphdef, random_state(abstract_state), jax.jit(_apply_fn(graphdef))


def _inputs(size=IMAGE, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, size, size, 3)), jnp.float32)
    t = jnp.asarray([0.1, 0.7], jnp.float32)
    text = jnp.asarray(rng.normal(size=(BATCH, LEN, TEXT_DIM)), jnp.float32)
    mask = jnp.asarray([[True, True, True, False, False], [True, False, False, False, False]])
    lowres = jnp.asarray(rng.uniform(-1, 1, size=(BATCH, size // 2, size // 2, 3)), jnp.float32)
    lowres_t = jnp.asarray([0.2, 0.5], jnp.float32)
    return x, t, text, mask, lowres, lowres_t


def _differs(a, b) -> bool:
    return float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_same_params_run_at_two_image_sizes(tiny):
    """Fully convolutional: the parameters built for 16x16 run at 32x32 (e.g. 256 crops -> 1024)."""
    _, state, apply = tiny
    for size in (IMAGE, 2 * IMAGE):
        out = apply(state, *_inputs(size))
        assert out.shape == (BATCH, size, size, 3) and out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-2


def test_lowres_and_its_noise_level_condition_the_output(tiny):
    _, state, apply = tiny
    x, t, text, mask, lowres, lowres_t = _inputs()
    base = apply(state, x, t, text, mask, lowres, lowres_t)
    np.testing.assert_array_equal(base, apply(state, x, t, text, mask, lowres, lowres_t))
    other_lowres = apply(state, x, t, text, mask, -lowres, lowres_t)
    other_level = apply(state, x, t, text, mask, lowres, jnp.asarray([0.9, 0.0]))
    for changed in (other_lowres, other_level):
        assert _differs(changed[0], base[0]) and _differs(changed[1], base[1])


def test_dropped_text_is_ignored_and_kept_text_matters(tiny):
    _, state, apply = tiny
    x, t, text, mask, lowres, lowres_t = _inputs()
    drop = jnp.asarray([True, False])
    a = apply(state, x, t, text, mask, lowres, lowres_t, drop)
    b = apply(state, x, t, text + 1.0, jnp.ones_like(mask), lowres, lowres_t, drop)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert _differs(a[1], b[1])
    assert _differs(a[0], apply(state, x, t, text, mask, lowres, lowres_t)[0])


def test_dropout_key(tiny):
    _, state, apply = tiny
    inputs = _inputs()
    base = apply(state, *inputs)
    k1 = apply(state, *inputs, None, jax.random.key(1))
    assert _differs(k1, base) and _differs(k1, apply(state, *inputs, None, jax.random.key(2)))
    np.testing.assert_array_equal(k1, apply(state, *inputs, None, jax.random.key(1)))


def test_no_residual_block_runs_at_full_resolution(tiny):
    """The efficient ordering: at full resolution only the input conv, the last upsample conv and
    the output conv run, however many res blocks the levels have."""
    graphdef, state, _ = tiny
    jaxpr = jax.make_jaxpr(_apply_fn(graphdef))(state, *_inputs())
    convs = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    full = [e for e in convs if e.outvars[0].aval.shape[1] == IMAGE]
    assert len(convs) > 10 and len(full) == 3


def test_attention_only_at_lowest_level_and_self_attention_optional():
    def paths(cfg):
        params = nnx.state(_abstract(cfg), nnx.Param)
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]

    with_self = paths(TINY)
    # Lowest level = down[1] and up[0] (one block each way), each with all three layers.
    for layer in ("self_attn", "cross_attn", "ffn"):
        hits = {p.split(f"['{layer}']")[0] for p in with_self if layer in p}
        assert hits == {"['down'][1][0]", "['up'][0][0]"}, (layer, hits)

    without = paths({**TINY, "self_attention": False, "ffn_mult": 0})
    assert not any("self_attn" in p or "ffn" in p for p in without)
    assert sum("cross_attn" in p for p in without) == sum("cross_attn" in p for p in with_self)
    no_attention = {**TINY, "cross_attention": False, "self_attention": False}
    assert not any("attn" in p for p in paths(no_attention))


def test_every_param_is_annotated_float32():
    params = nnx.state(_abstract(dtype=jnp.bfloat16), nnx.Param)
    variables = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert len(variables) > 50
    for var in variables:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, (var, names)
        assert set(names) <= VOCABULARY, names
        assert var.dtype == jnp.float32
    text_kernel = params["text_proj"]["kernel"]
    assert text_kernel.get_metadata()["out_sharding"] == ("text_embed", "channels_out")


def test_bfloat16_compute_close_to_float32(tiny):
    _, state, apply = tiny
    inputs = _inputs()
    out32 = apply(state, *inputs)
    graphdef16, _ = nnx.split(_abstract(dtype=jnp.bfloat16))
    apply16 = _apply_fn(graphdef16)
    out16 = jax.jit(apply16)(state, *inputs)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.1, rel
    convs = [
        e
        for e in equations(jax.make_jaxpr(apply16)(state, *inputs).jaxpr)
        if e.primitive.name == "conv_general_dilated"
    ]
    # every convolution in bfloat16 but the output layer's, in float32 (issue 29, point 6; as unet.py's)
    assert len(convs) > 2 and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs[:-1])
    assert convs[-1].invars[0].aval.dtype == convs[-1].invars[1].aval.dtype == jnp.float32


def test_gradients_under_jit(tiny):
    """The train step's pattern: value_and_grad over merged (graphdef, params) inside jax.jit."""
    graphdef, state, _ = tiny
    x, t, text, mask, lowres, lowres_t = _inputs()
    apply = _apply_fn(graphdef)

    @jax.jit
    def loss_and_grad(state):
        def loss(s):
            out = apply(s, x, t, text, mask, lowres, lowres_t, jnp.asarray([True, False]))
            return jnp.mean(jnp.square(out - x))

        return jax.value_and_grad(loss)(state)

    loss, grads = loss_and_grad(state)
    assert bool(jnp.isfinite(loss))
    for name in ("out_conv", "null_text", "text_proj", "time_embed", "lowres_time_embed"):
        assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name])) > 0, name


def test_real_init_zeroes_residual_branches_and_output():
    """build_sr_unet's own init: every residual branch (res blocks, attention, feed-forward) and
    the output conv start at zero, so the model starts as a zero prediction; the rest is random."""
    # Jitted init (one compile, rbg keys: both much cheaper on CPU than eager threefry init).
    rngs = lambda: init_rngs(jax.random.key(0, impl="rbg"))  # noqa: E731
    params = jax.jit(
        lambda: nnx.state(build_sr_unet(TINY, image_size=IMAGE, text_dim=TEXT_DIM, rngs=rngs()), nnx.Param)
    )()
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    branch_outputs = ("conv2']['kernel", "out']['kernel", "fc2']['kernel", "out_conv")
    zero = [k for k in flat if any(n in k for n in branch_outputs)]
    zero = [k for k in zero if "text_pool" not in k and "time_embed" not in k]
    # 6 res blocks; self-attn, cross-attn and FFN in the 2 lowest-level blocks; out_conv kernel
    # and bias.
    assert len(zero) == 6 + 3 * 2 + 2, zero
    for key in zero:
        np.testing.assert_array_equal(flat[key], 0.0, err_msg=key)
    for key in ("['input_conv']['kernel'].value", "['lowres_time_embed']['fc2']['kernel'].value"):
        assert float(jnp.std(flat[key])) > 0.02, key


def test_upsample_lowres_shape_constant_and_linear_ramp():
    const = jnp.full((2, 4, 4, 3), 0.37)
    up = upsample_lowres(const, 16)
    assert up.shape == (2, 16, 16, 3) and up.dtype == jnp.float32
    np.testing.assert_allclose(up, 0.37, atol=1e-6)
    assert upsample_lowres(const, (8, 12)).shape == (2, 8, 12, 3)
    # Bicubic (Keys) interpolation reproduces a linear ramp exactly away from the borders, at the
    # half-pixel-centred sample positions (i + 0.5) / scale - 0.5.
    ramp = jnp.broadcast_to(jnp.arange(8.0)[None, :, None, None], (1, 8, 8, 1))
    out = np.asarray(upsample_lowres(ramp, 32))[0, :, 0, 0]
    expected = (np.arange(32) + 0.5) / 4 - 0.5
    np.testing.assert_allclose(out[8:24], expected[8:24], atol=1e-5)


@pytest.mark.parametrize(
    "path, image_size, lowres_size, target",
    [("configs/sr256.py", 256, 64, 600e6), ("configs/sr1024.py", 1024, 256, 400e6)],
)
def test_paper_param_counts(path, image_size, lowres_size, target):
    """The paper's SR stages (64->256: 600M, 256->1024: 400M), counted without allocating them."""
    config = load_config_file(path)
    assert config.data.image_size == image_size and config.model.lowres_size == lowres_size
    count = _count(_abstract(config.model, image_size=image_size, text_dim=4096))
    assert abs(count - target) < 0.1 * target, count


def test_sr1024_trains_on_crops_without_self_attention():
    config = load_config_file("configs/sr1024.py")
    assert config.data.crop_size == 256 and not config.model.self_attention
    assert config.model.cross_attention


@pytest.mark.parametrize(
    "override, message",
    [
        ({"attn_resolutions": (4,)}, "unknown config.model field(s) ['attn_resolutions']"),
        ({"kind": "unet"}, "config.model.kind is 'unet'"),
        ({"num_res_blocks": (1,)}, "needs one entry per level"),
        ({"num_res_blocks": 2}, "num_res_blocks must be a tuple"),
        ({"lowres_size": 16}, "lowres_size 16 must divide image_size 16 and be smaller"),
        ({"channel_mults": (1,) * 5, "num_res_blocks": (1,) * 5}, "not divisible by 2**5"),
        ({"head_dim": 6}, "not a multiple of head_dim 6"),
        ({"self_attention": 1}, "self_attention must be True or False"),
    ],
)
def test_bad_config_names_the_problem(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _abstract({**TINY, **override})


def test_missing_field():
    cfg = dict(TINY)
    del cfg["lowres_size"]
    message = "missing config.model field(s) ['lowres_size']"
    with pytest.raises(ValueError, match=re.escape(message)):
        _abstract(cfg)


def test_lowres_with_the_wrong_ratio_is_rejected(tiny):
    _, state, apply = tiny
    x, t, text, mask, lowres, lowres_t = _inputs()
    with pytest.raises(ValueError, match="needs that ratio"):
        apply(state, x, t, text, mask, lowres[:, :4, :4], lowres_t)


def test_build_unet_accepts_its_own_kind_only():
    base = dict(
        dim=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        head_dim=8,
        dropout=0.0,
        in_channels=3,
        out_channels=3,
    )
    build = lambda cfg: nnx.eval_shape(  # noqa: E731
        lambda: build_unet(cfg, image_size=16, text_dim=8, rngs=init_rngs(0))
    )
    assert _count(build({**base, "kind": "unet"})) == _count(build(base))
    with pytest.raises(ValueError, match="config.model.kind is 'efficient_unet'"):
        build({**base, "kind": "efficient_unet"})


def test_full_res_first_level_runs_its_res_blocks_at_full_resolution():
    """The demo option: level 0 keeps the full resolution, so its 2 res blocks (2 convs each, down and
    up) run there; the output keeps its shape and the field is validated."""
    cfg = dict(TINY, full_res_first_level=True)
    model = _abstract(cfg)
    graphdef, abstract = nnx.split(model)
    state = random_state(abstract)
    jaxpr = jax.make_jaxpr(_apply_fn(graphdef))(state, *_inputs())
    convs = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    full = [e for e in convs if e.outvars[0].aval.shape[1] == IMAGE]
    # input conv, width conv, 2 down blocks x 2 convs, 2 up blocks x 2 convs (+1 skip conv), width conv, output conv
    assert len(full) >= 3 + 8
    out = jax.jit(_apply_fn(graphdef))(state, *_inputs())
    assert out.shape == (BATCH, IMAGE, IMAGE, 3) and bool(jnp.isfinite(out).all())
    with pytest.raises(ValueError, match="full_res_first_level must be True or False"):
        _abstract(dict(TINY, full_res_first_level=1))
