"""Imagen's Efficient U-Net for the text-conditional super-resolution stages (appendix B.1, F.2).

The model predicts noise (or v) for an image at the stage's resolution, conditioned on the
timestep, T5 text, and a low-resolution image with its noise-augmentation level. It differs from
the base U-Net (:mod:`imagen_jax.models.unet`) as the paper describes:

  * every level starts by DOWNSAMPLING (stride-2 conv that also sets the level's width) and then
    runs its residual blocks; on the way up a level runs its blocks and then UPSAMPLES (nearest x2 +
    conv to the next level's width). No residual block runs at full resolution, which is what makes
    the SR stages affordable at 256 and 1024;
  * more residual blocks at low resolution (``num_res_blocks`` is a tuple per level, e.g. 2/4/8/8);
  * attention only at the lowest level: text cross-attention and, optionally, self-attention over
    its pixels (the 256->1024 model has none) and a feed-forward layer;
  * U-Net skip connections are scaled by 1/sqrt(2) before they are concatenated;
  * conditioning embedding = time embedding of t + time embedding of the low-res augmentation level
    ``lowres_t`` + attention-pooled text, applied by FiLM in every residual block;
  * the low-res image is upsampled to the output size with :func:`upsample_lowres` and concatenated
    channel-wise to the noisy input.

Nothing depends on the image size (no positional embeddings over pixels; self-attention is over
however many pixels the lowest level has), so a model trained on 256x256 crops runs at 1024x1024.

``config.model`` fields read by :func:`build_sr_unet` (all required except ``kind``, no others):

  kind              optional; must be ``"efficient_unet"`` (the training code dispatches on it).
  dim               width of the full-resolution input conv; the conditioning embedding is
                    ``4 * dim`` wide and text tokens are projected from the T5 width to ``dim``.
  channel_mults     per-level widths ``dim * mult``; every level halves the resolution, so the
                    image size must be divisible by ``2 ** len(channel_mults)``.
  num_res_blocks    residual blocks per level (tuple, one per level); the way up uses the same
                    number per level.
  self_attention    self-attention over pixels after every residual block of the lowest level.
  cross_attention   text cross-attention after every residual block of the lowest level.
  ffn_mult          a per-pixel feed-forward layer (hidden width ``ffn_mult * width``) after the
                    attention of every lowest-level block, completing a transformer layer
                    (self-attention, cross-attention, FFN) as in imagen-pytorch's SR U-Nets;
                    0 = none.
  head_dim          channels per attention head (heads = width / head_dim; the text attention
                    pool uses it too, so ``dim`` must be a multiple of it).
  dropout           dropout rate inside res blocks, active only when a ``dropout_key`` is passed.
  in_channels       channels of the noisy image and of the low-res image (3); the input conv sees
                    both, ``2 * in_channels``.
  out_channels      channels predicted (3 for eps / v prediction).
  full_res_first_level
                    optional, default False (the paper's design): when True the first level
                    keeps the full resolution (a 3x3 conv sets its width instead of the stride-2
                    downsample, and a 3x3 conv replaces its upsample), so residual blocks also run at
                    full resolution. Tiny, briefly trained models (the CPU demo) need that capacity
                    to remove pixel-level noise; large paper-scale models do not use it.
  lowres_size       side of the low-res conditioning image at the stage's ``image_size`` (64 for
                    64->256); a call must keep the ratio (256 crops of 1024 images: 64 crops of
                    the 256 low-res image).

Architecture choices the paper leaves open (documented here, reused by the configs' counts):
  * skip connections: one per level (the output of the level on the way down) joins the first
    residual block of the same level on the way up, plus the input conv's full-resolution features
    joining before the output conv; the lowest level turns straight around (no middle block);
  * resampling: stride-2 3x3 conv down, nearest x2 + 3x3 conv up (the base U-Net's layers);
  * residual blocks, attention, text projection, attention pool and learned null text are the base
    U-Net's (BigGAN/ADM blocks with FiLM, pre-GroupNorm attention, zero-init residual outputs);
  * the low-res image is upsampled bicubically (``jax.image.resize``, half-pixel centres) in
    float32, unclipped: noise augmentation already takes it outside [-1, 1].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax.models.config_fields import ModelConfig, builder, read_fields
from imagen_jax.models.layers import (
    BlockCalls,
    Downsample,
    GroupNorm,
    TimeEmbedding,
    UNetBlock,
    Upsample,
    check_remat,
    conv,
    imagen_block,
)
from imagen_jax.models.text_context import TextConditioning, TextContext
from imagen_jax.parallel.activations import constrain

Array = jax.Array

KIND = "efficient_unet"
MODEL_FIELDS = (
    "dim",
    "channel_mults",
    "num_res_blocks",
    "self_attention",
    "cross_attention",
    "ffn_mult",
    "head_dim",
    "dropout",
    "in_channels",
    "out_channels",
    "lowres_size",
)
OPTIONAL_FIELDS = {"full_res_first_level": False}
EMB_MULT = 4
SKIP_SCALE = 1.0 / math.sqrt(2.0)
LOWRES_RESIZE_METHOD = "cubic"


def upsample_lowres(lowres: Array, size: int | Sequence[int]) -> Array:
    """Resizes the low-res conditioning image [B, h, w, C] to [B, H, W, C] (``size`` = H or (H, W))
    with bicubic interpolation in float32.

    Training and sampling must both call this, so the SR model always sees the same upsampling.
    """
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    b, _, _, c = lowres.shape
    return jax.image.resize(lowres.astype(jnp.float32), (b, height, width, c), method=LOWRES_RESIZE_METHOD)


class EfficientUNet(TextConditioning, nnx.Module):
    """Text- and low-res-conditional Efficient U-Net:
    ``model(x, t, text, text_mask, drop_text, dropout_key, *, lowres, lowres_t)``, or, with the text's part
    computed once (``context = model.text_context(text, text_mask, precompute=True)``),
    ``model.denoise(x, t, context, dropout_key, lowres=..., lowres_t=...)``."""

    def __init__(
        self,
        *,
        image_size: int,
        lowres_size: int,
        text_dim: int,
        dim: int,
        channel_mults: tuple[int, ...],
        num_res_blocks: tuple[int, ...],
        self_attention: bool,
        cross_attention: bool,
        ffn_mult: int,
        head_dim: int,
        dropout: float,
        in_channels: int,
        out_channels: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        full_res_first_level: bool = False,
        remat: str = "none",
        attention: str = "dot_product",
        attention_chunk: int = 1024,
    ):
        _validate(image_size, lowres_size, channel_mults, num_res_blocks, ffn_mult, dropout, full_res_first_level)
        check_remat(remat)
        self.dtype = dtype
        self.remat = remat
        self.in_channels = in_channels
        self.image_size = image_size
        self.lowres_size = lowres_size
        emb_dim = EMB_MULT * dim
        lowest = len(channel_mults) - 1
        widths = [dim * m for m in channel_mults]
        settings = dict(emb_dim=emb_dim, context_dim=dim, head_dim=head_dim, dropout_rate=dropout)
        compute = dict(rngs=rngs, dtype=dtype, remat=remat, attention=attention, attention_chunk=attention_chunk)

        def block(cin: int, cout: int, level: int) -> UNetBlock:
            """A res block; at the lowest level followed by the attention layers and the FFN the config asks for."""
            at_lowest = level == lowest
            return imagen_block(
                cin,
                cout,
                self_attention=self_attention and at_lowest,
                cross_attention=cross_attention and at_lowest,
                ffn_mult=ffn_mult if at_lowest else 0,
                **settings,
                **compute,
            )

        self.time_embed = TimeEmbedding(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.lowres_time_embed = TimeEmbedding(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.init_text_conditioning(text_dim, dim, emb_dim, head_dim=head_dim, rngs=rngs, dtype=dtype)

        self.input_conv = conv(2 * in_channels, dim, rngs=rngs, dtype=dtype)
        ch = dim
        downsamples, down = [], []
        for level, (width, n) in enumerate(zip(widths, num_res_blocks)):
            if level == 0 and full_res_first_level:
                downsamples.append(conv(ch, width, rngs=rngs, dtype=dtype))
            else:
                downsamples.append(Downsample(ch, out_channels=width, rngs=rngs, dtype=dtype))
            down.append(nnx.List([block(width, width, level) for _ in range(n)]))
            ch = width
        self.downsamples = nnx.List(downsamples)
        self.down = nnx.List(down)

        up, upsamples = [], []
        for level in reversed(range(len(widths))):
            width = widths[level]
            first_in = width if level == lowest else 2 * width  # + the skip from the way down
            blocks = [block(first_in, width, level)]
            blocks += [block(width, width, level) for _ in range(num_res_blocks[level] - 1)]
            up.append(nnx.List(blocks))
            target = widths[level - 1] if level > 0 else dim
            if level == 0 and full_res_first_level:
                upsamples.append(conv(width, target, rngs=rngs, dtype=dtype))
            else:
                upsamples.append(Upsample(width, out_channels=target, rngs=rngs, dtype=dtype))
        self.up = nnx.List(up)
        self.upsamples = nnx.List(upsamples)

        # in float32, as unet.py's (x0 amplifies the prediction's rounding at high noise)
        self.out_norm = GroupNorm(2 * dim, rngs=rngs, dtype=jnp.float32)
        self.out_conv = conv(2 * dim, out_channels, rngs=rngs, dtype=jnp.float32, zero_init=True)

    def _check_inputs(self, x: Array, lowres: Array) -> None:
        if x.shape[-1] != self.in_channels or lowres.shape[-1] != self.in_channels:
            raise ValueError(
                f"x {x.shape} and lowres {lowres.shape} must both have in_channels={self.in_channels} channels"
            )
        ratio = (self.image_size, self.lowres_size)
        for axis in (1, 2):
            if x.shape[axis] * self.lowres_size != lowres.shape[axis] * self.image_size:
                raise ValueError(
                    f"lowres {lowres.shape} does not match x {x.shape}: this model upsamples "
                    f"lowres_size {ratio[1]} -> image_size {ratio[0]} and needs that ratio"
                )

    def __call__(
        self,
        x: Array,
        t: Array,
        text: Array,
        text_mask: Array,
        drop_text: Array | None = None,
        dropout_key: Array | None = None,
        *,
        lowres: Array,
        lowres_t: Array,
    ) -> Array:
        """Predicts [B, H, W, out_channels] float32 from noisy images x [B, H, W, C] at times t [B]
        in [0, 1], T5 tokens text [B, L, text_dim] with mask [B, L] (True = valid), the
        (noise-augmented) low-res image lowres [B, h, w, C] in [-1, 1] at its own size and its
        augmentation time lowres_t [B] in [0, 1].

        drop_text [B] bool selects the examples conditioned on the learned null text instead
        (classifier-free guidance); dropout_key enables dropout (None = deterministic).
        """
        context = self.text_context(text, text_mask, drop_text)
        return self.denoise(x, t, context, dropout_key, lowres=lowres, lowres_t=lowres_t)

    def blocks_in_call_order(self) -> list[UNetBlock]:
        """The blocks that may cross-attend, in the order `denoise` calls them."""
        return [*itertools.chain.from_iterable(self.down), *itertools.chain.from_iterable(self.up)]

    def denoise(
        self, x: Array, t: Array, context: TextContext, dropout_key: Array | None = None, *, lowres: Array,
        lowres_t: Array,
    ) -> Array:  # fmt: skip
        """`__call__` with the text's part given (`text_context`), as a sampler reuses it at every step."""
        self._check_inputs(x, lowres)
        emb = self.time_embed(t) + self.lowres_time_embed(lowres_t) + context.pooled
        calls = BlockCalls(emb, context.per_block(), context.mask, dropout_key, self.remat)

        cond = upsample_lowres(lowres, x.shape[1:3])
        h = constrain(self.input_conv(constrain(jnp.concatenate([x.astype(jnp.float32), cond], -1).astype(self.dtype))))
        skips = [h]
        for downsample, blocks in zip(self.downsamples, self.down):
            h = calls.layer(downsample, h)
            for blk in blocks:
                h = calls.block(blk, h)
            skips.append(h)
        skips.pop()  # the lowest level turns straight around

        for i, (blocks, upsample) in enumerate(zip(self.up, self.upsamples)):
            if i > 0:
                h = constrain(jnp.concatenate([h, skips.pop() * SKIP_SCALE], axis=-1))
            for blk in blocks:
                h = calls.block(blk, h)
            h = calls.layer(upsample, h)

        h = constrain(jnp.concatenate([h, skips.pop() * SKIP_SCALE], axis=-1))
        h = constrain(self.out_conv(self.out_norm(h, silu=True)))
        return h.astype(jnp.float32)


