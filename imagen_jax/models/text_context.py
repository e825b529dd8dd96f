"""The text's part of a U-Net call, which the U-Nets share: T5 tokens projected and normalised into context tokens,
the learned null text of classifier-free guidance, the attention-pooled vector added to the timestep embedding, and
(for sampling) every cross-attention layer's keys and values. IF's U-Net reads its text its own way (if_unet.py) and
gives its blocks the same `TextContext`.

None of it depends on the noisy image or the time, so a sampler computes it once per prompt
(`TextConditioning.text_context(..., precompute=True)`, and `null_text_context` for the unconditional half of
a guided batch, which never projects the real text) and every step reuses it (`model.denoise`). Training calls
the model whole (`model(x, t, text, ...)`): each cross-attention then projects the shared context tokens inside
its block, so a rematerialised block recomputes its keys and values instead of keeping them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models.layers import AttentionPool, LayerNorm, dense, param
from imagen_jax.parallel.activations import constrain

Array = jax.Array
KeysValues = tuple[Array, Array]


class TextContext(NamedTuple):
    """What a U-Net's blocks read of the text: ``pooled`` [B, emb_dim] (added to the timestep embedding),
    ``mask`` [B, L] bool (None: the attention takes none, IF's), and either the context ``tokens`` [B, L, dim]
    that every cross-attention projects itself, or ``keys_values``: per block in call order, its cross-attention's
    (k, v) [B, L, heads, head_dim] (None for a block without one)."""

    pooled: Array
    mask: Array | None
    tokens: Array | None = None
    keys_values: tuple[KeysValues | None, ...] | None = None

    def per_block(self) -> Iterator[Array | KeysValues | None]:
        """What each block's cross-attention takes, in call order."""
        return iter(self.keys_values) if self.keys_values is not None else itertools.repeat(self.tokens)


def null_tokens(null_token: Array, length: int, dtype: jnp.dtype) -> tuple[Array, Array]:
    """The null text as context tokens [1, L, C] (the learned ``null_token`` [1, C] at position 0, zeros after)
    and its mask [1, L] (position 0 valid, so attention stays well defined)."""
    first = jnp.arange(length) == 0
    return jnp.where(first[:, None], null_token, 0.0).astype(dtype)[None], first[None]


def drop_to_null_text(context: Array, mask: Array, null_token: Array, drop_text: Array | None) -> tuple[Array, Array]:
    """Classifier-free guidance: rows where ``drop_text`` [B] is True get the null text (`null_tokens`);
    other rows, and all rows when ``drop_text`` is None, pass."""
    if drop_text is None:
        return context, mask
    null, first = null_tokens(null_token, context.shape[1], jnp.float32)
    drop = jnp.asarray(drop_text, bool)
    # chosen in float32 (exact for bfloat16 context), so null_token's gradient is summed over the batch in float32
    context = jnp.where(drop[:, None, None], null, context.astype(jnp.float32)).astype(context.dtype)
    mask = jnp.where(drop[:, None], first, mask)
    return context, mask


def block_context(
    blocks: Iterable[nnx.Module], pooled: Array, mask: Array | None, tokens: Array, precompute: bool
) -> TextContext:
    """The TextContext of context ``tokens``: the tokens themselves (training) or, with ``precompute``, the keys and
    values of each of ``blocks``' ``cross_attn`` (None or a layer with ``keys_values``), in call order (sampling)."""
    if not precompute:
        return TextContext(pooled, mask, tokens=tokens)
    keys_values = tuple(None if block.cross_attn is None else block.cross_attn.keys_values(tokens) for block in blocks)
    return TextContext(pooled, mask, keys_values=keys_values)


def broadcast_context(context: TextContext, batch: int) -> TextContext:
    """A context computed for one row, for ``batch`` rows (the null text's, the unconditional half of a guided
    batch: the same for every row)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])), context)


class TextConditioning:
    """The text path both Imagen U-Nets share, mixed into each so its parameters keep top-level names
    (text_proj, text_norm, null_text, text_pool). A model using it has ``dtype`` and lists its blocks (each
    with a ``cross_attn`` attribute, None or a CrossAttention) in call order with ``blocks_in_call_order``."""

    def init_text_conditioning(
        self, text_dim: int, dim: int, emb_dim: int, *, head_dim: int, rngs: nnx.Rngs, dtype: jnp.dtype
    ) -> None:
        self.text_proj = dense(text_dim, dim, rngs=rngs, dtype=dtype, kernel_names=("text_embed", "channels_out"))
        self.text_norm = LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.null_text = param(rngs, nnx.initializers.normal(1.0), (1, dim), (None, "channels_out"))
        self.text_pool = AttentionPool(dim, emb_dim, head_dim=head_dim, rngs=rngs, dtype=dtype)

    def text_context(
        self, text: Array, text_mask: Array, drop_text: Array | None = None, *, precompute: bool = False
    ) -> TextContext:
        """T5 tokens [B, L, text_dim] with mask [B, L] (True = valid) as the blocks read them; rows where
        ``drop_text`` is True get the null text. ``precompute``: with every cross-attention's keys and values
        (sampling) instead of the tokens (training)."""
        tokens = constrain(self.text_norm(self.text_proj(text.astype(self.dtype))))
        tokens, mask = drop_to_null_text(tokens, text_mask.astype(bool), self.null_text[...], drop_text)
        return self._context(tokens, mask, precompute)

    def null_text_context(self, batch: int, length: int) -> TextContext:
        """The precomputed context of the null text for `batch` rows of `length` tokens (the unconditional half
        of a guided batch): computed for one row, from the learned null token alone, and broadcast."""
        one = self._context(*null_tokens(self.null_text[...], length, self.dtype), precompute=True)
        return broadcast_context(one, batch)

    def _context(self, tokens: Array, mask: Array, precompute: bool) -> TextContext:
        pooled = self.text_pool(tokens, mask)
        return block_context(self.blocks_in_call_order(), pooled, mask, tokens, precompute)
