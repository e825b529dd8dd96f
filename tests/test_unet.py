"""Tests for the base text-conditional U-Net and its layers (imagen_jax.models)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.config import load_config_file
from imagen_jax.flax_settings import init_rngs
from imagen_jax.models import UNet, build_unet, layers
from tests.jaxprs import equations
from tests.random_params import random_state

TINY = dict(
    dim=16,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    head_dim=8,
    dropout=0.1,
    in_channels=3,
    out_channels=3,
)
IMAGE, TEXT_DIM, LEN, BATCH = 16, 8, 5, 2

# The paper's 64x64 base model (2.0B parameters); the lead will import configs/base64.py here.
VOCABULARY = {"conv_h", "conv_w", "channels_in", "channels_out", "inner", "text_embed", None}


def _abstract(cfg=TINY, image_size=IMAGE, text_dim=TEXT_DIM, dtype=jnp.float32) -> UNet:
    return nnx.eval_shape(
        lambda: build_unet(cfg, image_size=image_size, text_dim=text_dim, rngs=init_rngs(0), dtype=dtype)
    )


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, random params, jitted apply) of the tiny float32 model: the train-step pattern."""
    graphdef, abstract_state = nnx.split(_abstract())
    state = random_state(abstract_state)

    @jax.jit
    def apply(state, x, t, text, mask, drop=None, key=None):
        return nnx.merge(graphdef, state)(x, t, text, mask, drop_text=drop, dropout_key=key)

    return graphdef, state, apply


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, IMAGE, IMAGE, 3)), jnp.float32)
    t = jnp.asarray([0.1, 0.7], jnp.float32)
    text = jnp.asarray(rng.normal(size=(BATCH, LEN, TEXT_DIM)), jnp.float32)
    mask = jnp.asarray([[True, True, True, False, False], [True, False, False, False, False]])
    return x, t, text, mask


def test_output_shape_dtype_and_bfloat16_close_to_float32(tiny):
    _, state, apply = tiny
    x, t, text, mask = _inputs()
    out32 = apply(state, x, t, text, mask)
    assert out32.shape == (BATCH, IMAGE, IMAGE, 3) and out32.dtype == jnp.float32
    assert float(jnp.std(out32)) > 1e-2

    graphdef16, state16 = nnx.split(_abstract(dtype=jnp.bfloat16))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state16))  # params stay float32
    model16 = lambda s, *a: nnx.merge(graphdef16, s)(*a)  # noqa: E731
    out16 = jax.jit(model16)(state, x, t, text, mask)
    assert out16.shape == out32.shape and out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.1, rel

    # The convolutions really run in bfloat16, except the output layer's (issue 29, point 6): eps is not rounded
    # to bfloat16's 8 bits, which x0 = (x - sigma eps) / alpha would amplify at high noise.
    jaxpr = jax.make_jaxpr(model16)(state, x, t, text, mask)
    convs = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert len(convs) > 2 and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs[:-1])
    assert convs[-1].invars[0].aval.dtype == convs[-1].invars[1].aval.dtype == jnp.float32
    on_bf16_grid = np.asarray(out16) == np.asarray(out16.astype(jnp.bfloat16).astype(jnp.float32))
    assert on_bf16_grid.mean() < 0.2, on_bf16_grid.mean()


def test_dropped_text_is_ignored_and_kept_text_matters(tiny):
    _, state, apply = tiny
    x, t, text, mask = _inputs()
    other_text = text + 1.0
    drop = jnp.asarray([True, False])
    a = apply(state, x, t, text, mask, drop)
    b = apply(state, x, t, other_text, jnp.ones_like(mask), drop)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-3
    # Dropping differs from not dropping, and an all-False drop equals no drop at all.
    c = apply(state, x, t, text, mask)
    assert float(jnp.max(jnp.abs(a[0] - c[0]))) > 1e-3
    np.testing.assert_allclose(apply(state, x, t, text, mask, jnp.zeros(BATCH, bool)), c, atol=1e-6)


def test_masked_tokens_do_not_matter_and_empty_mask_is_finite(tiny):
    _, state, apply = tiny
    x, t, text, mask = _inputs()
    changed = jnp.where(mask[:, :, None], text, 100.0 * jnp.ones_like(text))
    np.testing.assert_allclose(apply(state, x, t, text, mask), apply(state, x, t, changed, mask), atol=1e-6)
    empty = apply(state, x, t, text, jnp.zeros_like(mask))
    assert bool(jnp.all(jnp.isfinite(empty)))


