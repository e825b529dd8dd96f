"""DeepFloyd IF's pixel U-Net (stage I, 64x64 from text; stage II, 4x super-resolution), numerically diffusers'
`UNet2DConditionModel` with IF's settings, so IF's published weights load into it (`params_from_diffusers`).

The architecture (ADM with BigGAN resampling, as deep-floyd/IF trained it):
  * time: sinusoid of the integer step round(t * 1000) (cos half first) -> Linear -> GELU -> Linear, width
    ``time_embedding_dim``; stage II adds the same kind of embedding of its noise level ``lowres_t`` (diffusers'
    class embedding 'timestep'); both add the text-time embedding: LayerNorm -> attention pooling of the RAW T5
    states (query = mean over tokens + a learned position embedding, over [query; tokens]; no output projection)
    -> Linear -> LayerNorm; ``time_embedding_act_fn`` 'gelu' (stage II) applies GELU to the sum once;
  * text for attention: Linear(encoder_hid_dim -> cross_attention_dim) of the T5 states (diffusers' text_proj);
  * residual blocks (layers.ResBlock): GroupNorm -> GELU -> conv -> GroupNorm * (1 + scale) + shift -> GELU -> conv,
    FiLM from Linear(GELU(emb)) (or emb itself: ``resnet_skip_time_act``), 1x1 skip conv when widths differ, output
    divided by ``resnet_out_scale_factor``; levels resample with such blocks (2x2 average pool / nearest x2 on both
    paths) instead of resampling convs;
  * attention (layers.AddedKVAttention) after every residual block of a SimpleCrossAttn level and in the middle:
    the image positions attend to the GroupNorm'ed, projected text and to themselves in one softmax, heads of
    ``attention_head_dim`` channels;
  * down levels keep every block's and the downsampler's output as skips (plus the input conv's); the middle is
    block -> attention -> block; up levels run ``layers_per_block + 1`` blocks on [h, skip], then upsample;
    head: GroupNorm -> GELU -> conv3x3.
IF has no mask anywhere: every one of the 77 T5 positions, padding included, counts (``text_mask`` is accepted for
the common model interface and ignored). Its unconditional input is the T5 encoding of the empty prompt, held in
the parameter ``null_text`` [1, text_length, encoder_hid_dim] (stage/if_folder.py fills it from the encoder; it is
read through stop_gradient, so training never moves it) and used for the rows of ``drop_text``.

``config.model`` fields (diffusers' names where diffusers has the field; `config_from_diffusers` reads them from a
unet/config.json and refuses what this model does not implement):

  kind                           "if_unet".
  in_channels, out_channels      3 / 6 for stage I, 6 / 6 for stage II (x_t and the upscaled low-res image in;
                                 eps and the variance interpolation out).
  block_out_channels             width per level; every level but the last halves the resolution.
  layers_per_block               residual blocks per level on the way down (tuple, one per level; an int means the
                                 same for every level); the way up runs one more per level.
  down_block_types               per level: ResnetDownsampleBlock2D (residual blocks only) or
                                 SimpleCrossAttnDownBlock2D (each block followed by attention).
  up_block_types                 per level, deepest first: ResnetUpsampleBlock2D or SimpleCrossAttnUpBlock2D.
  mid_block_type                 UNetMidBlock2DSimpleCrossAttn.
  attention_head_dim             channels per attention head (diffusers' name; IF: 64).
  cross_attention_dim            width of the projected text the attention layers read.
  encoder_hid_dim                width of the T5 states (4096 for T5-XXL); must equal the stage's text width.
  addition_embed_type_num_heads  heads of the text-time attention pooling.
  class_embed_type               None (stage I) or "timestep" (stage II: the noise level of the low-res input).
  only_cross_attention           per level (down order): attention over the text alone, without the image's own
                                 keys and values; mid_block_only_cross_attention: the same for the middle.
  cross_attention_norm           "group_norm" (the text is GroupNorm'ed, 32 groups, before its keys and values)
                                 or None.
  resnet_skip_time_act           FiLM from the embedding itself instead of GELU of it (stage II).
  resnet_out_scale_factor        residual blocks' outputs are divided by it (stage II: 1/0.7071);
  mid_block_scale_factor         the middle blocks' (diffusers keeps it apart).
  time_embedding_dim             width of the conditioning embedding (None: 4 * block_out_channels[0]).
  time_embedding_act_fn          None or "gelu": applied to the summed embedding before the blocks.
  norm_num_groups, norm_eps      the residual blocks' and the head's GroupNorm (attention GroupNorms use eps 1e-5).
  text_length                    tokens of the text and of null_text (77: diffusers' IF pipelines).
  dropout                        dropout in residual blocks while training.
  lowres_size                    optional, stage II only: side of the low-res image at the stage's image size (the
                                 stage's SR geometry; the model itself takes the low-res image already upscaled).

Built from scratch (not loaded), every residual block's last conv, every attention's output projection and the output
conv start at zero (the project's convention: blocks start as the identity); loaded weights replace all of it.

With IF-I-XL's config (`default_config`) the model has 4,304,695,110 parameters as diffusers counts them, IF-II-L's
1,243,277,190; null_text adds text_length * encoder_hid_dim.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from imagen_jax.errors import WeightsError
from imagen_jax.models.config_fields import ModelConfig, builder, read_fields
from imagen_jax.models.layers import (
    AddedKVAttention,
    BlockCalls,
    GroupNorm,
    LayerNorm,
    MeanQueryAttentionPool,
    ResBlock,
    TimeEmbedding,
    UNetBlock,
    activate,
    check_remat,
    conv,
    dense,
    param,
)
from imagen_jax.models.text_context import TextContext, block_context, broadcast_context
from imagen_jax.parallel.activations import constrain

Array = jax.Array

KIND = "if_unet"
TIMESTEPS = 1000  # IF is a discrete-time model trained on 1000 integer steps
ACTIVATION = "gelu"  # exact (erf) GELU everywhere, as IF's act_fn
RESNET_DOWN, ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
RESNET_UP, ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
MID_BLOCK = "UNetMidBlock2DSimpleCrossAttn"
CROSS_NORM_GROUPS = 32  # diffusers' Attention(cross_attention_norm_num_groups=32): not a config field
TEXT_KERNEL_NAMES = ("text_embed", "channels_out")  # kernels reading the T5 width

OPTIONAL_FIELDS = {"lowres_size": None}


def default_config() -> ml_collections.ConfigDict:
    """IF-I-XL's `config.model` (stage I, 4.3B parameters); IF-II-L's differs where the comments say."""
    c = ml_collections.ConfigDict()
    c.kind = KIND
    c.in_channels = 3  # IF-II: 6 (x_t and the upscaled low-res image)
    c.out_channels = 6  # eps and the learned variance's interpolation
    c.block_out_channels = (704, 1408, 2112, 2816)  # IF-II-L: 160, 320, 640, 960, 1280
    c.layers_per_block = (3, 3, 3, 3)  # IF-II-L: 2, 2, 3, 5, 5
    c.down_block_types = (RESNET_DOWN, ATTN_DOWN, ATTN_DOWN, ATTN_DOWN)  # IF-II-L: 3 x Resnet, 2 x SimpleCrossAttn
    c.up_block_types = (ATTN_UP, ATTN_UP, ATTN_UP, RESNET_UP)  # deepest first
    c.mid_block_type = MID_BLOCK
    c.attention_head_dim = 64  # channels per head
    c.cross_attention_dim = 2816  # IF-II-L: 1280
    c.encoder_hid_dim = 4096  # T5-XXL
    c.addition_embed_type_num_heads = 64
    c.class_embed_type = None  # IF-II: "timestep" (the noise level of the low-res input)
    c.only_cross_attention = (False, False, False, False)
    c.mid_block_only_cross_attention = False
    c.cross_attention_norm = "group_norm"
    c.resnet_skip_time_act = False  # IF-II: True
    c.resnet_out_scale_factor = 1.0  # IF-II: 1 / 0.7071
    c.mid_block_scale_factor = 1.0  # IF-II: 1 / 0.7071
    c.time_embedding_dim = None  # None: 4 * block_out_channels[0]; IF-II-L: 1280
    c.time_embedding_act_fn = None  # IF-II: "gelu"
    c.norm_num_groups = 32
    c.norm_eps = 1e-5
    c.text_length = 77
    c.dropout = 0.0
    c.lowres_size = None  # IF-II: the low-res side at the stage's image size (64 at 256)
    return c


MODEL_FIELDS = tuple(k for k in default_config() if k not in ("kind", *OPTIONAL_FIELDS))


def is_super_resolution(model_cfg: ModelConfig) -> bool:
    """Whether this config is a super-resolution stage (it conditions on a low-res image and its noise level)."""
    return dict(model_cfg).get("class_embed_type") == "timestep"


# ----------------------------------------------------------------------------------------------------------------
# The layout: one description of the blocks, read by the model's constructor and by the weight mapping.


@dataclasses.dataclass(frozen=True)
class _Res:
    in_channels: int
    out_channels: int
    resample: str | None = None
    output_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Block:
    res: _Res
    attention: bool
    self_attention: bool


@dataclasses.dataclass(frozen=True)
class _Level:
    blocks: tuple[_Block, ...]
    resample: _Res | None


@dataclasses.dataclass(frozen=True)
class _Layout:
    down: tuple[_Level, ...]
    mid: _Block
    mid_res: _Res
    up: tuple[_Level, ...]
    emb_dim: int


def _layout(a: Mapping[str, Any]) -> _Layout:
    """The blocks of the U-Net `a` (constructor arguments) describes, in diffusers' order and widths."""
    widths, n = a["block_out_channels"], len(a["block_out_channels"])
    scale = a["resnet_out_scale_factor"]
    ch = widths[0]
    skips = [ch]
    down = []
    for level, width in enumerate(widths):
        attn = a["down_block_types"][level] == ATTN_DOWN
        self_attn = not a["only_cross_attention"][level]
        blocks = []
        for _ in range(a["layers_per_block"][level]):
            blocks.append(_Block(_Res(ch, width, output_scale=scale), attn, self_attn))
            ch = width
            skips.append(ch)
        resample = _Res(ch, ch, "down", scale) if level < n - 1 else None
        if resample is not None:
            skips.append(ch)
        down.append(_Level(tuple(blocks), resample))
    mid_scale = a["mid_block_scale_factor"]
    mid = _Block(_Res(ch, ch, output_scale=mid_scale), True, not a["mid_block_only_cross_attention"])
    mid_res = _Res(ch, ch, output_scale=mid_scale)
    up = []
    for i, width in enumerate(reversed(widths)):
        level = n - 1 - i
        attn = a["up_block_types"][i] == ATTN_UP
        self_attn = not a["only_cross_attention"][level]
        blocks = []
        for _ in range(a["layers_per_block"][level] + 1):
            blocks.append(_Block(_Res(ch + skips.pop(), width, output_scale=scale), attn, self_attn))
            ch = width
        up.append(_Level(tuple(blocks), _Res(ch, ch, "up", scale) if level > 0 else None))
    emb_dim = a["time_embedding_dim"] or 4 * widths[0]
    return _Layout(tuple(down), mid, mid_res, tuple(up), emb_dim)


