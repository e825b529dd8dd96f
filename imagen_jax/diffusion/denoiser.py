"""A model as the samplers call it: the text conditioning computed once per prompt, then one call per step.

A text-conditional U-Net spends part of every call on its text (projection, norm, attention pool, each
cross-attention's keys and values) although none of it changes between sampling steps. A `Denoiser` splits the
model there: `condition` maps the text to a context pytree once, `null_condition` gives the unconditional
context of classifier-free guidance (shaped like `condition`'s, and free to ignore the text's values), and
`denoise` is the per-step call that reads the context. Any plain one-call model still samples through
`fused(apply_fn)`, whose context is the text itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.losses import ApplyFn

# (params, text [B, L, D], text_mask [B, L]) -> context: a pytree whose leaves lead with the batch.
ConditionFn = Callable[[Any, jax.Array, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """`condition(params, text, text_mask)` and `null_condition(params, text, text_mask)` -> context;
    `denoise(params, x_t, t, context, **model_kwargs)` -> prediction [B, ...]. A jit static argument of the
    samplers: keep one object per model (functions compare by identity)."""

    condition: ConditionFn
    null_condition: ConditionFn
    denoise: Callable[..., jax.Array]


@functools.cache
def fused(apply_fn: ApplyFn) -> Denoiser:
    """`apply_fn(params, x_t, t, text, text_mask, drop_text, **model_kwargs)` as a Denoiser whose context is
    (text, mask, drop_text): every step runs the whole model. One Denoiser per function, so jit caches hold."""

    def condition(params: Any, text: jax.Array, text_mask: jax.Array) -> tuple:
        return text, text_mask, jnp.zeros(text.shape[:1], bool)

    def null_condition(params: Any, text: jax.Array, text_mask: jax.Array) -> tuple:
        return text, text_mask, jnp.ones(text.shape[:1], bool)

    def denoise(params: Any, x_t: jax.Array, t: jax.Array, context: tuple, **model_kwargs: Any) -> jax.Array:
        return apply_fn(params, x_t, t, *context, **model_kwargs)

    return Denoiser(condition, null_condition, denoise)