def test_dropout_key(tiny):
    _, state, apply = tiny
    x, t, text, mask = _inputs()
    base = apply(state, x, t, text, mask)
    np.testing.assert_array_equal(base, apply(state, x, t, text, mask))
    k1 = apply(state, x, t, text, mask, None, jax.random.key(1))
    k2 = apply(state, x, t, text, mask, None, jax.random.key(2))
    assert float(jnp.max(jnp.abs(k1 - base))) > 1e-3
    assert float(jnp.max(jnp.abs(k1 - k2))) > 1e-3
    np.testing.assert_array_equal(k1, apply(state, x, t, text, mask, None, jax.random.key(1)))


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
    # Megatron's pairs: into a layer's inner width (split over tensor), then out of it
    named = {"/".join(map(str, path)): v.get_metadata()["out_sharding"] for path, v in nnx.to_flat_state(params)}
    pairs = {"res/conv1/kernel": ("conv_h", "conv_w", "channels_in", "inner"),
             "res/film/kernel": ("channels_in", "inner"), "res/norm2/scale": ("inner",),
             "res/conv2/kernel": ("conv_h", "conv_w", "inner", "channels_out"),
             "self_attn/q/kernel": ("channels_in", "inner"), "self_attn/q/bias": ("inner",),
             "self_attn/out/kernel": ("inner", "channels_out"), "self_attn/out/bias": ("channels_out",)}  # fmt: skip
    for suffix, names in pairs.items():
        found = [n for path, n in named.items() if path.endswith(suffix)]
        assert found and set(found) == {names}, (suffix, set(found))


def test_base64_param_count():
    """configs/base64.py is the paper's 2.0B base model (within 10%), counted without allocating it."""
    config = load_config_file("configs/base64.py")
    assert config.data.image_size == 64
    model = _abstract(config.model, image_size=config.data.image_size, text_dim=4096)
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count - 2.0e9) < 0.1 * 2.0e9, count


def test_real_init_zeroes_residual_branches_and_output():
    """build_unet's own init: every residual branch and the output conv start at zero (identity
    blocks, zero output), the rest is random."""
    # Jitted init (one compile, rbg keys: both much cheaper on CPU than eager threefry init).
    rngs = lambda: init_rngs(jax.random.key(0, impl="rbg"))  # noqa: E731
    params = jax.jit(lambda: nnx.state(build_unet(TINY, image_size=IMAGE, text_dim=TEXT_DIM, rngs=rngs()), nnx.Param))()
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    zero = [k for k in flat if "conv2']['kernel" in k or "out']['kernel" in k or "out_conv" in k]
    zero = [k for k in zero if "text_pool" not in k]  # the pool's output projection is not residual
    # 8 res blocks (2 down, 2 mid, 4 up), 4 self- + 4 cross-attention outputs, out_conv kernel
    # and bias.
    assert len(zero) == 8 + 8 + 2
    for key in zero:
        np.testing.assert_array_equal(flat[key], 0.0, err_msg=key)
    assert float(jnp.std(flat["['input_conv']['kernel'].value"])) > 0.05
    assert float(jnp.std(flat["['text_pool']['out']['kernel'].value"])) > 0.05


def test_gradients_under_jit(tiny):
    """The train step's pattern: value_and_grad over merged (graphdef, params) inside jax.jit."""
    graphdef, state, _ = tiny
    x, t, text, mask = _inputs()

    @jax.jit
    def loss_and_grad(state):
        def loss(s):
            out = nnx.merge(graphdef, s)(x, t, text, mask, jnp.asarray([True, False]))
            return jnp.mean(jnp.square(out - x))

        return jax.value_and_grad(loss)(state)

    loss, grads = loss_and_grad(state)
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for name in ("out_conv", "null_text", "text_proj", "time_embed"):
        assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name])) > 0, name


@pytest.mark.parametrize(
    "kind, chunk", [("dot_product", 1024), ("chunked", 2), ("chunked", 3), ("chunked", 4), ("flash", 3)]
)
def test_attention_matches_numpy_and_survives_empty_mask(kind, chunk):
    rng = np.random.default_rng(0)
    shapes = [(2, 6, 2, 4), (2, 5, 2, 4), (2, 5, 2, 4)]
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in shapes)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
    out = np.asarray(layers.attention(*map(jnp.asarray, (q, k, v, mask)), kind=kind, chunk=chunk))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    w = np.exp(logits[0] - logits[0].max(-1, keepdims=True)) * mask[0, None, None, :]
    w = w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0], np.einsum("hqk,khd->qhd", w, v[0]), atol=1e-5)
    np.testing.assert_allclose(out[1], np.broadcast_to(v[1].mean(0), (6, 2, 4)), atol=1e-5)