# ----------------------------------------------------------------------------------------------------------------
# The model.


class TextTimeEmbedding(nnx.Module):
    """T5 states [B, L, D] -> LayerNorm -> mean-query attention pooling -> Linear -> LayerNorm: [B, emb_dim]
    (diffusers' TextTimeEmbedding)."""

    def __init__(self, text_dim: int, emb_dim: int, *, num_heads: int, rngs: nnx.Rngs, dtype: jnp.dtype):
        self.norm1 = LayerNorm(text_dim, rngs=rngs, dtype=dtype)
        self.pool = MeanQueryAttentionPool(
            text_dim, num_heads=num_heads, rngs=rngs, dtype=dtype, kernel_names=TEXT_KERNEL_NAMES
        )
        self.proj = dense(text_dim, emb_dim, rngs=rngs, dtype=dtype, kernel_names=TEXT_KERNEL_NAMES)
        self.norm2 = LayerNorm(emb_dim, rngs=rngs, dtype=dtype)

    def __call__(self, text: Array) -> Array:
        return self.norm2(self.proj(self.pool(self.norm1(text))))


class IFLevel(nnx.Module):
    """One resolution of the U-Net: its blocks and the residual block that resamples after them (None: none)."""

    def __init__(self, blocks: list[UNetBlock], resample: ResBlock | None):
        self.blocks = nnx.List(blocks)
        self.resample = resample