def _validate(
    image_size: int,
    lowres_size: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: tuple[int, ...],
    ffn_mult: int,
    dropout: float,
    full_res_first_level: bool = False,
) -> None:
    if not channel_mults:
        raise ValueError("config.model.channel_mults must not be empty")
    if len(num_res_blocks) != len(channel_mults):
        raise ValueError(
            f"config.model.num_res_blocks {num_res_blocks} needs one entry per level of "
            f"config.model.channel_mults {channel_mults}"
        )
    if min(num_res_blocks) < 1:
        raise ValueError(f"config.model.num_res_blocks must all be >= 1, got {num_res_blocks}")
    halvings = len(channel_mults) - int(full_res_first_level)
    if image_size % 2**halvings:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**{halvings} "
            f"({halvings} levels of config.model.channel_mults halve it)"
        )
    if lowres_size < 1 or image_size % lowres_size or image_size == lowres_size:
        raise ValueError(
            f"config.model.lowres_size {lowres_size} must divide image_size {image_size} and be "
            f"smaller (a super-resolution stage upsamples)"
        )
    if ffn_mult < 0:
        raise ValueError(f"config.model.ffn_mult must be >= 0 (0 = no FFN), got {ffn_mult}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.model.dropout must be in [0, 1), got {dropout}")


