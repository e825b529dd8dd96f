"""Building blocks shared by the Imagen U-Nets (base 64x64 and the super-resolution stages).

Conventions:
  * images are NHWC; text tokens are [B, L, C] with a bool mask [B, L] (True = valid token);
  * parameters are always float32 and carry logical axis names (``nnx.with_partitioning``) from the
    vocabulary ``conv_h, conv_w, channels_in, channels_out, text_embed`` (None = unsharded); the
    training code maps these names to mesh axes with a rules table;
  * ``dtype`` is the compute dtype: matmuls/convs run in it, normalisation statistics and softmax
    run in float32 and are cast back, so bfloat16 compute stays numerically safe;
  * dropout is functional: a block gets a PRNG key (or None for deterministic) at call time and
    never mutates ``nnx.Rngs`` state, so the model runs inside a pure ``jax.jit`` over
    ``nnx.split`` state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models.flash_attention import flash_attention
from imagen_jax.parallel.activations import constrain, per_shard

Array = jax.Array

# Rematerialisation (config train.remat): what the backward pass recomputes instead of keeping from the forward.
REMAT_POLICIES = {
    "none": None,  # keep every activation the backward pass needs
    "block": jax.checkpoint_policies.nothing_saveable,  # keep each block's inputs only; recompute the block
    "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # recompute all but matmul outputs
    "attention": None,  # recompute the attention layers only (their [heads, N, N] logits dominate at 32x32)
}


def check_remat(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {', '.join(REMAT_POLICIES)}")


def call_remat(module: nnx.Module, *args: Array | None, policy: str) -> Array:
    """`module(*args)`, its activations rematerialised in the backward pass as `policy` ('block' or
    'block_save_dots'; anything else calls it plainly). The forward result is the same either way."""
    if REMAT_POLICIES.get(policy) is None:
        return module(*args)
    return nnx.remat(lambda m, *a: m(*a), policy=REMAT_POLICIES[policy])(module, *args)


Names = tuple[str | None, ...]

CONV_NAMES: Names = ("conv_h", "conv_w", "channels_in", "channels_out")
DENSE_NAMES: Names = ("channels_in", "channels_out")
VECTOR_NAMES: Names = ("channels_out",)

_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_default_kernel = nnx.initializers.lecun_normal()


def param(rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], names: Names) -> nnx.Param:
    """A float32 parameter annotated with logical axis ``names``."""
    if len(names) != len(shape):
        raise ValueError(f"axis names {names} do not match parameter shape {tuple(shape)}")
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), tuple(shape), jnp.float32))


def dense(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    zero_init: bool = False,
    kernel_names: Names = DENSE_NAMES,
) -> nnx.Linear:
    """Linear layer on the last axis with annotated float32 params and ``dtype`` compute."""
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(_zeros if zero_init else _default_kernel, kernel_names),
        bias_init=nnx.with_partitioning(_zeros, VECTOR_NAMES),
        rngs=rngs,
    )


def conv(
    in_channels: int,
    out_channels: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    kernel_size: int = 3,
    stride: int = 1,
    zero_init: bool = False,
) -> nnx.Conv:
    """Square NHWC convolution with symmetric padding ``kernel_size // 2`` (size-preserving at
    stride 1, exact halving at stride 2 for even sizes)."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=stride,
        padding=kernel_size // 2,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(_zeros if zero_init else _default_kernel, CONV_NAMES),
        bias_init=nnx.with_partitioning(_zeros, VECTOR_NAMES),
        rngs=rngs,
    )


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Group count for GroupNorm: 32 where channels allow it, else the largest divisor of 32 that
    divides ``channels`` (so tiny test widths such as 16 or 48 work)."""
    return math.gcd(max_groups, channels)


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, channels-in-group) of NHWC input; statistics in float32 (see `group_norm`).

    The blocks call it with what follows it folded in: ``film=(scale, shift)`` ([B, C] each) multiplies the
    normalised activations by 1 + scale and adds shift per sample; ``silu=True`` applies SiLU. One fused
    operation, one pass over the activations each way, instead of a pass for each.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, eps: float = 1e-5):
        self.groups = num_groups(channels)
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, _ones, (channels,), VECTOR_NAMES)
        self.bias = param(rngs, _zeros, (channels,), VECTOR_NAMES)

    def __call__(self, x: Array, *, film: tuple[Array, Array] | None = None, silu: bool = False) -> Array:
        scale, bias = self.scale[...], self.bias[...]
        if film is None:
            scale, bias = (jnp.broadcast_to(v, (x.shape[0], v.shape[0])) for v in (scale, bias))
        else:
            film_scale, film_shift = (v.astype(jnp.float32) for v in film)
            scale, bias = scale * (1 + film_scale), bias * (1 + film_scale) + film_shift
        return group_norm(x, scale, bias, self.groups, self.eps, silu).astype(self.dtype)


def _pixels(x: Array) -> Array:
    """x [B,H,W,C] as float32 [B, H*W, C]: the layout every GroupNorm reduction and formula works on."""
    b, h, w, c = x.shape
    return x.astype(jnp.float32).reshape(b, h * w, c)


def _group_moments(xf: Array, groups: int, eps: float) -> tuple[Array, Array]:
    """Mean and 1/std of xf [B, H*W, C] per (sample, group), in float32, repeated per channel: [B, 1, C] each.

    Reduced over H*W per channel first ([B, H*W, C] -> [B, C], the channels staying the contiguous axis), then over
    the channels of each group: on CPU this is several times faster than reducing [B,H,W,G,C/G] over (1, 2, 4).
    """
    mean = _group_mean(xf.sum(axis=1), groups, xf.shape[1])
    var = _group_mean(jnp.square(xf - mean).sum(axis=1), groups, xf.shape[1])
    return mean, jax.lax.rsqrt(var + eps)


def _normalise(xf: Array, mean: Array, rstd: Array, scale: Array, bias: Array) -> tuple[Array, Array]:
    """The normalised activations xhat and their affine z = xhat * scale + bias (scale, bias: [B, C])."""
    xhat = (xf - mean) * rstd
    return xhat, xhat * scale[:, None] + bias[:, None]


def _group_mean(per_channel: Array, groups: int, pixels: int) -> Array:
    """Per-channel sums over the pixels [B, C] -> the mean of each group, repeated per channel: [B, 1, C]."""
    b, c = per_channel.shape
    mean = per_channel.reshape(b, groups, c // groups).sum(axis=-1) / (pixels * (c // groups))
    return jnp.repeat(mean, c // groups, axis=1)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float, silu: bool) -> Array:
    """GroupNorm of x [B,H,W,C] with a per-sample affine (scale, bias: [B, C]) and optionally SiLU, computed in
    float32 and returned in x's dtype.

    Its backward pass keeps x as it came (bfloat16 under bfloat16 compute) and the per-group statistics, and
    recomputes the normalised activations: autodiff of the plain formula would keep float32 copies of the
    normalised and activated tensors, several times x's bytes, and take a pass over them for each reduction.
    """
    return _group_norm_forward(x, scale, bias, groups, eps, silu)[0]


def _group_norm_forward(x, scale, bias, groups, eps, silu):
    xf = _pixels(x)
    mean, rstd = _group_moments(xf, groups, eps)
    _, z = _normalise(xf, mean, rstd, scale, bias)
    # SiLU as z / (1 + exp(-z)): a division ends the expression, and XLA does not copy an expensive op into each
    # consumer, so the output is computed once and read by the convolution and its weight gradient; with
    # z * sigmoid(z) XLA:CPU recomputed it inside the weight gradient's slow transposed copy (1.2x per tiny32 step)
    y = z / (1 + jnp.exp(-z)) if silu else z
    return y.reshape(x.shape).astype(x.dtype), (x, mean, rstd, scale, bias)


def _group_norm_backward(groups, eps, silu, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    xhat, z = _normalise(_pixels(x), mean, rstd, scale, bias)
    dz = _pixels(dy)
    if silu:  # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
        sigmoid = jax.nn.sigmoid(z)
        dz = dz * sigmoid * (1 + z * (1 - sigmoid))
    dbias, dscale = dz.sum(axis=1), (dz * xhat).sum(axis=1)  # [B, C]: one pass gives both
    # d xhat = dz * scale; dx = rstd * (dxhat - group mean of dxhat - xhat * group mean of dxhat * xhat)
    dxhat_mean = _group_mean(dbias * scale, groups, xhat.shape[1])
    dxhat_xhat_mean = _group_mean(dscale * scale, groups, xhat.shape[1])
    dx = rstd * (dz * scale[:, None] - dxhat_mean - xhat * dxhat_xhat_mean)
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (text tokens); statistics in float32."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, eps: float = 1e-5):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, _ones, (channels,), VECTOR_NAMES)
        self.bias = param(rngs, _zeros, (channels,), VECTOR_NAMES)

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fold_key(key: Array | None, index: int) -> Array | None:
    """A distinct dropout key per layer index (None stays None: deterministic)."""
    return None if key is None else jax.random.fold_in(key, index)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal features [B, dim] of continuous time ``t`` in [0, 1], scaled by 1000 so the
    frequencies span the same range as for DDPM's integer steps."""
    if dim % 2:
        raise ValueError(f"timestep embedding width must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nnx.Module):
    """t -> sinusoidal(dim) -> Linear -> SiLU -> Linear, giving the conditioning embedding width."""

    def __init__(self, dim: int, emb_dim: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.dim = dim
        self.dtype = dtype
        self.fc1 = dense(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.fc2 = dense(emb_dim, emb_dim, rngs=rngs, dtype=dtype)

    def __call__(self, t: Array) -> Array:
        h = timestep_embedding(t, self.dim).astype(self.dtype)
        return self.fc2(jax.nn.silu(self.fc1(h)))


# How attention is computed (config train.attention); the result is the same either way.
ATTENTION_KINDS = (
    # jax.nn.dot_product_attention: XLA's fused softmax(QK^T)V; the [heads, queries, keys] logits exist whole,
    # in float32.
    "dot_product",
    # Queries in chunks of train.attention_chunk, each rematerialised in the backward pass: logits memory is
    # chunk x keys per head instead of queries x keys (self-attention at 32x32 and above), for a second forward.
    "chunked",
    # Flash attention: on TPU, JAX's Pallas kernel (models/flash_attention.py), run on each device's shard; the
    # logits never exist whole, in either pass. Elsewhere (CPU, GPU) it computes as 'chunked'.
    "flash",
)


def check_attention(kind: str) -> None:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {', '.join(ATTENTION_KINDS)}")


def attention(q: Array, k: Array, v: Array, mask: Array | None = None, *, kind: str = "dot_product",
              chunk: int = 1024) -> Array:  # fmt: skip
    """Multi-head attention; q [B,Lq,H,D], k/v [B,Lk,H,D], mask [B,Lk] bool (True = attend).

    Logits and softmax in float32; masked logits are replaced by a large negative number (not added to), so a
    fully masked row gives a finite uniform average instead of NaN. `kind` (ATTENTION_KINDS) trades memory
    for compute: 'chunked' splits queries into blocks of `chunk` when Lq is a larger multiple of it; 'flash'
    is the Pallas kernel on TPU (which needs a valid key in every row) and 'chunked' elsewhere.
    """
    if kind == "flash":
        inputs, inner = (q, k, v) if mask is None else (q, k, v, mask), (2, 2, 2, None)

        def local(*xs: Array) -> Array:
            other = functools.partial(attention, kind="chunked", chunk=chunk)
            return jax.lax.platform_dependent(*xs, tpu=flash_attention, default=other)

        return per_shard(local, *inputs, inner=inner[: len(inputs)])
    mask = None if mask is None else mask[:, None, None, :]
    lq = q.shape[1]
    if kind != "chunked" or lq <= chunk or lq % chunk:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    blocks = q.reshape(q.shape[0], lq // chunk, chunk, *q.shape[2:]).swapaxes(0, 1)  # [n, B, chunk, H, D]
    one = jax.checkpoint(lambda block: jax.nn.dot_product_attention(block, k, v, mask=mask))
    return jax.lax.map(one, blocks).swapaxes(0, 1).reshape(q.shape[:2] + v.shape[2:])


def _split_heads(x: Array, head_dim: int) -> Array:
    return x.reshape(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)


def _check_heads(channels: int, head_dim: int) -> None:
    if channels % head_dim:
        raise ValueError(f"attention width {channels} is not a multiple of head_dim {head_dim}")


class ResBlock(nnx.Module):
    """BigGAN/ADM residual block with FiLM conditioning:

    GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3 (zero-init),
    where (scale, shift) = Linear(SiLU(emb)); the skip is a 1x1 conv when channels change.
    The zero-initialised last conv makes every block start as the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        dropout_rate: float,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ):
        self.dropout_rate = dropout_rate
        self.norm1 = GroupNorm(in_channels, rngs=rngs, dtype=dtype)
        self.conv1 = conv(in_channels, out_channels, rngs=rngs, dtype=dtype)
        self.film = dense(emb_dim, 2 * out_channels, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(out_channels, rngs=rngs, dtype=dtype)
        self.conv2 = conv(out_channels, out_channels, rngs=rngs, dtype=dtype, zero_init=True)
        self.skip = (
            conv(in_channels, out_channels, rngs=rngs, dtype=dtype, kernel_size=1)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: Array, emb: Array, dropout_key: Array | None = None) -> Array:
        h = constrain(self.conv1(self.norm1(x, silu=True)), inner=-1)  # hidden channels over tensor
        scale, shift = jnp.split(self.film(jax.nn.silu(emb)), 2, axis=-1)
        h = self.norm2(h, film=(constrain(scale, inner=-1), constrain(shift, inner=-1)), silu=True)
        h = self.conv2(dropout(h, self.dropout_rate, dropout_key))
        return constrain((x if self.skip is None else self.skip(x)) + h)


class SelfAttention(nnx.Module):
    """Residual multi-head self-attention over the H*W positions (pre-GroupNorm, zero-init
    output projection)."""

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        attention: str = "dot_product",
        attention_chunk: int = 1024,
    ):
        _check_heads(channels, head_dim)
        check_attention(attention)
        self.head_dim = head_dim
        self.attention, self.attention_chunk = attention, attention_chunk
        self.norm = GroupNorm(channels, rngs=rngs, dtype=dtype)
        self.q = dense(channels, channels, rngs=rngs, dtype=dtype)
        self.k = dense(channels, channels, rngs=rngs, dtype=dtype)
        self.v = dense(channels, channels, rngs=rngs, dtype=dtype)
        self.out = dense(channels, channels, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = self.norm(x).reshape(b, hgt * wid, c)
        q, k, v = (constrain(_split_heads(proj(h), self.head_dim), inner=2) for proj in (self.q, self.k, self.v))
        o = attention(q, k, v, kind=self.attention, chunk=self.attention_chunk)
        return constrain(x + self.out(constrain(o, inner=2).reshape(b, hgt, wid, c)))


class CrossAttention(nnx.Module):
    """Residual multi-head cross-attention from image positions to (masked) text tokens.

    ``context`` is [B, L, context_dim] (already normalised by the caller), ``mask`` [B, L] bool.
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        *,
        head_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        attention: str = "dot_product",
        attention_chunk: int = 1024,
    ):
        _check_heads(channels, head_dim)
        check_attention(attention)
        self.head_dim = head_dim
        self.attention, self.attention_chunk = attention, attention_chunk
        self.norm = GroupNorm(channels, rngs=rngs, dtype=dtype)
        self.q = dense(channels, channels, rngs=rngs, dtype=dtype)
        self.k = dense(context_dim, channels, rngs=rngs, dtype=dtype)
        self.v = dense(context_dim, channels, rngs=rngs, dtype=dtype)
        self.out = dense(channels, channels, rngs=rngs, dtype=dtype, zero_init=True)

    def keys_values(self, context: Array) -> tuple[Array, Array]:
        """Keys and values [B, L, heads, head_dim] of context tokens [B, L, context_dim]: the same at every
        sampling step, so a sampler computes them once per prompt."""
        k = constrain(_split_heads(self.k(context), self.head_dim), inner=2)
        v = constrain(_split_heads(self.v(context), self.head_dim), inner=2)
        return k, v

    def __call__(self, x: Array, context: Array | tuple[Array, Array], mask: Array) -> Array:
        """``context``: the tokens, or their precomputed ``keys_values``."""
        b, hgt, wid, c = x.shape
        q = constrain(_split_heads(self.q(self.norm(x).reshape(b, hgt * wid, c)), self.head_dim), inner=2)
        k, v = context if isinstance(context, tuple) else self.keys_values(context)
        o = attention(q, k, v, mask, kind=self.attention, chunk=self.attention_chunk)
        return constrain(x + self.out(constrain(o, inner=2).reshape(b, hgt, wid, c)))


class FeedForward(nnx.Module):
    """Residual per-pixel MLP (pre-GroupNorm, GELU, hidden width ``mult * channels``, zero-init
    output), the feed-forward half of a transformer layer over NHWC feature maps."""

    def __init__(self, channels: int, mult: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.norm = GroupNorm(channels, rngs=rngs, dtype=dtype)
        self.fc1 = dense(channels, mult * channels, rngs=rngs, dtype=dtype)
        self.fc2 = dense(mult * channels, channels, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(self, x: Array) -> Array:
        return constrain(x + self.fc2(jax.nn.gelu(constrain(self.fc1(self.norm(x)), inner=-1))))


class AttentionPool(nnx.Module):
    """Pools masked text tokens [B, L, C] into one vector [B, out_dim] with multi-head attention
    from a single learned query (Imagen adds this pooled text to the timestep embedding)."""

    def __init__(
        self,
        channels: int,
        out_dim: int,
        *,
        head_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ):
        _check_heads(channels, head_dim)
        self.head_dim = head_dim
        self.dtype = dtype
        query_init = nnx.initializers.normal(1.0)
        self.query = param(rngs, query_init, (1, channels), (None, "channels_out"))
        self.k = dense(channels, channels, rngs=rngs, dtype=dtype)
        self.v = dense(channels, channels, rngs=rngs, dtype=dtype)
        self.out = dense(channels, out_dim, rngs=rngs, dtype=dtype)

    def __call__(self, tokens: Array, mask: Array) -> Array:
        b = tokens.shape[0]
        q = jnp.broadcast_to(self.query[...].astype(self.dtype), (b, *self.query.shape))
        q = _split_heads(q, self.head_dim)
        k = _split_heads(self.k(tokens), self.head_dim)
        v = _split_heads(self.v(tokens), self.head_dim)
        pooled = attention(q, k, v, mask)
        return self.out(pooled.reshape(b, -1))


class Downsample(nnx.Module):
    """Halves H and W with a stride-2 3x3 conv (ADM's conv_resample); ``out_channels`` (default:
    ``channels``) lets the Efficient U-Net change width while it downsamples."""

    def __init__(
        self,
        channels: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        out_channels: int | None = None,
    ):
        out = channels if out_channels is None else out_channels
        self.conv = conv(channels, out, rngs=rngs, dtype=dtype, stride=2)

    def __call__(self, x: Array) -> Array:
        return constrain(self.conv(x))


class Upsample(nnx.Module):
    """Doubles H and W with nearest-neighbour repetition followed by a 3x3 conv; ``out_channels``
    (default: ``channels``) lets the Efficient U-Net change width while it upsamples."""

    def __init__(
        self,
        channels: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        out_channels: int | None = None,
    ):
        out = channels if out_channels is None else out_channels
        self.conv = conv(channels, out, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return constrain(self.conv(x))