class IFUNet(nnx.Module):
    """DeepFloyd IF's U-Net: ``model(x, t, text, text_mask, drop_text, dropout_key, lowres=, lowres_t=)``, or, with
    the text's part computed once (``context = model.text_context(text, text_mask, precompute=True)``),
    ``model.denoise(x, t, context, dropout_key, lowres=..., lowres_t=...)``."""

    def __init__(
        self,
        *,
        image_size: int,
        text_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        attention: str = "dot_product",
        attention_chunk: int = 1024,
        **fields: Any,
    ):
        _validate(fields, image_size=image_size)
        if text_dim != fields["encoder_hid_dim"]:
            raise ValueError(
                f"config.model.encoder_hid_dim {fields['encoder_hid_dim']} does not match the text width {text_dim}"
            )
        check_remat(remat)
        self.dtype = dtype
        self.remat = remat
        self.in_channels = fields["in_channels"]
        self.text_length = fields["text_length"]
        self.super_resolution = fields["class_embed_type"] == "timestep"
        self.levels = len(fields["block_out_channels"])
        self.embedding_activation = fields["time_embedding_act_fn"]
        layout = _layout(fields)
        c0, emb_dim, cross_dim = fields["block_out_channels"][0], layout.emb_dim, fields["cross_attention_dim"]

        common = dict(rngs=rngs, dtype=dtype)

        time_embedding = dict(activation=ACTIVATION, discrete_steps=TIMESTEPS, **common)
        self.time_embed = TimeEmbedding(c0, emb_dim, **time_embedding)
        self.class_embed = TimeEmbedding(c0, emb_dim, **time_embedding) if self.super_resolution else None
        self.text_proj = dense(text_dim, cross_dim, kernel_names=TEXT_KERNEL_NAMES, **common)
        self.text_time = TextTimeEmbedding(
            text_dim, emb_dim, num_heads=fields["addition_embed_type_num_heads"], rngs=rngs, dtype=dtype
        )
        self.null_text = param(
            rngs, nnx.initializers.normal(1.0), (1, self.text_length, text_dim), (None, None, "text_embed")
        )

        def res_block(spec: _Res) -> ResBlock:
            """diffusers' ResnetBlock2D (scale_shift): layers.ResBlock with IF's options."""
            return ResBlock(
                spec.in_channels,
                spec.out_channels,
                emb_dim,
                dropout_rate=fields["dropout"],
                activation=ACTIVATION,
                resample=spec.resample,
                output_scale=spec.output_scale,
                skip_time_act=fields["resnet_skip_time_act"],
                groups=fields["norm_num_groups"],
                eps=fields["norm_eps"],
                **common,
            )

        def block(spec: _Block) -> UNetBlock:
            """A residual block, then (a SimpleCrossAttn level's, the middle's) attention to the text and the image."""
            res = res_block(spec.res)
            attn = None
            if spec.attention:
                attn = AddedKVAttention(
                    spec.res.out_channels,
                    cross_dim,
                    head_dim=fields["attention_head_dim"],
                    groups=fields["norm_num_groups"],
                    context_norm=fields["cross_attention_norm"] == "group_norm",
                    context_groups=CROSS_NORM_GROUPS,
                    self_attention=spec.self_attention,
                    attention=attention,
                    attention_chunk=attention_chunk,
                    **common,
                )
            return UNetBlock(res, cross_attn=attn, remat=remat)

        def level(spec: _Level) -> IFLevel:
            blocks = [block(b) for b in spec.blocks]
            return IFLevel(blocks, None if spec.resample is None else res_block(spec.resample))

        self.conv_in = conv(self.in_channels, c0, **common)
        self.down = nnx.List([level(spec) for spec in layout.down])
        self.mid = block(layout.mid)
        self.mid_res = res_block(layout.mid_res)
        self.up = nnx.List([level(spec) for spec in layout.up])
        # in float32, as unet.py's (x0 amplifies the prediction's rounding at high noise)
        head = dict(rngs=rngs, dtype=jnp.float32)
        self.out_norm = GroupNorm(c0, eps=fields["norm_eps"], groups=fields["norm_num_groups"], **head)
        self.out_conv = conv(c0, fields["out_channels"], zero_init=True, **head)

    def __call__(
        self,
        x: Array,
        t: Array,
        text: Array,
        text_mask: Array,
        drop_text: Array | None = None,
        dropout_key: Array | None = None,
        lowres: Array | None = None,
        lowres_t: Array | None = None,
    ) -> Array:
        """Predicts [B, H, W, out_channels] float32 (eps, then the variance interpolation) from noisy images x
        [B, H, W, C] at times t [B] in [0, 1] (the step round(t * 1000)), T5 states text [B, L, encoder_hid_dim] of
        all L positions (``text_mask`` is ignored: IF attends to padding too); stage II also takes the low-res image
        ``lowres`` [B, H, W, C'] already upscaled to x's size and noise-augmented, concatenated after x, and its noise
        level ``lowres_t`` [B] in [0, 1]. drop_text [B] bool selects the rows conditioned on null_text instead
        (classifier-free guidance); dropout_key enables dropout (None = deterministic)."""
        del text_mask
        context = self.text_context(text, None, drop_text)
        return self.denoise(x, t, context, dropout_key, lowres=lowres, lowres_t=lowres_t)

    def blocks_in_call_order(self) -> list[UNetBlock]:
        """The blocks that may attend to the text, in the order `denoise` calls them."""
        return [
            *itertools.chain.from_iterable(level.blocks for level in self.down),
            self.mid,
            *itertools.chain.from_iterable(level.blocks for level in self.up),
        ]

    def text_context(
        self, text: Array, text_mask: Array | None, drop_text: Array | None = None, *, precompute: bool = False
    ) -> TextContext:
        """The text's part of a call, from T5 states [B, L, encoder_hid_dim] (``text_mask`` ignored); rows where
        ``drop_text`` is True use null_text. ``precompute``: with every attention's keys and values (sampling)
        instead of the projected tokens (training)."""
        del text_mask
        if drop_text is not None:
            if text.shape[1] != self.text_length:
                raise ValueError(
                    f"drop_text replaces text by null_text of text_length {self.text_length} tokens; "
                    f"the text has {text.shape[1]}"
                )
            null = jax.lax.stop_gradient(self.null_text[...]).astype(text.dtype)
            text = jnp.where(jnp.asarray(drop_text, bool)[:, None, None], null, text)
        return self._context(text, precompute)

    def null_text_context(self, batch: int, length: int) -> TextContext:
        """The precomputed context of null_text for `batch` rows of `length` tokens (the unconditional half of a
        guided batch): computed for one row and broadcast."""
        if length != self.text_length:
            raise ValueError(f"null_text has text_length {self.text_length} tokens; the text has {length}")
        one = self._context(jax.lax.stop_gradient(self.null_text[...]), precompute=True)
        return broadcast_context(one, batch)

    def _context(self, text: Array, precompute: bool) -> TextContext:
        """The pooled text is the text-time embedding; no mask (IF attends to every position)."""
        pooled = self.text_time(text)
        tokens = constrain(self.text_proj(text.astype(self.dtype)))
        return block_context(self.blocks_in_call_order(), pooled, None, tokens, precompute)

    def _check_inputs(self, x: Array, lowres: Array | None, lowres_t: Array | None) -> None:
        factor = 2 ** (self.levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"x {x.shape}: height and width must be multiples of 2**{self.levels - 1} = {factor}")
        if not self.super_resolution:
            if lowres is not None or lowres_t is not None:
                raise ValueError("this IF U-Net is a base stage (no class_embed_type): it takes no lowres / lowres_t")
            if x.shape[-1] != self.in_channels:
                raise ValueError(f"x {x.shape} must have in_channels={self.in_channels} channels")
            return
        if lowres is None or lowres_t is None:
            raise ValueError("this IF U-Net is a super-resolution stage: it needs lowres and lowres_t")
        if lowres.shape[:3] != x.shape[:3]:
            raise ValueError(f"lowres {lowres.shape} must be upscaled to x's batch and size {x.shape[:3]}")
        if x.shape[-1] + lowres.shape[-1] != self.in_channels:
            raise ValueError(
                f"x {x.shape} and lowres {lowres.shape} must have in_channels={self.in_channels} channels together"
            )

    def denoise(
        self,
        x: Array,
        t: Array,
        context: TextContext,
        dropout_key: Array | None = None,
        lowres: Array | None = None,
        lowres_t: Array | None = None,
    ) -> Array:
        """`__call__` with the text's part given (`text_context`), as a sampler reuses it at every step."""
        self._check_inputs(x, lowres, lowres_t)
        emb = self.time_embed(t)
        if self.class_embed is not None:
            emb = emb + self.class_embed(lowres_t)
        emb = emb + context.pooled
        if self.embedding_activation is not None:
            emb = activate(emb, self.embedding_activation)
        calls = BlockCalls(emb, context.per_block(), context.mask, dropout_key, self.remat)

        if lowres is not None:
            x = jnp.concatenate([x.astype(jnp.float32), lowres.astype(jnp.float32)], axis=-1)
        h = constrain(self.conv_in(constrain(x.astype(self.dtype))))
        skips = [h]
        for level in self.down:
            for blk in level.blocks:
                h = calls.block(blk, h)
                skips.append(h)
            if level.resample is not None:
                h = calls.res(level.resample, h)
                skips.append(h)

        h = calls.block(self.mid, h)
        h = calls.res(self.mid_res, h)

        for level in self.up:
            for blk in level.blocks:
                h = constrain(jnp.concatenate([h, skips.pop()], axis=-1))
                h = calls.block(blk, h)
            if level.resample is not None:
                h = calls.res(level.resample, h)

        h = constrain(self.out_conv(self.out_norm(h, activation=ACTIVATION)))
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Config.


