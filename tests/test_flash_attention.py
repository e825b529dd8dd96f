"""`train.attention=flash`: JAX's Pallas TPU flash-attention kernel fitted to the U-Net's attention (padding,
masks as segment ids), checked on CPU in Pallas's TPU interpret mode against NumPy and autodiff, and compiled
for a TPU slice by the TPU compiler (libtpu) as a per-device kernel that moves no activations between chips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

from imagen_jax.models import layers
from imagen_jax.models.flash_attention import flash_attention


@pytest.fixture
def tpu_interpret(monkeypatch):
    """The Pallas TPU kernel run by Pallas's TPU interpreter, so it computes on CPU."""
    interpreted = functools.partial(pl.pallas_call, interpret=pltpu.InterpretParams())
    monkeypatch.setattr(pallas_flash.pl, "pallas_call", interpreted)


def _reference(q, k, v, mask):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def test_kernel_matches_numpy_and_autodiff_with_masks_and_padding(tpu_interpret):
    """12 queries (padded to a block of 16) over 5 keys (padded to 128), a different mask per example, one
    row with a single valid key (a dropped caption's null token): values as NumPy's, gradients as autodiff's
    through jax.nn.dot_product_attention."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 12, 2, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 5, 2, 8)).astype(np.float32) for _ in range(2))
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)
    out = flash_attention(*map(jnp.asarray, (q, k, v, mask)))
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=1e-5)

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, jnp.asarray(mask))))

    xla = functools.partial(layers.attention, kind="dot_product")
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(flash_attention), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d loss / d {name}")


def test_kernel_without_mask_on_whole_blocks(tpu_interpret):
    """Self-attention's case: no mask and no padding (no segment ids at all)."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 128, 2, 8)).astype(np.float32) for _ in range(3))
    out = flash_attention(*map(jnp.asarray, (q, k, v)))
    np.testing.assert_allclose(out, _reference(q, k, v, np.ones((1, 128), bool)), atol=1e-5)


def test_flash_kind_off_tpu_computes_as_chunked():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.uniform(size=(2, 16)) > 0.3).at[:, 0].set(True)
    flash = layers.attention(q, k, v, mask, kind="flash", chunk=4)
    np.testing.assert_allclose(flash, layers.attention(q, k, v, mask, kind="chunked", chunk=4), atol=1e-6)


def test_tpu_compile_runs_the_kernel_per_device_without_moving_activations():
    """On a v4-8 (4 chips) with the batch over fsdp and the heads over tensor (activation_layout, as the train
    step traces the model), the TPU program calls the Pallas kernel in both passes and has no collective at all:
    each chip attends over its own examples' heads."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from imagen_jax.parallel.activations import activation_layout
    from imagen_jax.train import plan as plan_lib

    devices = np.array(plan_lib.slice_devices(plan_lib.parse_slice("v4-8"))).reshape(1, 2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    qkv = NamedSharding(mesh, P("fsdp", None, "tensor", None))
    q = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=qkv)
    k = jax.ShapeDtypeStruct((4, 77, 4, 64), jnp.bfloat16, sharding=qkv)
    mask = jax.ShapeDtypeStruct((4, 77), jnp.bool_, sharding=NamedSharding(mesh, P("fsdp", None)))

    def loss(q, k, mask):
        with activation_layout(mesh):
            return jnp.sum(layers.attention(q, k, k, mask, kind="flash").astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, k, mask).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 2  # the forward kernel and the backward kernels
    collectives = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    assert not [c for c in collectives if c in hlo]
