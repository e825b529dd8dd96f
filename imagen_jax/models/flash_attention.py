"""Flash attention on TPU: JAX's Pallas kernel (`jax.experimental.pallas.ops.tpu.flash_attention`) fitted to the
U-Net's attention, so neither pass materialises the [heads, queries, keys] logits.

The kernel wants [B, heads, L, D], key blocks that are multiples of 128 and query blocks that divide the query
length; masks are expressed as segment ids (a query attends to keys of its own id). So keys are padded to a
multiple of 128 with id 0, real keys get id 1 where the mask allows them and 0 where not, and all queries
get id 1; queries are padded to a multiple of their block and the padding sliced off. Every query row needs at
least one valid key (the model guarantees it: a dropped caption keeps its null token), since a row with none
would average the padding. Pallas TPU kernels lower only for TPU: `layers.attention` reaches this through
`jax.lax.platform_dependent`, and tests run it on CPU in Pallas's TPU interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

_LANES = 128  # key blocks: a multiple of the TPU's lane width
_MAX_QUERY_BLOCK = 128
_SUBLANES = 8  # query blocks: a multiple of the sublane count


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v with q [B,Lq,H,D], k/v [B,Lk,H,D], mask [B,Lk] bool (True = attend), as
    `jax.nn.dot_product_attention`; returns [B,Lq,H,D] in q's dtype."""
    b, lq, _, d = q.shape
    lk = k.shape[1]
    block_q = min(_MAX_QUERY_BLOCK, _round_up(lq, _SUBLANES))
    lq_pad, lk_pad = _round_up(lq, block_q), _round_up(lk, _LANES)
    segments = None
    if mask is not None or lk_pad != lk:  # padding and masked keys get id 0, which no query has
        valid = jnp.ones((b, lk), jnp.int32) if mask is None else mask.astype(bool).astype(jnp.int32)
        segments = pallas_flash.SegmentIds(
            q=jnp.ones((b, lq_pad), jnp.int32), kv=jnp.pad(valid, ((0, 0), (0, lk_pad - lk)))
        )

    def heads_major(x: jax.Array, length: int) -> jax.Array:  # [B,L,H,D] -> [B,H,length,D], zero padded
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).swapaxes(1, 2)

    blocks = pallas_flash.BlockSizes(
        block_q=block_q, block_k_major=_LANES, block_k=_LANES, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=_LANES, block_k_dkv=_LANES, block_q_dkv=block_q,
        block_k_major_dq=_LANES, block_k_dq=_LANES, block_q_dq=block_q,
    )  # fmt: skip
    out = pallas_flash.flash_attention(
        heads_major(q, lq_pad), heads_major(k, lk_pad), heads_major(v, lk_pad),
        segment_ids=segments, sm_scale=d**-0.5, block_sizes=blocks,
    )  # fmt: skip
    return out.swapaxes(1, 2)[:, :lq]