def _per_level(name: str, value: Any, levels: int, kind: Callable[[Any], Any]) -> tuple:
    values = (value,) * levels if isinstance(value, (int, bool)) else tuple(value)
    if len(values) != levels:
        raise ValueError(f"config.model.{name} {values} needs one entry per level ({levels})")
    return tuple(kind(v) for v in values)


def _optional(kind: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else kind(value)


def _constructor_args(model_cfg: ModelConfig) -> dict[str, Any]:
    fields = read_fields(model_cfg, kind=KIND, builder="build_if_unet", required=MODEL_FIELDS, optional=OPTIONAL_FIELDS)
    widths = tuple(int(w) for w in fields["block_out_channels"])
    if not widths:
        raise ValueError("config.model.block_out_channels must not be empty")
    levels = len(widths)
    return dict(
        in_channels=int(fields["in_channels"]),
        out_channels=int(fields["out_channels"]),
        block_out_channels=widths,
        layers_per_block=_per_level("layers_per_block", fields["layers_per_block"], levels, int),
        down_block_types=_per_level("down_block_types", fields["down_block_types"], levels, str),
        up_block_types=_per_level("up_block_types", fields["up_block_types"], levels, str),
        mid_block_type=str(fields["mid_block_type"]),
        attention_head_dim=int(fields["attention_head_dim"]),
        cross_attention_dim=int(fields["cross_attention_dim"]),
        encoder_hid_dim=int(fields["encoder_hid_dim"]),
        addition_embed_type_num_heads=int(fields["addition_embed_type_num_heads"]),
        class_embed_type=_optional(str, fields["class_embed_type"]),
        only_cross_attention=_per_level("only_cross_attention", fields["only_cross_attention"], levels, bool),
        mid_block_only_cross_attention=bool(fields["mid_block_only_cross_attention"]),
        cross_attention_norm=_optional(str, fields["cross_attention_norm"]),
        resnet_skip_time_act=bool(fields["resnet_skip_time_act"]),
        resnet_out_scale_factor=float(fields["resnet_out_scale_factor"]),
        mid_block_scale_factor=float(fields["mid_block_scale_factor"]),
        time_embedding_dim=_optional(int, fields["time_embedding_dim"]),
        time_embedding_act_fn=_optional(str, fields["time_embedding_act_fn"]),
        norm_num_groups=int(fields["norm_num_groups"]),
        norm_eps=float(fields["norm_eps"]),
        text_length=int(fields["text_length"]),
        dropout=float(fields["dropout"]),
        lowres_size=_optional(int, fields["lowres_size"]),
    )


def _validate(a: Mapping[str, Any], *, image_size: int) -> None:
    """Raises ValueError naming the first field of constructor arguments `a` this model cannot build."""
    widths, levels = a["block_out_channels"], len(a["block_out_channels"])
    for name, allowed in (("down_block_types", (RESNET_DOWN, ATTN_DOWN)), ("up_block_types", (RESNET_UP, ATTN_UP))):
        for value in a[name]:
            if value not in allowed:
                raise ValueError(f"config.model.{name}: {value!r} is not one of {', '.join(allowed)}")
    if a["mid_block_type"] != MID_BLOCK:
        raise ValueError(f"config.model.mid_block_type {a['mid_block_type']!r} is not {MID_BLOCK!r}")
    if image_size % 2 ** (levels - 1):
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**{levels - 1} "
            f"(config.model.block_out_channels has {levels} levels)"
        )
    if min(a["layers_per_block"]) < 1:
        raise ValueError(f"config.model.layers_per_block must all be >= 1, got {a['layers_per_block']}")
    groups = a["norm_num_groups"]
    layout = _layout(a)
    for spec in (*layout.down, *layout.up):
        for res in (*(b.res for b in spec.blocks), spec.resample):
            if res is not None and (res.in_channels % groups or res.out_channels % groups):
                raise ValueError(
                    f"config.model.norm_num_groups {groups} does not divide the block widths "
                    f"{res.in_channels} -> {res.out_channels}"
                )
    head = a["attention_head_dim"]
    for level, width in enumerate(widths):
        attends = a["down_block_types"][level] == ATTN_DOWN or a["up_block_types"][levels - 1 - level] == ATTN_UP
        if (attends or level == levels - 1) and width % head:
            raise ValueError(f"config.model.attention_head_dim {head} does not divide the attention width {width}")
    if a["cross_attention_norm"] not in (None, "group_norm"):
        raise ValueError(f"config.model.cross_attention_norm {a['cross_attention_norm']!r} is not 'group_norm' or None")
    if a["cross_attention_norm"] == "group_norm" and a["cross_attention_dim"] % CROSS_NORM_GROUPS:
        raise ValueError(
            f"config.model.cross_attention_dim {a['cross_attention_dim']} is not a multiple of the "
            f"{CROSS_NORM_GROUPS} groups of its GroupNorm (cross_attention_norm 'group_norm')"
        )
    if a["encoder_hid_dim"] % a["addition_embed_type_num_heads"]:
        raise ValueError(
            f"config.model.addition_embed_type_num_heads {a['addition_embed_type_num_heads']} does not divide "
            f"encoder_hid_dim {a['encoder_hid_dim']}"
        )
    if a["class_embed_type"] not in (None, "timestep"):
        raise ValueError(f"config.model.class_embed_type {a['class_embed_type']!r} is not 'timestep' or None")
    if a["time_embedding_act_fn"] not in (None, ACTIVATION):
        raise ValueError(f"config.model.time_embedding_act_fn {a['time_embedding_act_fn']!r} is not 'gelu' or None")
    if a["time_embedding_dim"] is not None and a["time_embedding_dim"] < 1:
        raise ValueError(f"config.model.time_embedding_dim must be >= 1, got {a['time_embedding_dim']}")
    if widths[0] % 2:
        raise ValueError(f"config.model.block_out_channels[0] {widths[0]} must be even (the sinusoid's width)")
    for name in ("resnet_out_scale_factor", "mid_block_scale_factor"):
        if a[name] <= 0:
            raise ValueError(f"config.model.{name} must be > 0, got {a[name]}")
    if a["text_length"] < 1:
        raise ValueError(f"config.model.text_length must be >= 1, got {a['text_length']}")
    if not 0.0 <= a["dropout"] < 1.0:
        raise ValueError(f"config.model.dropout must be in [0, 1), got {a['dropout']}")
    lowres = a["lowres_size"]
    if a["class_embed_type"] == "timestep":
        if a["in_channels"] < 2:
            raise ValueError(f"config.model.in_channels {a['in_channels']}: a super-resolution stage takes x + lowres")
        if lowres is not None and (lowres < 1 or image_size % lowres or lowres >= image_size):
            raise ValueError(
                f"config.model.lowres_size {lowres} must divide image_size {image_size} and be smaller "
                f"(a super-resolution stage upsamples)"
            )
    elif lowres is not None:
        raise ValueError(f"config.model.lowres_size {lowres}: only a super-resolution stage (class_embed_type "
                         f"'timestep') has one")  # fmt: skip