def test_auto_attention_is_the_fastest_kind_of_the_platform_the_model_is_built_for():
    """train.attention = auto (the default): chunked on a CPU, XLA's dot_product elsewhere (TPU and GPU: not
    measured faster), read from the mesh's devices by stage_model, so the planner's TPU compiles get TPU's kind;
    a kind that is set stays."""
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.model import build_model, stage_model

    assert [layers.platform_attention("auto", p) for p in ("tpu", "cpu", "gpu")] == [
        "dot_product",
        "chunked",
        "dot_product",
    ]
    assert layers.platform_attention("flash", "cpu") == "flash"
    config = load_config_file("configs/demo.py")
    assert config.train.attention == "auto" and config.train.attention_chunk == 256

    def kinds(model):
        return {m.attention for _, m in nnx.iter_modules(model) if isinstance(m, layers._PixelAttention)}

    model = stage_model(config, 16, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    assert kinds(nnx.merge(model.graphdef, nnx.eval_shape(lambda: nnx.state(build_model(config, 16))))) == {"chunked"}
    assert kinds(nnx.eval_shape(lambda: build_model(config, 16, platform="tpu"))) == {"dot_product"}
    config.train.attention = "flash"
    assert kinds(nnx.eval_shape(lambda: build_model(config, 16, platform="cpu"))) == {"flash"}


def test_chunked_attention_has_the_same_gradients_and_keeps_a_chunk_of_logits():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.uniform(size=(2, 16)) > 0.3)

    def loss(kind):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, mask, kind=kind, chunk=4)))

    dense = jax.grad(loss("dot_product"), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(dense, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # the largest array either backward program makes: all [B, H, 16, 16] logits, or one 4x16 chunk of them
    def largest(kind):
        jaxpr = jax.make_jaxpr(jax.grad(loss(kind)))(q, k, v)
        return max(math.prod(v.aval.shape) for e in equations(jaxpr.jaxpr) for v in e.outvars)

    assert largest("dot_product") == 2 * 2 * 16 * 16
    assert largest("chunked") == 2 * 2 * 4 * 16


def _group_norm_reference(x, scale, bias, groups, eps, silu):
    """The plain formula (per-sample affine: scale, bias [B, C]), differentiated by autodiff."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    z = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale[:, None, None] + bias[:, None, None]
    return jax.nn.silu(z) if silu else z


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_gradients_match_autodiff_and_keep_no_float32_copy(silu):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(2, 4, 4, 32)), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=(2, 32)), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(fn):
        return lambda x, s, b: jnp.sum(jnp.tanh(fn(x, s, b, 8, 1e-5, silu)) * weights)

    np.testing.assert_allclose(
        layers.group_norm(x, scale, bias, 8, 1e-5, silu), _group_norm_reference(x, scale, bias, 8, 1e-5, silu),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    ours = jax.grad(loss(layers.group_norm), argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(loss(_group_norm_reference), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # bfloat16 activations: the backward pass keeps x in bfloat16 and [B, C] statistics, nothing of x's size
    # in float32 (autodiff of the plain formula keeps float32 activations)
    def big_residuals(fn):  # dtypes of what the pullback keeps that is as large as x
        _, pullback = jax.vjp(lambda x: jnp.tanh(fn(x, scale, bias, 8, 1e-5, silu)), x.astype(jnp.bfloat16))
        return {str(r.dtype) for r in jax.tree.leaves(pullback) if r.size >= x.size}

    assert "float32" in big_residuals(_group_norm_reference)
    big = big_residuals(layers.group_norm)
    assert "float32" not in big and "bfloat16" in big


def test_group_norm_module_folds_film_and_silu():
    """GroupNorm(x, film=(s, t), silu=True) is SiLU(GroupNorm(x) * (1 + s) + t), the ResBlock's formula."""
    norm = layers.GroupNorm(32, rngs=init_rngs(0), dtype=jnp.float32)
    rng = np.random.default_rng(4)
    norm.scale[...] = jnp.asarray(rng.normal(size=32), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=32), jnp.float32)
    x = jnp.asarray(rng.normal(0.5, 2.0, size=(3, 4, 4, 32)), jnp.float32)
    film = tuple(jnp.asarray(rng.normal(size=(3, 32)), jnp.float32) for _ in range(2))
    expected = jax.nn.silu(norm(x) * (1 + film[0][:, None, None]) + film[1][:, None, None])
    np.testing.assert_allclose(norm(x, film=film, silu=True), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm(x, silu=True), jax.nn.silu(norm(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels, groups", [(64, 32), (48, 16), (16, 16)])
def test_group_norm_matches_numpy(channels, groups):
    norm = layers.GroupNorm(channels, rngs=init_rngs(0), dtype=jnp.float32)
    assert norm.groups == groups
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(2, 4, 4, channels)).astype(np.float32)
    xg = x.reshape(2, 4, 4, groups, channels // groups)
    mean, var = xg.mean((1, 2, 4), keepdims=True), xg.var((1, 2, 4), keepdims=True)
    ref = (xg - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref.reshape(x.shape), atol=1e-4)


def test_timestep_embedding_closed_form():
    emb = np.asarray(layers.timestep_embedding(jnp.asarray([0.0, 0.5]), 8))
    freqs = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-6)
    expected = np.concatenate([np.cos(500 * freqs), np.sin(500 * freqs)])
    np.testing.assert_allclose(emb[1], expected, atol=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"depth": 3}, "unknown config.model field(s) ['depth']"),
        ({"attn_resolutions": (4,)}, "attn_resolutions [4]"),
        ({"channel_mults": (1, 2, 2, 2, 2, 2)}, "not divisible"),
        ({"head_dim": 6}, "not a multiple of head_dim 6"),
        ({"attn_placement": "everywhere"}, "attn_placement 'everywhere' is not one of every_block, level_end"),
        ({"ffn_mult": -1}, "ffn_mult must be >= 0"),
    ],
)
def test_bad_config_names_the_problem(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _abstract({**TINY, **override})


def test_missing_field():
    cfg = dict(TINY)
    del cfg["head_dim"]
    with pytest.raises(ValueError, match="missing config.model field"):
        _abstract(cfg)


# imagen-pytorch's layout (benchmarks/layouts.py): attention at each level's end with a feed-forward, the resampling
# convs changing the width, skips from res blocks only.
PEER_LAYOUT = dict(TINY, channel_mults=(1, 2, 4), num_res_blocks=2, attn_placement="level_end", resample_width=True,
                   resample_skips=False, ffn_mult=2)  # fmt: skip


def _kernel_shapes(model) -> dict[str, tuple]:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_imagen_pytorch_layout_widths_blocks_and_attention():
    """Each resolution's way down runs one level narrower and its downsample widens; the way up has the level widths
    and its upsamples narrow; the way up has num_res_blocks per level; attention + FFN only in each level's last."""
    model = _abstract(PEER_LAYOUT)
    shapes = _kernel_shapes(model)
    d = 16
    assert [shapes[f"['down'][{i}][1]['res']['conv2']['kernel']"] for i in range(3)] == [
        (3, 3, d, d), (3, 3, d, d), (3, 3, 2 * d, 2 * d)]  # fmt: skip
    assert [shapes[f"['downsamples'][{i}]['conv']['kernel']"][2:] for i in range(2)] == [(d, d), (d, 2 * d)]
    assert shapes["['mid']['res']['conv1']['kernel']"] == (3, 3, 2 * d, 4 * d)
    assert [shapes[f"['upsamples'][{i}]['conv']['kernel']"][2:] for i in range(2)] == [(4 * d, 2 * d), (2 * d, d)]
    assert [len(blocks) for blocks in model.up] == [2, 2, 2]
    # up level at 4px: 4d from the mid + a 2d skip from the way down at 4px
    assert shapes["['up'][0][0]['res']['conv1']['kernel']"] == (3, 3, 6 * d, 4 * d)
    attends = [[blk.self_attn is not None for blk in blocks] for blocks in (*model.down, *model.up)]
    no, last = [False, False], [False, True]  # attention at 8 px: the second level down, the second up
    assert attends == [no, last, no, no, last, no]
    assert model.down[1][1].ffn is not None and model.down[1][0].ffn is None and model.mid.ffn is not None


def test_imagen_pytorch_layout_runs_and_default_fields_keep_adm():
    """The layout's forward pass has the image's shape; the new fields at their defaults build exactly the parameters
    a config without them does (old configs and checkpoints)."""
    graphdef, abstract_state = nnx.split(_abstract(PEER_LAYOUT, image_size=IMAGE))
    x, t, text, mask = _inputs()
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, text, mask))(random_state(abstract_state))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    explicit = dict(TINY, attn_placement="every_block", resample_width=False, resample_skips=True, ffn_mult=0)
    assert _kernel_shapes(_abstract(explicit)) == _kernel_shapes(_abstract(TINY))