def _as_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        raise ValueError(f"config.model.{name} must be a tuple (one entry per level), got {value}")
    return tuple(int(v) for v in value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"config.model.{name} must be True or False, got {value!r}")
    return value


def default_config() -> ml_collections.ConfigDict:
    """The Efficient U-Net's `config.model` fields with the paper's 64->256 values (configs/sr256.py)."""
    c = ml_collections.ConfigDict()
    c.kind = KIND
    c.dim = 128  # width of the full-resolution input conv; the conditioning embedding is 4 * dim wide
    c.channel_mults = (1, 2, 4, 8)  # widths dim * mult per level; every level halves the resolution
    c.num_res_blocks = (2, 4, 8, 8)  # residual blocks per level (one entry per level), mirrored on the way up
    c.self_attention = True  # self-attention over the lowest level's pixels (the paper's 1024 stage: False)
    c.cross_attention = True  # text cross-attention at the lowest level
    c.ffn_mult = 2  # feed-forward after the lowest level's attention, hidden ffn_mult * width (0 = none)
    c.head_dim = 128  # channels per attention head
    c.dropout = 0.0  # dropout in residual blocks while training
    c.in_channels = 3
    c.out_channels = 3
    c.lowres_size = 64  # side of the low-res conditioning image at data.image_size (64 for 64->256)
    c.full_res_first_level = False  # True: residual blocks at full resolution too (tiny CPU models need them)
    return c