def check_config(model_cfg: ModelConfig, *, image_size: int) -> None:
    """Raises ValueError naming the first `config.model` field that build_if_unet would refuse, without building."""
    _validate(_constructor_args(model_cfg), image_size=image_size)


build_if_unet = builder(IFUNet, _constructor_args, "build_if_unet")


# ----------------------------------------------------------------------------------------------------------------
# diffusers' unet/config.json.

# diffusers' UNet2DConditionModel defaults: a field a config.json leaves out has this value.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Fields that must have one of these values (the first is IF's).
DIFFUSERS_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("gelu",),
    "resnet_time_scale_shift": ("scale_shift",),
    "addition_embed_type": ("text",),
    "encoder_hid_dim_type": ("text_proj", None),  # None with encoder_hid_dim set: diffusers uses text_proj
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "num_attention_heads": (None,),
    "num_class_embeds": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "class_embed_type": (None, "timestep"),
    "time_embedding_act_fn": (None, "gelu"),
    "cross_attention_norm": ("group_norm", None),
}
# Read and ignored: they configure blocks IF does not use (Transformer2D cross-attention, conv downsamplers, other
# embedding types) or the pipeline (sample_size), so they change nothing here.
DIFFUSERS_IGNORED = (
    "sample_size",
    "downsample_padding",
    "dual_cross_attention",
    "use_linear_projection",
    "upcast_attention",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def _refuse(field: str, value: Any, if_value: Any) -> ValueError:
    return ValueError(f"{field} {value!r} is not supported (IF uses {if_value!r})")


def config_from_diffusers(unet_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config.model` (kind if_unet) from a diffusers unet/config.json dict. A field with a value this model does not
    implement (a Stable Diffusion U-Net's block types, act_fn 'silu', ...) is a one-line ValueError naming the field
    and value; a field left out has diffusers' default; fields that configure nothing here pass
    (DIFFUSERS_IGNORED, and the bookkeeping of _class_name 'UNet2DConditionModel', _diffusers_version, ...)."""
    name = unet_config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise _refuse("_class_name", name, "UNet2DConditionModel")
    d = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in unet_config.items() if not k.startswith("_")}}
    for field, allowed in (("down_block_types", (RESNET_DOWN, ATTN_DOWN)), ("up_block_types", (ATTN_UP, RESNET_UP))):
        for value in d[field]:
            if value not in allowed:
                raise ValueError(f"{field} {value!r} is not supported (IF uses {' / '.join(allowed)})")
    if d["mid_block_type"] != MID_BLOCK:
        raise _refuse("mid_block_type", d["mid_block_type"], MID_BLOCK)
    for field, allowed in DIFFUSERS_FIXED.items():
        if d[field] not in allowed:
            raise _refuse(field, d[field], allowed[0])
    if d["encoder_hid_dim"] is None:
        raise _refuse("encoder_hid_dim", None, 4096)
    if d["norm_num_groups"] is None:
        raise _refuse("norm_num_groups", None, 32)
    for field in ("attention_head_dim", "cross_attention_dim"):
        if not isinstance(d[field], int):
            raise ValueError(f"{field} {d[field]!r} per level is not supported (IF uses one int)")
    levels = len(d["block_out_channels"])
    only_cross = d["only_cross_attention"]
    mid_only_cross = d["mid_block_only_cross_attention"]
    if mid_only_cross is None:  # diffusers: follows only_cross_attention when that is one bool, else False
        mid_only_cross = only_cross if isinstance(only_cross, bool) else False
    c = default_config()
    c.in_channels = int(d["in_channels"])
    c.out_channels = int(d["out_channels"])
    c.block_out_channels = tuple(int(w) for w in d["block_out_channels"])
    c.layers_per_block = _per_level("layers_per_block", d["layers_per_block"], levels, int)
    c.down_block_types = tuple(d["down_block_types"])
    c.up_block_types = tuple(d["up_block_types"])
    c.mid_block_type = d["mid_block_type"]
    c.attention_head_dim = int(d["attention_head_dim"])
    c.cross_attention_dim = int(d["cross_attention_dim"])
    c.encoder_hid_dim = int(d["encoder_hid_dim"])
    c.addition_embed_type_num_heads = int(d["addition_embed_type_num_heads"])
    c.class_embed_type = d["class_embed_type"]
    c.only_cross_attention = _per_level("only_cross_attention", only_cross, levels, bool)
    c.mid_block_only_cross_attention = bool(mid_only_cross)
    c.cross_attention_norm = d["cross_attention_norm"]
    c.resnet_skip_time_act = bool(d["resnet_skip_time_act"])
    c.resnet_out_scale_factor = float(d["resnet_out_scale_factor"])
    c.mid_block_scale_factor = float(d["mid_block_scale_factor"])
    c.time_embedding_dim = _optional(int, d["time_embedding_dim"])
    c.time_embedding_act_fn = d["time_embedding_act_fn"]
    c.norm_num_groups = int(d["norm_num_groups"])
    c.norm_eps = float(d["norm_eps"])
    c.dropout = float(d["dropout"])
    args = _constructor_args(c)  # the structure (one entry per level, widths, heads) holds at any image size
    _validate(args, image_size=2 ** (levels - 1))
    return c


# ----------------------------------------------------------------------------------------------------------------
# diffusers' weights.

Path = tuple[str | int, ...]
# How a diffusers tensor becomes ours: conv (O, I, kh, kw) -> (kh, kw, I, O), linear (out, in) -> (in, out).
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "linear": lambda a: a.T,
    "copy": lambda a: a,
}


class DiffusersWeight(NamedTuple):
    """One diffusers tensor: its ``name`` in the state dict, its ``shape`` there, our parameter ``path`` (keys into
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) and the ``transform`` (a TRANSFORMS key) between them."""

    name: str
    shape: tuple[int, ...]
    path: Path
    transform: str


def _linear(name: str, path: Path, fan_in: int, fan_out: int, bias: bool = True) -> list[DiffusersWeight]:
    weights = [DiffusersWeight(f"{name}.weight", (fan_out, fan_in), (*path, "kernel"), "linear")]
    return weights + ([DiffusersWeight(f"{name}.bias", (fan_out,), (*path, "bias"), "copy")] if bias else [])


def _conv(name: str, path: Path, fan_in: int, fan_out: int, size: int = 3) -> list[DiffusersWeight]:
    return [
        DiffusersWeight(f"{name}.weight", (fan_out, fan_in, size, size), (*path, "kernel"), "conv"),
        DiffusersWeight(f"{name}.bias", (fan_out,), (*path, "bias"), "copy"),
    ]


def _norm(name: str, path: Path, channels: int) -> list[DiffusersWeight]:
    return [
        DiffusersWeight(f"{name}.weight", (channels,), (*path, "scale"), "copy"),
        DiffusersWeight(f"{name}.bias", (channels,), (*path, "bias"), "copy"),
    ]


def _resnet_weights(name: str, path: Path, spec: _Res, emb_dim: int) -> list[DiffusersWeight]:
    cin, cout = spec.in_channels, spec.out_channels
    weights = [
        *_norm(f"{name}.norm1", (*path, "norm1"), cin),
        *_conv(f"{name}.conv1", (*path, "conv1"), cin, cout),
        *_linear(f"{name}.time_emb_proj", (*path, "film"), emb_dim, 2 * cout),
        *_norm(f"{name}.norm2", (*path, "norm2"), cout),
        *_conv(f"{name}.conv2", (*path, "conv2"), cout, cout),
    ]
    return weights + (_conv(f"{name}.conv_shortcut", (*path, "skip"), cin, cout, 1) if cin != cout else [])


def _attention_weights(name: str, path: Path, block: _Block, cross_dim: int, norm: bool) -> list[DiffusersWeight]:
    ch = block.res.out_channels
    weights = [
        *_norm(f"{name}.group_norm", (*path, "norm"), ch),
        *(_norm(f"{name}.norm_cross", (*path, "context_norm"), cross_dim) if norm else []),
        *_linear(f"{name}.to_q", (*path, "q"), ch, ch),
        *(_linear(f"{name}.to_k", (*path, "k"), ch, ch) if block.self_attention else []),
        *(_linear(f"{name}.to_v", (*path, "v"), ch, ch) if block.self_attention else []),
        *_linear(f"{name}.add_k_proj", (*path, "add_k"), cross_dim, ch),
        *_linear(f"{name}.add_v_proj", (*path, "add_v"), cross_dim, ch),
        *_linear(f"{name}.to_out.0", (*path, "out"), ch, ch),
    ]
    return weights


def diffusers_weights(model_cfg: ModelConfig) -> list[DiffusersWeight]:
    """Every tensor of diffusers' state dict for this config, with our parameter it fills (all but null_text, which
    has no diffusers tensor: stage/if_folder.py fills it from T5)."""
    a = _constructor_args(model_cfg)
    layout = _layout(a)
    c0, emb, text, cross = a["block_out_channels"][0], layout.emb_dim, a["encoder_hid_dim"], a["cross_attention_dim"]
    norm = a["cross_attention_norm"] == "group_norm"
    w = [
        *_conv("conv_in", ("conv_in",), a["in_channels"], c0),
        *_linear("time_embedding.linear_1", ("time_embed", "fc1"), c0, emb),
        *_linear("time_embedding.linear_2", ("time_embed", "fc2"), emb, emb),
    ]
    if a["class_embed_type"] == "timestep":
        w += _linear("class_embedding.linear_1", ("class_embed", "fc1"), c0, emb)
        w += _linear("class_embedding.linear_2", ("class_embed", "fc2"), emb, emb)
    w += _linear("encoder_hid_proj", ("text_proj",), text, cross)
    w += _norm("add_embedding.norm1", ("text_time", "norm1"), text)
    w += [DiffusersWeight("add_embedding.pool.positional_embedding", (1, text), ("text_time", "pool", "position"),
                          "copy")]  # fmt: skip
    for proj, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        w += _linear(f"add_embedding.pool.{proj}", ("text_time", "pool", ours), text, text)
    w += _linear("add_embedding.proj", ("text_time", "proj"), text, emb)
    w += _norm("add_embedding.norm2", ("text_time", "norm2"), emb)
    for side, ours, resampler, levels in (
        ("down_blocks", "down", "downsamplers", layout.down),
        ("up_blocks", "up", "upsamplers", layout.up),
    ):
        for i, level in enumerate(levels):
            for j, block in enumerate(level.blocks):
                path = (ours, i, "blocks", j)
                w += _resnet_weights(f"{side}.{i}.resnets.{j}", (*path, "res"), block.res, emb)
                if block.attention:
                    w += _attention_weights(f"{side}.{i}.attentions.{j}", (*path, "cross_attn"), block, cross, norm)
            if level.resample is not None:
                w += _resnet_weights(f"{side}.{i}.{resampler}.0", (ours, i, "resample"), level.resample, emb)
        if side == "down_blocks":
            w += _resnet_weights("mid_block.resnets.0", ("mid", "res"), layout.mid.res, emb)
            w += _attention_weights("mid_block.attentions.0", ("mid", "cross_attn"), layout.mid, cross, norm)
            w += _resnet_weights("mid_block.resnets.1", ("mid_res",), layout.mid_res, emb)
    w += _norm("conv_norm_out", ("out_norm",), c0)
    w += _conv("conv_out", ("out_conv",), c0, a["out_channels"])
    return w


def iter_params_from_diffusers(
    model_cfg: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    names: Iterable[str] | None = None,
) -> Iterator[tuple[Path, np.ndarray]]:
    """(our parameter path, float32 array) for each diffusers tensor, read one at a time with ``get_tensor(name)``.
    ``names``: the tensors the source holds; when given, a missing one and any it holds that this config has no
    place for are one-line WeightsErrors. A tensor of the wrong shape is one too."""
    weights = diffusers_weights(model_cfg)
    if names is not None:
        names = set(names)
        missing = [w.name for w in weights if w.name not in names]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightsError(f"missing tensor '{missing[0]}'{more}")
        unexpected = sorted(names - {w.name for w in weights})
        if unexpected:
            shown = ", ".join(f"'{n}'" for n in unexpected[:3])
            more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
            raise WeightsError(f"unexpected tensor(s) {shown}{more}: the U-Net config has no place for them")
    for w in weights:
        array = np.asarray(get_tensor(w.name))
        if tuple(array.shape) != w.shape:
            raise WeightsError(f"tensor '{w.name}' has shape {tuple(array.shape)}, expected {w.shape}")
        yield w.path, np.ascontiguousarray(TRANSFORMS[w.transform](array.astype(np.float32)))


def params_from_diffusers(
    model_cfg: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    names: Iterable[str] | None = None,
) -> dict:
    """Our parameters (a nested dict of float32 arrays, `nnx.to_pure_dict` of the model's params minus null_text)
    from diffusers' state dict, read tensor by tensor (see `iter_params_from_diffusers`)."""
    params: dict = {}
    for path, array in iter_params_from_diffusers(model_cfg, get_tensor, names):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return params


def unexpected_tensors(model_cfg: ModelConfig, names: Sequence[str]) -> list[str]:
    """The tensors of ``names`` that this config has no parameter for (sorted)."""
    return sorted(set(names) - {w.name for w in diffusers_weights(model_cfg)})
