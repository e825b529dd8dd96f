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
                    the downsample / input conv (unless ``resample_skips`` is False).
  attn_resolutions  feature-map sizes (e.g. 32, 16, 8 at image size 64) where every res block is
                    followed by self-attention and text cross-attention (``attn_placement``: or only
                    each level's last). The middle block
                    (res, self-attn, cross-attn, res) always has attention.
  head_dim          channels per attention head (heads = width / head_dim; ADM uses 64).
  dropout           dropout rate inside res blocks, active only when a ``dropout_key`` is passed.
  in_channels       image channels in (3).
  out_channels      channels predicted (3 for eps / v prediction).
  kind              optional; must be ``"unet"`` (the training code dispatches on it; the SR
                    stages' ``"efficient_unet"`` is built by ``build_sr_unet``).
  attn_placement    optional, ``"every_block"`` (default, ADM): attention follows every res block of
                    an attention level; ``"level_end"``: only the last res block of such a level, on
                    each path (imagen-pytorch's layout: one transformer block per level).
  resample_width    optional, False (default, ADM): resampling keeps the width and the first res
                    block of a level changes it; True: the resampling convs change it (imagen-pytorch's
                    layout): the downsample ending a level widens to that level's width, so each
                    resolution's way down runs one level narrower (the first level at ``dim``; the
                    middle block widens to the last level's width), and the upsample ending a level on
                    the way up narrows to the next level's width.
  resample_skips    optional, True (default, ADM): the input conv's and every downsample's outputs
                    are skips too, so the way up has ``num_res_blocks + 1`` blocks per level; False:
                    only res blocks' outputs are skips and the way up has ``num_res_blocks`` per level
                    (imagen-pytorch's layout).
  ffn_mult          optional, 0 (default: none): a per-pixel feed-forward layer (hidden width
                    ``ffn_mult * width``) after each attention, completing a transformer block
                    (imagen-pytorch's; the Efficient U-Net's field of the same name).

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

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax.models.config_fields import ModelConfig, builder, read_fields
from imagen_jax.models.layers import (
    BlockCalls,
    Downsample,
    GroupNorm,
    ResBlock,
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
# Absent from a config: ADM's layout. The other values give imagen-pytorch's (benchmarks/layouts.py).
OPTIONAL_FIELDS = {"attn_placement": "every_block", "resample_width": False, "resample_skips": True, "ffn_mult": 0}
ATTN_PLACEMENTS = ("every_block", "level_end")
EMB_MULT = 4
KIND = "unet"


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
        attn_placement: str = "every_block",
        resample_width: bool = False,
        resample_skips: bool = True,
        ffn_mult: int = 0,
    ):
        sizes = _sizes(image_size, channel_mults)
        _validate(image_size, channel_mults, num_res_blocks, attn_resolutions, dropout, attn_placement, ffn_mult)
        check_remat(remat)
        self.dtype = dtype
        self.remat = remat
        self.resample_skips = resample_skips
        emb_dim = EMB_MULT * dim
        settings = dict(emb_dim=emb_dim, context_dim=dim, head_dim=head_dim, dropout_rate=dropout)
        compute = dict(rngs=rngs, dtype=dtype, remat=remat, attention=attention, attention_chunk=attention_chunk)

        def block(cin: int, cout: int, attn: bool) -> UNetBlock:
            """A res block, then (where ``attn``) self-attention, text cross-attention and the FFN if any."""
            after_res = dict(self_attention=attn, cross_attention=attn, ffn_mult=ffn_mult if attn else 0)
            return imagen_block(cin, cout, **after_res, **settings, **compute)

        self.time_embed = TimeEmbedding(dim, emb_dim, rngs=rngs, dtype=dtype)
        self.init_text_conditioning(text_dim, dim, emb_dim, head_dim=head_dim, rngs=rngs, dtype=dtype)

        self.input_conv = conv(in_channels, dim, rngs=rngs, dtype=dtype)
        skip_channels = [dim] if resample_skips else []
        ch = dim
        down, downsamples = [], []

        def attends(size: int, index: int, count: int) -> bool:
            return size in attn_resolutions and (attn_placement == "every_block" or index == count - 1)

        for level, (mult, size) in enumerate(zip(channel_mults, sizes)):
            blocks = []
            width = ch if resample_width else dim * mult
            for index in range(num_res_blocks):
                blocks.append(block(ch, width, attends(size, index, num_res_blocks)))
                ch = width
                skip_channels.append(ch)
            down.append(nnx.List(blocks))
            if level < len(channel_mults) - 1:
                out = dim * mult if resample_width else ch
                downsamples.append(Downsample(ch, out_channels=out, rngs=rngs, dtype=dtype))
                ch = out
                if resample_skips:
                    skip_channels.append(ch)
        self.down = nnx.List(down)
        self.downsamples = nnx.List(downsamples)

        mid = dim * channel_mults[-1]
        self.mid = block(ch, mid, attn=True)
        self.mid_res = ResBlock(mid, mid, emb_dim, dropout_rate=dropout, rngs=rngs, dtype=dtype)
        ch = mid

        up, upsamples = [], []
        for level in reversed(range(len(channel_mults))):
            blocks = []
            up_blocks = num_res_blocks + int(resample_skips)
            for index in range(up_blocks):
                attn = attends(sizes[level], index, up_blocks)
                out = dim * channel_mults[level]
                blocks.append(block(ch + skip_channels.pop(), out, attn))
                ch = out
            up.append(nnx.List(blocks))
            if level > 0:
                out = dim * channel_mults[level - 1] if resample_width else ch
                upsamples.append(Upsample(ch, out_channels=out, rngs=rngs, dtype=dtype))
                ch = out
        self.up = nnx.List(up)
        self.upsamples = nnx.List(upsamples)

        # in float32 (issue 29, point 6): x0 = (x - sigma eps) / alpha amplifies eps's rounding at high noise
        self.out_norm = GroupNorm(ch, rngs=rngs, dtype=jnp.float32)
        self.out_conv = conv(ch, out_channels, rngs=rngs, dtype=jnp.float32, zero_init=True)

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
        calls = BlockCalls(emb, context.per_block(), context.mask, dropout_key, self.remat)

        h = constrain(self.input_conv(constrain(x.astype(self.dtype))))
        skips = [h] if self.resample_skips else []
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = calls.block(blk, h)
                skips.append(h)
            if level < len(self.downsamples):
                h = calls.layer(self.downsamples[level], h)
                if self.resample_skips:
                    skips.append(h)

        h = calls.block(self.mid, h)
        h = calls.res(self.mid_res, h)

        for level, blocks in enumerate(self.up):
            for blk in blocks:
                h = constrain(jnp.concatenate([h, skips.pop()], axis=-1))
                h = calls.block(blk, h)
            if level < len(self.upsamples):
                h = calls.layer(self.upsamples[level], h)

        h = constrain(self.out_conv(self.out_norm(h, silu=True)))
        return h.astype(jnp.float32)


def _sizes(image_size: int, channel_mults: tuple[int, ...]) -> list[int]:
    """The feature-map side of each level."""
    return [image_size // 2**i for i in range(len(channel_mults))]


def _validate(
    image_size: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...],
    dropout: float,
    attn_placement: str = "every_block",
    ffn_mult: int = 0,
) -> None:
    sizes = _sizes(image_size, channel_mults)
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
    if attn_placement not in ATTN_PLACEMENTS:
        raise ValueError(f"config.model.attn_placement {attn_placement!r} is not one of {', '.join(ATTN_PLACEMENTS)}")
    if ffn_mult < 0:
        raise ValueError(f"config.model.ffn_mult must be >= 0 (0 = no FFN), got {ffn_mult}")


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
    c.attn_placement = "every_block"  # every_block (ADM) | level_end (after a level's last res block only)
    c.resample_width = False  # True: down/upsampling convs change the width (a level's blocks keep what they get)
    c.resample_skips = True  # False: only res blocks' outputs are skips; the way up has num_res_blocks per level
    c.ffn_mult = 0  # feed-forward after each attention, hidden ffn_mult * width (0 = none)
    return c


def _constructor_args(model_cfg: ModelConfig) -> dict:
    fields = read_fields(model_cfg, kind=KIND, builder="build_unet", required=MODEL_FIELDS, optional=OPTIONAL_FIELDS)
    return dict(
        dim=int(fields["dim"]),
        channel_mults=tuple(int(m) for m in fields["channel_mults"]),
        num_res_blocks=int(fields["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in fields["attn_resolutions"]),
        head_dim=int(fields["head_dim"]),
        dropout=float(fields["dropout"]),
        in_channels=int(fields["in_channels"]),
        out_channels=int(fields["out_channels"]),
        attn_placement=str(fields["attn_placement"]),
        resample_width=bool(fields["resample_width"]),
        resample_skips=bool(fields["resample_skips"]),
        ffn_mult=int(fields["ffn_mult"]),
    )


def check_config(model_cfg: ModelConfig, *, image_size: int) -> None:
    """Raises ValueError naming the first `config.model` field that build_unet would refuse, without building."""
    a = _constructor_args(model_cfg)
    _validate(
        image_size,
        a["channel_mults"],
        a["num_res_blocks"],
        a["attn_resolutions"],
        a["dropout"],
        a["attn_placement"],
        a["ffn_mult"],
    )


build_unet = builder(UNet, _constructor_args, "build_unet")
