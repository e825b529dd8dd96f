"""Building blocks shared by the U-Nets (Imagen's base and super-resolution U-Nets, DeepFloyd IF's): layers with
options where the families differ, and `UNetBlock`, the one way a block calls its residual, attention and
feed-forward layers.

Conventions:
  * images are NHWC; text tokens are [B, L, C] with a bool mask [B, L] (True = valid token);
  * parameters are always float32 and carry logical axis names (``nnx.with_partitioning``) from the
    vocabulary ``conv_h, conv_w, channels_in, channels_out, inner, text_embed`` (None = unsharded); the
    training code maps these names to mesh axes with a rules table. ``inner`` is a layer's inner width, split
    over the tensor axis (Megatron's layout): the output of the column-parallel layers that enter it (a residual
    block's first conv and FiLM, attention's q/k/v, the feed-forward's first layer) and the input of the
    row-parallel layers that leave it (the block's second conv, attention's output, the feed-forward's second);
  * ``dtype`` is the compute dtype: matmuls/convs run in it, normalisation statistics and softmax
    run in float32 and are cast back, so bfloat16 compute stays numerically safe;
  * dropout is functional: a block gets a PRNG key (or None for deterministic) at call time and
    never mutates ``nnx.Rngs`` state, so the model runs inside a pure ``jax.jit`` over
    ``nnx.split`` state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from imagen_jax.models.flash_attention import flash_attention
from imagen_jax.parallel.activations import constrain, per_shard, use_sharding
from imagen_jax.parallel.mesh import INNER

Array = jax.Array

# Every dense and convolution layer's output is tagged with this name, so a remat policy can keep it (jax's dots
# policies see neither a convolution nor a dot inside the layers' custom VJP).
PROJECTION_OUTPUT = "projection_output"
# Rematerialisation (config train.remat): what the backward pass recomputes instead of keeping from the forward.
REMAT_POLICIES = {
    "none": None,  # keep every activation the backward pass needs
    "block": jax.checkpoint_policies.nothing_saveable,  # keep each block's inputs only; recompute the block
    # recompute all but the outputs of dense and convolution layers (norms, activations, attention's softmax)
    "block_save_dots": jax.checkpoint_policies.save_only_these_names(PROJECTION_OUTPUT),
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
# Tensor-parallel layer pairs: into the inner width (outputs split over tensor), then out of it (inputs split).
COLUMN_CONV: Names = ("conv_h", "conv_w", "channels_in", INNER)
ROW_CONV: Names = ("conv_h", "conv_w", INNER, "channels_out")
COLUMN_DENSE: Names = ("channels_in", INNER)
ROW_DENSE: Names = (INNER, "channels_out")

_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()
_default_kernel = nnx.initializers.lecun_normal()


def param(rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], names: Names) -> nnx.Param:
    """A float32 parameter annotated with logical axis ``names``."""
    if len(names) != len(shape):
        raise ValueError(f"axis names {names} do not match parameter shape {tuple(shape)}")
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), tuple(shape), jnp.float32))


@dataclasses.dataclass(frozen=True)
class _Projection:
    """What a dense or convolution layer computes, as `_project` needs it (hashable: a custom VJP's static
    argument): 'dense' (the last axis) or 'conv' (NHWC x HWIO, square stride, symmetric padding), the compute
    dtype, and where the kernel and the bias are used (`parallel.activations.use_sharding`, read when the layer
    is called: the backward pass is traced later, outside `activation_layout`)."""

    kind: str
    dtype: Any
    kernel_at_use: jax.sharding.NamedSharding | None
    bias_at_use: jax.sharding.NamedSharding | None
    stride: int = 1
    padding: int = 0

    @classmethod
    def of(cls, layer: nnx.Linear | nnx.Conv, kind: str, stride: int = 1, padding: int = 0) -> _Projection:
        names, kernel = layer.kernel_names, layer.kernel
        bias = None if layer.bias is None else use_sharding(layer.bias.shape, names[-1:])
        return cls(kind, layer.dtype, use_sharding(kernel.shape, names), bias, stride, padding)

    @staticmethod
    def placed(w: Array, sharding: jax.sharding.NamedSharding | None) -> Array:
        return w if sharding is None else jax.lax.with_sharding_constraint(w, sharding)

    def apply(self, x: Array, w: Array) -> Array:
        if self.kind == "dense":
            return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        pad = ((self.padding, self.padding),) * 2
        return jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def kernel_gradient(self, x: Array, g: Array, shape: tuple[int, ...]) -> Array:
        """d(loss)/d(kernel) from the layer's input `x` and output cotangent `g`, both in the compute dtype,
        accumulated and returned in float32, so that the sum over the batch, and under data parallelism the
        reduction over devices that follows it, never round to bfloat16."""
        if self.kind == "dense":
            x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
            return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        # A convolution over the batch: x's channels become the batch, its examples the contracted features, the
        # cotangent is the kernel (dilated by the stride), and the output is [kh, kw, in, out].
        k, s, p = shape[0], self.stride, self.padding
        pads = [(p, k + (out - 1) * s - size - p) for size, out in zip(x.shape[1:3], g.shape[1:3], strict=True)]
        return jax.lax.conv_general_dilated(
            x, g, (1, 1), pads, rhs_dilation=(s, s), dimension_numbers=("CHWN", "IHWO", "HWNC"),
            preferred_element_type=jnp.float32,
        )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _project(x: Array, kernel: Array, bias: Array | None, how: _Projection) -> Array:
    """A dense or convolution layer: the kernel cast to the compute dtype where it is stored and then laid out for
    its use (`parallel.activations.use_sharding`: under FSDP the all-gather moves bfloat16), the bias added. Its
    custom VJP computes the kernel's and the bias's gradients in float32 (autodiff would give them in the
    kernel's compute dtype, and XLA would reduce them over the data-parallel devices in bfloat16)."""
    return _apply(x, kernel, bias, how)[0]


def _apply(x: Array, kernel: Array, bias: Array | None, how: _Projection) -> tuple[Array, Array, Array]:
    """(output, the input and the kernel as the layer computed with them)."""
    narrower = jnp.dtype(how.dtype).itemsize < kernel.dtype.itemsize
    w = how.placed(kernel.astype(how.dtype) if narrower else kernel, how.kernel_at_use)
    x, w = x.astype(how.dtype), w.astype(how.dtype)
    y = how.apply(x, w)
    if bias is not None:
        y = y + how.placed(bias.astype(how.dtype), how.bias_at_use)
    return y, x, w


def _project_forward(x, kernel, bias, how):
    """(symbolic zeros: each argument comes with whether it is differentiated.)"""
    y, x_used, w = _apply(x.value, kernel.value, None if bias is None else bias.value, how)
    # The laid-out kernel is kept for the backward, as autodiff would (under remat, per block). Empty arrays carry
    # the parameters' dtypes, which their gradients take, and None marks what is not differentiated (the input of
    # a model's first layer): pytree structure, so it is static in the backward.
    marks = tuple(None if a is None or not a.perturbed else jnp.zeros((0,), a.value.dtype) for a in (x, kernel, bias))
    return y, (x_used, w, marks)


def _project_backward(how, residuals, g):
    x, w, (x_mark, kernel_mark, bias_mark) = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    g = g.astype(how.dtype)
    dx = dw = db = None
    if x_mark is not None:
        dx = jax.linear_transpose(lambda x: how.apply(x, w), x)(g)[0].astype(x_mark.dtype)
    if kernel_mark is not None:
        # laid out as the weights were used, as autodiff's transpose of their placement would have them
        dw = how.placed(how.kernel_gradient(x, g, w.shape), how.kernel_at_use).astype(kernel_mark.dtype)
    if bias_mark is not None:
        db = how.placed(g.sum(tuple(range(g.ndim - 1)), dtype=jnp.float32), how.bias_at_use).astype(bias_mark.dtype)
    return dx, dw, db


_project.defvjp(_project_forward, _project_backward, symbolic_zeros=True)


class _Projected(nnx.Module):
    """What `_Dense` and `_Conv` add to nnx.Linear and nnx.Conv (same parameters): the kernel's logical axis names,
    and a call through `_project` whose output is named `PROJECTION_OUTPUT` for the remat policies."""

    def __init__(self, *args: Any, kernel_names: Names, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kernel_names = kernel_names

    def _projected(self, inputs: Array, how: _Projection) -> Array:
        bias = None if self.bias is None else self.bias[...]
        return checkpoint_name(_project(inputs, self.kernel[...], bias, how), PROJECTION_OUTPUT)


class _Dense(_Projected, nnx.Linear):
    def __call__(self, inputs: Array) -> Array:
        return self._projected(inputs, _Projection.of(self, "dense"))


def dense(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    zero_init: bool = False,
    kernel_names: Names = DENSE_NAMES,
) -> nnx.Linear:
    """Linear layer on the last axis with annotated float32 params (the bias named as the kernel's output) and
    ``dtype`` compute."""
    return _Dense(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(_zeros if zero_init else _default_kernel, kernel_names),
        bias_init=nnx.with_partitioning(_zeros, kernel_names[-1:]),
        rngs=rngs,
        kernel_names=kernel_names,
    )


class _Conv(_Projected, nnx.Conv):
    def __call__(self, inputs: Array) -> Array:
        if inputs.ndim != 4:
            raise ValueError(f"convolutions take NHWC images, got shape {inputs.shape}")
        return self._projected(inputs, _Projection.of(self, "conv", self.strides, self.kernel_size[0] // 2))


def conv(
    in_channels: int,
    out_channels: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    kernel_size: int = 3,
    stride: int = 1,
    zero_init: bool = False,
    kernel_names: Names = CONV_NAMES,
) -> nnx.Conv:
    """Square NHWC convolution with symmetric padding ``kernel_size // 2`` (size-preserving at
    stride 1, exact halving at stride 2 for even sizes)."""
    return _Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=stride,
        padding=kernel_size // 2,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(_zeros if zero_init else _default_kernel, kernel_names),
        bias_init=nnx.with_partitioning(_zeros, kernel_names[-1:]),
        rngs=rngs,
        kernel_names=kernel_names,
    )


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Group count for GroupNorm: 32 where channels allow it, else the largest divisor of 32 that
    divides ``channels`` (so tiny test widths such as 16 or 48 work)."""
    return math.gcd(max_groups, channels)


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, channels-in-group) of NHWC input; statistics in float32 (see `group_norm`).

    The blocks call it with what follows it folded in: ``film=(scale, shift)`` ([B, C] each) multiplies the
    normalised activations by 1 + scale and adds shift per sample; ``activation`` ('silu' or 'gelu'; ``silu=True``
    is the ADM blocks' shorthand for 'silu') applies that nonlinearity. One fused operation, one pass over the
    activations each way, instead of a pass for each. ``groups`` defaults to `num_groups` (a checkpoint of another
    code base states its own count: diffusers' IF U-Net uses exactly ``norm_num_groups``).
    """

    def __init__(
        self,
        channels: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        eps: float = 1e-5,
        groups: int | None = None,
        names: Names = VECTOR_NAMES,
    ):
        self.groups = num_groups(channels) if groups is None else groups
        if channels % self.groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {self.groups} groups")
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, _ones, (channels,), names)
        self.bias = param(rngs, _zeros, (channels,), names)

    def __call__(
        self,
        x: Array,
        *,
        film: tuple[Array, Array] | None = None,
        silu: bool = False,
        activation: str | None = None,
    ) -> Array:
        scale, bias = self.scale[...], self.bias[...]
        if film is None:
            scale, bias = (jnp.broadcast_to(v, (x.shape[0], v.shape[0])) for v in (scale, bias))
        else:
            film_scale, film_shift = (v.astype(jnp.float32) for v in film)
            scale, bias = scale * (1 + film_scale), bias * (1 + film_scale) + film_shift
        act = activation if activation is not None else ("silu" if silu else None)
        return group_norm(x, scale, bias, self.groups, self.eps, act).astype(self.dtype)


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


ACTIVATIONS = ("silu", "gelu")  # the nonlinearities blocks take by name; 'gelu' is the exact (erf) GELU
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {', '.join(ACTIVATIONS)}")


def activate(x: Array, name: str) -> Array:
    """SiLU or the exact (erf) GELU of x, by name (`ACTIVATIONS`)."""
    check_activation(name)
    return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=False)


def group_norm(
    x: Array, scale: Array, bias: Array, groups: int, eps: float, activation: str | bool | None = None
) -> Array:
    """GroupNorm of x [B,H,W,C] with a per-sample affine (scale, bias: [B, C]) and optionally an activation
    ('silu' or 'gelu'; True means 'silu', False none), computed in float32 and returned in x's dtype.

    Its backward pass keeps x as it came (bfloat16 under bfloat16 compute) and the per-group statistics, and
    recomputes the normalised activations: autodiff of the plain formula would keep float32 copies of the
    normalised and activated tensors, several times x's bytes, and take a pass over them for each reduction.
    """
    if activation is True or activation is False:
        activation = "silu" if activation else None
    if activation is not None:
        check_activation(activation)
    return _group_norm(x, scale, bias, groups, eps, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float, activation: str | None) -> Array:
    return _group_norm_forward(x, scale, bias, groups, eps, activation)[0]


def _group_norm_forward(x, scale, bias, groups, eps, activation):
    xf = _pixels(x)
    mean, rstd = _group_moments(xf, groups, eps)
    _, z = _normalise(xf, mean, rstd, scale, bias)
    if activation == "silu":
        # SiLU as z / (1 + exp(-z)): a division ends the expression, and XLA does not copy an expensive op into
        # each consumer, so the output is computed once and read by the convolution and its weight gradient; with
        # z * sigmoid(z) XLA:CPU recomputed it inside the weight gradient's slow transposed copy (1.2x per tiny32
        # step)
        y = z / (1 + jnp.exp(-z))
    elif activation == "gelu":  # exact GELU, z * Phi(z); erfc(-z / sqrt 2) keeps Phi accurate for negative z
        y = z * (0.5 * jax.lax.erfc(-z * _SQRT_HALF))
    else:
        y = z
    return y.reshape(x.shape).astype(x.dtype), (x, mean, rstd, scale, bias)


def _group_norm_backward(groups, eps, activation, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    xhat, z = _normalise(_pixels(x), mean, rstd, scale, bias)
    dz = _pixels(dy)
    if activation == "silu":  # d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
        sigmoid = jax.nn.sigmoid(z)
        dz = dz * sigmoid * (1 + z * (1 - sigmoid))
    elif activation == "gelu":  # d (z Phi(z)) / dz = Phi(z) + z phi(z)
        dz = dz * (0.5 * jax.lax.erfc(-z * _SQRT_HALF) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * jnp.square(z)))
    dbias, dscale = dz.sum(axis=1), (dz * xhat).sum(axis=1)  # [B, C]: one pass gives both
    # d xhat = dz * scale; dx = rstd * (dxhat - group mean of dxhat - xhat * group mean of dxhat * xhat)
    dxhat_mean = _group_mean(dbias * scale, groups, xhat.shape[1])
    dxhat_xhat_mean = _group_mean(dscale * scale, groups, xhat.shape[1])
    dx = rstd * (dz * scale[:, None] - dxhat_mean - xhat * dxhat_xhat_mean)
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_group_norm.defvjp(_group_norm_forward, _group_norm_backward)


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


def discrete_timestep_embedding(t: Array, dim: int, steps: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal features [B, dim] (cos half first) of the integer step ``round(t * steps)`` of ``t`` in [0, 1],
    as a model trained on ``steps`` discrete timesteps saw them (diffusers' `Timesteps` with flip_sin_to_cos and no
    frequency shift). float32(k / steps) * steps is not always exactly k, hence the rounding. The frequencies are
    computed in float64 and rounded once, so every backend gets the same correctly rounded constants."""
    if dim % 2:
        raise ValueError(f"timestep embedding width must be even, got {dim}")
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.round(t.astype(jnp.float32) * steps)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nnx.Module):
    """t -> sinusoidal(dim) -> Linear -> activation -> Linear, giving the conditioning embedding width.

    ``activation``: 'silu' (Imagen's) or 'gelu' (IF's). ``discrete_steps``: None reads t as continuous time (the
    sinusoid of t * 1000); an int reads it as the step round(t * discrete_steps) of a discrete-time model
    (`discrete_timestep_embedding`), which is what a checkpoint trained on integer steps needs to see.
    """

    def __init__(
        self,
        dim: int,
        emb_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        activation: str = "silu",
        discrete_steps: int | None = None,
    ):
        check_activation(activation)
        self.dim = dim
        self.dtype = dtype
        self.activation = activation
        self.discrete_steps = discrete_steps
        self.fc1 = dense(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.fc2 = dense(emb_dim, emb_dim, rngs=rngs, dtype=dtype)

    def __call__(self, t: Array) -> Array:
        if self.discrete_steps is None:
            h = timestep_embedding(t, self.dim)
        else:
            h = discrete_timestep_embedding(t, self.dim, self.discrete_steps)
        return self.fc2(activate(self.fc1(h.astype(self.dtype)), self.activation))


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
# The config's default, resolved where the model is built for a platform (`platform_attention`) into the kind
# measured fastest there: chunked on a CPU (base64-small's step: 1.12x, 2026-12-04; 1.70x at our default layout,
# 2026-12-07); elsewhere XLA's fused dot_product until another kind is measured faster there (on TPU flash
# planned 348 ms against 365 for mini_base64's step on v5e-8, with 0.77 GiB more temporaries per chip: README).
AUTO_ATTENTION = "auto"
PLATFORM_ATTENTION = {"cpu": "chunked"}


def platform_attention(kind: str, platform: str) -> str:
    """`kind` with AUTO_ATTENTION replaced by the fastest kind on `platform` (a jax device's .platform)."""
    return PLATFORM_ATTENTION.get(platform, "dot_product") if kind == AUTO_ATTENTION else kind


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


RESAMPLE = (None, "up", "down")


def resample(x: Array, kind: str | None) -> Array:
    """x [B,H,W,C] doubled (nearest neighbour, 'up'), halved (2x2 average pool, 'down') or as it is (None)."""
    if kind == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if kind == "down":
        b, h, w, c = x.shape
        pooled = x.astype(jnp.float32).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return pooled.astype(x.dtype)
    return x


class ResBlock(nnx.Module):
    """BigGAN/ADM residual block with FiLM conditioning:

    GN -> act -> [resample] -> conv3x3 -> GN * (1 + scale) + shift -> act -> dropout -> conv3x3,
    where (scale, shift) = Linear(act(emb)); the skip is a 1x1 conv when channels change.

    The defaults are Imagen's block (SiLU, no resampling, zero-initialised last conv, so every block starts as the
    identity). The options give DeepFloyd IF's (diffusers' ResnetBlock2D with scale_shift): ``activation`` 'gelu';
    ``resample`` 'up' / 'down' resamples both paths after the first activation (nearest x2 / 2x2 average pool, BigGAN's
    up/down blocks, which IF uses instead of resampling convs); ``skip_time_act`` takes FiLM from emb itself (IF-II
    applies the activation to emb once, outside the blocks); the output is divided by ``output_scale`` (IF-II's
    1/sqrt(2) residual scaling); ``groups`` and ``eps`` are the GroupNorms'.
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
        activation: str = "silu",
        resample: str | None = None,
        skip_time_act: bool = False,
        output_scale: float = 1.0,
        zero_init: bool = True,
        groups: int | None = None,
        eps: float = 1e-5,
    ):
        check_activation(activation)
        if resample not in RESAMPLE:
            raise ValueError(f"resample {resample!r} is not one of {RESAMPLE}")
        self.dropout_rate = dropout_rate
        self.activation = activation
        self.resample = resample
        self.skip_time_act = skip_time_act
        self.output_scale = output_scale
        self.norm1 = GroupNorm(in_channels, rngs=rngs, dtype=dtype, eps=eps, groups=groups)
        self.conv1 = conv(in_channels, out_channels, rngs=rngs, dtype=dtype, kernel_names=COLUMN_CONV)
        self.film = dense(emb_dim, 2 * out_channels, rngs=rngs, dtype=dtype, kernel_names=COLUMN_DENSE)
        self.norm2 = GroupNorm(out_channels, rngs=rngs, dtype=dtype, eps=eps, groups=groups, names=(INNER,))
        self.conv2 = conv(
            out_channels, out_channels, rngs=rngs, dtype=dtype, zero_init=zero_init, kernel_names=ROW_CONV
        )
        self.skip = (
            conv(in_channels, out_channels, rngs=rngs, dtype=dtype, kernel_size=1)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: Array, emb: Array, dropout_key: Array | None = None) -> Array:
        h = self.norm1(x, activation=self.activation)
        if self.resample is not None:
            h, x = resample(h, self.resample), resample(x, self.resample)
        h = constrain(self.conv1(h), inner=-1)  # hidden channels over tensor
        scale, shift = jnp.split(self.film(emb if self.skip_time_act else activate(emb, self.activation)), 2, axis=-1)
        h = self.norm2(h, film=(constrain(scale, inner=-1), constrain(shift, inner=-1)), activation=self.activation)
        h = self.conv2(dropout(h, self.dropout_rate, dropout_key))
        out = (x if self.skip is None else self.skip(x)) + h
        if self.output_scale != 1.0:
            out = out / self.output_scale
        return constrain(out)


class _PixelAttention(nnx.Module):
    """What every residual attention over an image's H*W positions shares, so the three kinds below differ only in
    where their keys and values come from: heads of ``head_dim`` channels, the attention kind, a GroupNorm of the
    pixels before their projections, and the output ``x + out(attention)`` (``out`` is the subclass's, built last)."""

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        attention: str,
        attention_chunk: int,
        groups: int | None = None,
    ):
        _check_heads(channels, head_dim)
        check_attention(attention)
        self.head_dim = head_dim
        self.attention, self.attention_chunk = attention, attention_chunk
        self.norm = GroupNorm(channels, rngs=rngs, dtype=dtype, groups=groups)

    def _projections(self, channels: int, kv_dim: int, rngs: nnx.Rngs, dtype: jnp.dtype) -> None:
        """Imagen's projections: q of the pixels, k and v of ``kv_dim``-wide tokens, and the zero-init ``out``."""
        self.q = dense(channels, channels, rngs=rngs, dtype=dtype, kernel_names=COLUMN_DENSE)
        self.k = dense(kv_dim, channels, rngs=rngs, dtype=dtype, kernel_names=COLUMN_DENSE)
        self.v = dense(kv_dim, channels, rngs=rngs, dtype=dtype, kernel_names=COLUMN_DENSE)
        self.out = dense(channels, channels, rngs=rngs, dtype=dtype, zero_init=True, kernel_names=ROW_DENSE)

    def _tokens(self, x: Array) -> Array:
        """x [B,H,W,C] GroupNorm'ed, as tokens [B, H*W, C]."""
        b, hgt, wid, c = x.shape
        return self.norm(x).reshape(b, hgt * wid, c)

    def _heads(self, proj: nnx.Linear, tokens: Array) -> Array:
        """proj(tokens) [B, L, C] split into heads [B, L, heads, head_dim]."""
        return constrain(_split_heads(proj(tokens), self.head_dim), inner=2)

    def _residual(self, x: Array, q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
        o = attention(q, k, v, mask, kind=self.attention, chunk=self.attention_chunk)
        return constrain(x + self.out(constrain(o, inner=2).reshape(x.shape)))


class SelfAttention(_PixelAttention):
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
        super().__init__(
            channels, head_dim=head_dim, rngs=rngs, dtype=dtype, attention=attention, attention_chunk=attention_chunk
        )
        self._projections(channels, channels, rngs, dtype)

    def __call__(self, x: Array) -> Array:
        h = self._tokens(x)
        return self._residual(x, *(self._heads(proj, h) for proj in (self.q, self.k, self.v)))


class CrossAttention(_PixelAttention):
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
        super().__init__(
            channels, head_dim=head_dim, rngs=rngs, dtype=dtype, attention=attention, attention_chunk=attention_chunk
        )
        self._projections(channels, context_dim, rngs, dtype)

    def keys_values(self, context: Array) -> tuple[Array, Array]:
        """Keys and values [B, L, heads, head_dim] of context tokens [B, L, context_dim]: the same at every
        sampling step, so a sampler computes them once per prompt."""
        return self._heads(self.k, context), self._heads(self.v, context)

    def __call__(self, x: Array, context: Array | tuple[Array, Array], mask: Array) -> Array:
        """``context``: the tokens, or their precomputed ``keys_values``."""
        q = self._heads(self.q, self._tokens(x))
        k, v = context if isinstance(context, tuple) else self.keys_values(context)
        return self._residual(x, q, k, v, mask)


class AddedKVAttention(_PixelAttention):
    """Residual attention of image positions over text tokens and themselves in one softmax (DeepFloyd IF's; diffusers'
    Attention with AttnAddedKVProcessor): X = GroupNorm(x) as H*W tokens; q = q(X); the keys are the text's, k_text =
    add_k(c), followed by the image's, k(X) (values likewise); out = x + out(attention).

    ``context`` tokens c [B, L, context_dim] are normalised here first (``context_norm``: GroupNorm over the text
    channels and positions with ``context_groups`` groups, IF's cross_attention_norm 'group_norm'; False: used as
    given). ``self_attention`` False drops k and v, so only the text is attended to (diffusers' only_cross_attention).
    No mask: IF attends to every text position, padding included. ``groups`` is the image GroupNorm's.
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        *,
        head_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        groups: int | None = None,
        context_norm: bool = True,
        context_groups: int | None = None,
        self_attention: bool = True,
        attention: str = "dot_product",
        attention_chunk: int = 1024,
        zero_init: bool = True,
    ):
        super().__init__(
            channels,
            head_dim=head_dim,
            rngs=rngs,
            dtype=dtype,
            attention=attention,
            attention_chunk=attention_chunk,
            groups=groups,
        )
        self.context_norm = (
            GroupNorm(context_dim, rngs=rngs, dtype=dtype, groups=context_groups) if context_norm else None
        )
        column = dict(rngs=rngs, dtype=dtype, kernel_names=COLUMN_DENSE)
        self.q = dense(channels, channels, **column)
        self.k = dense(channels, channels, **column) if self_attention else None
        self.v = dense(channels, channels, **column) if self_attention else None
        self.add_k = dense(context_dim, channels, **column)
        self.add_v = dense(context_dim, channels, **column)
        self.out = dense(channels, channels, rngs=rngs, dtype=dtype, zero_init=zero_init, kernel_names=ROW_DENSE)

    def keys_values(self, context: Array) -> tuple[Array, Array]:
        """The text's keys and values [B, L, heads, head_dim] from context tokens [B, L, context_dim]: the same at
        every sampling step, so a sampler computes them once per prompt."""
        if self.context_norm is not None:  # a [B, L, 1, C] image to GroupNorm: statistics over positions x group
            context = self.context_norm(context[:, :, None, :])[:, :, 0, :]
        return self._heads(self.add_k, context), self._heads(self.add_v, context)

    def __call__(self, x: Array, context: Array | tuple[Array, Array]) -> Array:
        """``context``: the tokens, or their precomputed ``keys_values``."""
        h = self._tokens(x)
        q = self._heads(self.q, h)
        k, v = context if isinstance(context, tuple) else self.keys_values(context)
        if self.k is not None:
            k = jnp.concatenate([k, self._heads(self.k, h)], axis=1)
            v = jnp.concatenate([v, self._heads(self.v, h)], axis=1)
        return self._residual(x, q, k, v)


class MeanQueryAttentionPool(nnx.Module):
    """Pools text tokens [B, L, C] into one vector [B, C] with multi-head attention whose query is the tokens' mean
    plus a learned position embedding, over [query; tokens] (DeepFloyd IF's text pooling, diffusers'
    AttentionPooling): no mask (every position, padding included, counts in the mean and the keys) and no output
    projection."""

    def __init__(
        self, channels: int, *, num_heads: int, rngs: nnx.Rngs, dtype: jnp.dtype, kernel_names: Names = DENSE_NAMES
    ):
        if channels % num_heads:
            raise ValueError(f"attention pool width {channels} is not a multiple of its {num_heads} heads")
        self.head_dim = channels // num_heads
        self.dtype = dtype
        self.position = param(rngs, nnx.initializers.normal(channels**-0.5), (1, channels), (None, "channels_out"))
        self.q = dense(channels, channels, rngs=rngs, dtype=dtype, kernel_names=kernel_names)
        self.k = dense(channels, channels, rngs=rngs, dtype=dtype, kernel_names=kernel_names)
        self.v = dense(channels, channels, rngs=rngs, dtype=dtype, kernel_names=kernel_names)

    def __call__(self, tokens: Array) -> Array:
        b, _, c = tokens.shape
        mean = tokens.astype(jnp.float32).mean(axis=1, keepdims=True)
        query = (mean + self.position[...]).astype(self.dtype)  # [B, 1, C]
        sequence = jnp.concatenate([query, tokens.astype(self.dtype)], axis=1)
        q = _split_heads(self.q(query), self.head_dim)
        k = _split_heads(self.k(sequence), self.head_dim)
        v = _split_heads(self.v(sequence), self.head_dim)
        return attention(q, k, v).reshape(b, c)


class FeedForward(nnx.Module):
    """Residual per-pixel MLP (pre-GroupNorm, GELU, hidden width ``mult * channels``, zero-init
    output), the feed-forward half of a transformer layer over NHWC feature maps."""

    def __init__(self, channels: int, mult: int, *, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.norm = GroupNorm(channels, rngs=rngs, dtype=dtype)
        self.fc1 = dense(channels, mult * channels, rngs=rngs, dtype=dtype, kernel_names=COLUMN_DENSE)
        self.fc2 = dense(mult * channels, channels, rngs=rngs, dtype=dtype, zero_init=True, kernel_names=ROW_DENSE)

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
        # cast after the broadcast, so the query's gradient is summed over the batch in float32
        q = jnp.broadcast_to(self.query[...], (b, *self.query.shape)).astype(self.dtype)
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


class UNetBlock(nnx.Module):
    """The unit every U-Net here repeats: a residual block, then (each optional) self-attention over the pixels,
    attention to the text and a per-pixel feed-forward layer. The model files choose the layers (`imagen_block` builds
    Imagen's; if_unet.py IF's, whose one attention layer attends to the text and the pixels together); this is the one
    way they are called. ``remat`` is the model's policy: 'attention' rematerialises the attention layers here
    (`BlockCalls` applies the policies that rematerialise whole blocks)."""

    def __init__(
        self,
        res: ResBlock,
        *,
        self_attn: SelfAttention | None = None,
        cross_attn: CrossAttention | AddedKVAttention | None = None,
        ffn: FeedForward | None = None,
        remat: str = "none",
    ):
        self.attention_policy = "block" if remat == "attention" else "none"
        self.res = res
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.ffn = ffn

    def __call__(
        self,
        x: Array,
        emb: Array,
        context: Array | tuple[Array, Array] | None,
        mask: Array | None,
        dropout_key: Array | None,
    ) -> Array:
        """``context``: what `TextContext.per_block` gives this block (tokens, or its keys and values); ``mask``: the
        text's, None for an attention that takes none (IF's attends to every position)."""
        x = self.res(x, emb, dropout_key)
        if self.self_attn is not None:
            x = call_remat(self.self_attn, x, policy=self.attention_policy)
        if self.cross_attn is not None:
            text = (context,) if mask is None else (context, mask)
            x = call_remat(self.cross_attn, x, *text, policy=self.attention_policy)
        if self.ffn is not None:
            x = self.ffn(x)
        return x


def imagen_block(
    in_channels: int,
    out_channels: int,
    *,
    emb_dim: int,
    context_dim: int,
    self_attention: bool,
    cross_attention: bool,
    ffn_mult: int,
    head_dim: int,
    dropout_rate: float,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    remat: str = "none",
    attention: str = "dot_product",
    attention_chunk: int = 1024,
) -> UNetBlock:
    """Imagen's block, both of its U-Nets': the BigGAN/ADM ResBlock, then where asked for SelfAttention, masked
    CrossAttention to the context tokens and a FeedForward of hidden width ``ffn_mult * out_channels`` (0: none)."""
    kind = dict(attention=attention, attention_chunk=attention_chunk)
    res = ResBlock(in_channels, out_channels, emb_dim, dropout_rate=dropout_rate, rngs=rngs, dtype=dtype)
    self_attn = (
        SelfAttention(out_channels, head_dim=head_dim, rngs=rngs, dtype=dtype, **kind) if self_attention else None
    )
    cross_attn = (
        CrossAttention(out_channels, context_dim, head_dim=head_dim, rngs=rngs, dtype=dtype, **kind)
        if cross_attention
        else None
    )
    ffn = FeedForward(out_channels, ffn_mult, rngs=rngs, dtype=dtype) if ffn_mult else None
    return UNetBlock(res, self_attn=self_attn, cross_attn=cross_attn, ffn=ffn, remat=remat)


class BlockCalls:
    """Calls a U-Net's blocks in the order its forward pass runs them, giving each what it takes besides the
    activations: the conditioning embedding ``emb``, its entry of ``texts`` (`TextContext.per_block`), the text
    ``mask`` and a dropout key of its own (one stream per residual block, numbered in call order), rematerialised by
    the model's ``remat`` policy. One object per forward pass: the order of the calls is what numbers them."""

    def __init__(self, emb: Array, texts: Iterator[Any], mask: Array | None, dropout_key: Array | None, remat: str):
        self.emb, self.texts, self.mask = emb, texts, mask
        self.dropout_key, self.remat = dropout_key, remat
        self.keys = itertools.count()

    def _next_key(self) -> Array | None:
        return fold_key(self.dropout_key, next(self.keys))

    def block(self, block: UNetBlock, h: Array) -> Array:
        return call_remat(block, h, self.emb, next(self.texts), self.mask, self._next_key(), policy=self.remat)

    def res(self, block: ResBlock, h: Array) -> Array:
        """A residual block on its own (a middle's second, IF's resamplers)."""
        return call_remat(block, h, self.emb, self._next_key(), policy=self.remat)

    def layer(self, layer: nnx.Module, h: Array) -> Array:
        """A layer of the activations alone (a resampling convolution), its output pinned to the batch layout."""
        return constrain(call_remat(layer, h, policy=self.remat))
