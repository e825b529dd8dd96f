"""The text-conditional base U-Net of Imagen (64x64): an ADM ("improved DDPM") U-Net with BigGAN
residual blocks, FiLM conditioning on timestep + attention-pooled text, and self-attention plus
text cross-attention at the chosen feature-map resolutions.

``config.model`` fields read by :func:`build_unet` (all required, no others allowed):

  dim               base channel width; level i has ``dim * channel_mults[i]`` channels; the
                    conditioning embedding is ``4 * dim`` wide (as in ADM) and text tokens are
                    projected from the T5 width to ``dim``.
  channel_mults     per-level width multipliers; each level but the last ends with a downsample.
  num_res_blocks    residual blocks per level on the way down; the way up uses
                    ``num_res_blocks + 1`` per level (ADM), the extra one consuming the skip from
                    the downsample / input conv.
  attn_resolutions  feature-map sizes (e.g. 32, 16, 8 at image size 64) where every res block is
                    followed by self-attention and text cross-attention. The middle block
                    (res, self-attn, cross-attn, res) always has attention.
  head_dim          channels per attention head (heads = width / head_dim; ADM uses 64).
  dropout           dropout rate inside res blocks, active only when a ``dropout_key`` is passed.
  in_channels       image channels in (3).
  out_channels      channels predicted (3 for eps / v prediction).
  kind              optional; must be ``"unet"`` (the training code dispatches on it; the SR
                    stages' ``"efficient_unet"`` is built by ``build_sr_unet``).

Architecture choices (documented because the paper leaves them open):
  * resampling is ADM's ``conv_resample`` (stride-2 3x3 conv down, nearest x2 + 3x3 conv up), not
    BigGAN up/down res blocks: it keeps the paper's 2B budget (BigGAN resampling adds ~130M);
  * self-attention and cross-attention are separate residual blocks (pre-GroupNorm, zero-init
    output projection, no FFN), so the super-resolution U-Nets can keep cross-attention alone;
  * text: Linear(text_dim -> dim) then LayerNorm gives the context tokens used by every
    cross-attention and by the attention pool (single learned query, heads of ``head_dim``),
    whose output is projected to the embedding width and added to the timestep embedding;
  * classifier-free guidance: a learned null token (shape [1, dim], in context space) replaces the
    text of dropped examples, whose mask becomes "first position valid, rest invalid".

With dim=512, channel_mults=(1,2,3,4), num_res_blocks=3, attn_resolutions=(32,16,8), head_dim=64,
image_size=64 and text_dim=4096 (T5-XXL) this model has 2.12e9 parameters (paper: 2.0B).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax.models.layers import (
    CrossAttention,
    Downsample,
    GroupNorm,
    ResBlock,
    SelfAttention,
    TimeEmbedding,
    Upsample,
    call_remat,
    check_remat,
    conv,
    fold_key,
)
from imagen_jax.models.text_context import KeysValues, TextConditioning, TextContext
from imagen_jax.parallel.activations import constrain

Array = jax.Array

MODEL_FIELDS = (
    "dim",
    "channel_mults",
    "num_res_blocks",
    "attn_resolutions",
    "head_dim",
    "dropout",
    "in_channels",
    "out_channels",
)
EMB_MULT = 4
KIND = "unet"


class UNetBlock(nnx.Module):
    """A residual block, optionally followed by self-attention and text cross-attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        emb_dim: int,
        context_dim: int,
        attn: bool,
        head_dim: int,
        dropout_rate: float,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        remat_attention: bool = False,
        attention: str = "dot_product",
        attention_chunk: int = 1024,
    ):
        self.attention_policy = "block" if remat_attention else "none"
        kind = dict(attention=attention, attention_chunk=attention_chunk)
        self.res = ResBlock(in_channels, out_channels, emb_dim, dropout_rate=dropout_rate, rngs=rngs, dtype=dtype)
        self.self_attn = (
            SelfAttention(out_channels, head_dim=head_dim, rngs=rngs, dtype=dtype, **kind) if attn else None
        )
        self.cross_attn = (
            CrossAttention(out_channels, context_dim, head_dim=head_dim, rngs=rngs, dtype=dtype, **kind)
            if attn
            else None
        )

    def __call__(
        self, x: Array, emb: Array, context: Array | KeysValues | None, mask: Array, dropout_key: Array | None
    ) -> Array:
        """``context``: what `TextContext.per_block` gives this block (tokens, or its keys and values)."""
        x = self.res(x, emb, dropout_key)
        if self.self_attn is not None:
            x = call_remat(self.self_attn, x, policy=self.attention_policy)
            x = call_remat(self.cross_attn, x, context, mask, policy=self.attention_policy)
        return x