def _constructor_args(model_cfg: ModelConfig) -> dict:
    fields = read_fields(model_cfg, kind=KIND, builder="build_sr_unet", required=MODEL_FIELDS, optional=OPTIONAL_FIELDS)
    return dict(
        lowres_size=int(fields["lowres_size"]),
        dim=int(fields["dim"]),
        channel_mults=_as_tuple("channel_mults", fields["channel_mults"]),
        num_res_blocks=_as_tuple("num_res_blocks", fields["num_res_blocks"]),
        self_attention=_as_bool("self_attention", fields["self_attention"]),
        cross_attention=_as_bool("cross_attention", fields["cross_attention"]),
        ffn_mult=int(fields["ffn_mult"]),
        head_dim=int(fields["head_dim"]),
        dropout=float(fields["dropout"]),
        in_channels=int(fields["in_channels"]),
        out_channels=int(fields["out_channels"]),
        full_res_first_level=_as_bool("full_res_first_level", fields["full_res_first_level"]),
    )


def check_config(model_cfg: ModelConfig, *, image_size: int) -> None:
    """Raises ValueError naming the first `config.model` field that build_sr_unet would refuse, without building."""
    a = _constructor_args(model_cfg)
    _validate(
        image_size,
        a["lowres_size"],
        a["channel_mults"],
        a["num_res_blocks"],
        a["ffn_mult"],
        a["dropout"],
        a["full_res_first_level"],
    )


build_sr_unet = builder(EfficientUNet, _constructor_args, "build_sr_unet")