class UNet(TextConditioning, nnx.Module):
    """Text-conditional U-Net: ``model(x, t, text, text_mask, drop_text, dropout_key)``, or, with the text's
    part computed once (``context = model.text_context(text, text_mask, precompute=True)``),
    ``model.denoise(x, t, context, dropout_key)``."""

    def __init__(
        self,
        *,
        image_size: int,
        text_dim: int,
        dim: int,
        channel_mults: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        head_dim: int,
        dropout: float,
        in_channels: int,
        out_channels: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        attention: str = "dot_product",
        attention_chunk: int = 1024,
    ):
        sizes = [image_size // 2**i for i in range(len(channel_mults))]
        _validate(image_size, channel_mults, num_res_blocks, attn_resolutions, dropout, sizes)
        check_remat(remat)
        self.dtype = dtype
        self.remat = remat
        emb_dim = EMB_MULT * dim
        block = dict(
            emb_dim=emb_dim,
            context_dim=dim,
            head_dim=head_dim,
            dropout_rate=dropout,
            rngs=rngs,
            dtype=dtype,
            remat_attention=remat == "attention",
            attention=attention,
            attention_chunk=attention_chunk,
        )

        self.time_embed = TimeEmbedding(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.init_text_conditioning(text_dim, dim, emb_dim, head_dim=head_dim, rngs=rngs, dtype=dtype)

        self.input_conv = conv(in_channels, dim, rngs=rngs, dtype=dtype)
        skip_channels = [dim]
        ch = dim
        down, downsamples = [], []
        for level, (mult, size) in enumerate(zip(channel_mults, sizes)):
            blocks = []
            for _ in range(num_res_blocks):
                attn = size in attn_resolutions
                blocks.append(UNetBlock(ch, dim * mult, attn=attn, **block))
                ch = dim * mult
                skip_channels.append(ch)
            down.append(nnx.List(blocks))
            if level < len(channel_mults) - 1:
                downsamples.append(Downsample(ch, rngs=rngs, dtype=dtype))
                skip_channels.append(ch)
        self.down = nnx.List(down)
        self.downsamples = nnx.List(downsamples)

        self.mid = UNetBlock(ch, ch, attn=True, **block)
        self.mid_res = ResBlock(ch, ch, emb_dim, dropout_rate=dropout, rngs=rngs, dtype=dtype)

        up, upsamples = [], []
        for level in reversed(range(len(channel_mults))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                attn = sizes[level] in attn_resolutions
                out = dim * channel_mults[level]
                blocks.append(UNetBlock(ch + skip_channels.pop(), out, attn=attn, **block))
                ch = out
            up.append(nnx.List(blocks))
            if level > 0:
                upsamples.append(Upsample(ch, rngs=rngs, dtype=dtype))
        self.up = nnx.List(up)
        self.upsamples = nnx.List(upsamples)

        self.out_norm = GroupNorm(ch, rngs=rngs, dtype=dtype)
        self.out_conv = conv(ch, out_channels, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(
        self,
        x: Array,
        t: Array,
        text: Array,
        text_mask: Array,
        drop_text: Array | None = None,
        dropout_key: Array | None = None,
    ) -> Array:
        """Predicts [B, H, W, out_channels] float32 from noisy images x [B, H, W, C] at times
        t [B] in [0, 1], T5 tokens text [B, L, text_dim] with mask [B, L] (True = valid).

        drop_text [B] bool selects the examples conditioned on the learned null text instead
        (classifier-free guidance); dropout_key enables dropout (None = deterministic).
        """
        return self.denoise(x, t, self.text_context(text, text_mask, drop_text), dropout_key)

    def blocks_in_call_order(self) -> list[UNetBlock]:
        """The blocks that may cross-attend, in the order `denoise` calls them."""
        return [*itertools.chain.from_iterable(self.down), self.mid, *itertools.chain.from_iterable(self.up)]

    def denoise(self, x: Array, t: Array, context: TextContext, dropout_key: Array | None = None) -> Array:
        """`__call__` with the text's part given (`text_context`), as a sampler reuses it at every step."""
        emb = self.time_embed(t) + context.pooled
        texts, mask = context.per_block(), context.mask

        keys = itertools.count()  # one dropout stream per res block, in call order
        h = constrain(self.input_conv(constrain(x.astype(self.dtype))))
        skips = [h]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = call_remat(blk, h, emb, next(texts), mask, fold_key(dropout_key, next(keys)), policy=self.remat)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        h = call_remat(self.mid, h, emb, next(texts), mask, fold_key(dropout_key, next(keys)), policy=self.remat)
        h = self.mid_res(h, emb, fold_key(dropout_key, next(keys)))

        for level, blocks in enumerate(self.up):
            for blk in blocks:
                h = constrain(jnp.concatenate([h, skips.pop()], axis=-1))
                h = call_remat(blk, h, emb, next(texts), mask, fold_key(dropout_key, next(keys)), policy=self.remat)
            if level < len(self.upsamples):
                h = self.upsamples[level](h)

        h = constrain(self.out_conv(jax.nn.silu(self.out_norm(h))))
        return h.astype(jnp.float32)


def _validate(
    image_size: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...],
    dropout: float,
    sizes: list[int],
) -> None:
    if not channel_mults:
        raise ValueError("config.model.channel_mults must not be empty")
    if image_size % 2 ** (len(channel_mults) - 1):
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**{len(channel_mults) - 1} "
            f"(config.model.channel_mults has {len(channel_mults)} levels)"
        )
    if num_res_blocks < 1:
        raise ValueError(f"config.model.num_res_blocks must be >= 1, got {num_res_blocks}")
    unknown = sorted(set(attn_resolutions) - set(sizes))
    if unknown:
        raise ValueError(f"config.model.attn_resolutions {unknown} are not feature-map sizes of this U-Net {sizes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.model.dropout must be in [0, 1), got {dropout}")


def default_config() -> ml_collections.ConfigDict:
    """The base U-Net's `config.model` fields with small defaults (configs/base64.py sets the paper's)."""
    c = ml_collections.ConfigDict()
    c.kind = KIND
    c.dim = 128  # channel width of the first level
    c.channel_mults = (1, 2, 3, 4)  # width multiplier per level; each level halves the resolution
    c.num_res_blocks = 2  # residual blocks per level (down path; the up path has one more, as in ADM)
    c.attn_resolutions = (16, 8)  # feature-map sizes with self-attention + text cross-attention
    c.head_dim = 64  # channels per attention head (heads = width / head_dim)
    c.dropout = 0.0  # dropout in residual blocks while training
    c.in_channels = 3
    c.out_channels = 3
    return c


def _constructor_args(model_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    fields = dict(model_cfg)
    kind = fields.pop("kind", KIND)
    if kind != KIND:
        raise ValueError(f"config.model.kind is {kind!r}; build_unet builds kind {KIND!r}")
    unknown = sorted(set(fields) - set(MODEL_FIELDS))
    missing = sorted(set(MODEL_FIELDS) - set(fields))
    if unknown:
        raise ValueError(f"unknown config.model field(s) {unknown}; allowed: {list(MODEL_FIELDS)}")
    if missing:
        raise ValueError(f"missing config.model field(s) {missing}")
    return dict(
        dim=int(fields["dim"]),
        channel_mults=tuple(int(m) for m in fields["channel_mults"]),
        num_res_blocks=int(fields["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in fields["attn_resolutions"]),
        head_dim=int(fields["head_dim"]),
        dropout=float(fields["dropout"]),
        in_channels=int(fields["in_channels"]),
        out_channels=int(fields["out_channels"]),
    )


def check_config(model_cfg: ml_collections.ConfigDict | Mapping[str, Any], *, image_size: int) -> None:
    """Raises ValueError naming the first `config.model` field that build_unet would refuse, without building."""
    args = _constructor_args(model_cfg)
    sizes = [image_size // 2**i for i in range(len(args["channel_mults"]))]
    _validate(
        image_size, args["channel_mults"], args["num_res_blocks"], args["attn_resolutions"], args["dropout"], sizes
    )


def build_unet(
    model_cfg: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    image_size: int,
    text_dim: int,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    remat: str = "none",
    attention: str = "dot_product",
    attention_chunk: int = 1024,
) -> UNet:
    """Builds the U-Net from ``config.model`` (fields in the module docstring); ``dtype`` is the
    compute dtype, parameters are float32; ``remat`` one of layers.REMAT_POLICIES,
    ``attention`` one of layers.ATTENTION_KINDS."""
    return UNet(
        image_size=image_size,
        text_dim=text_dim,
        rngs=rngs,
        dtype=dtype,
        remat=remat,
        attention=attention,
        attention_chunk=attention_chunk,
        **_constructor_args(model_cfg),
    )
