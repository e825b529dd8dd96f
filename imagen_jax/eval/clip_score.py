"""CLIP score (Hessel et al. 2021) as torchmetrics computes it: 100 x the cosine of each image's and caption's CLIP
embeddings, averaged over the pairs, and the average clamped at 0.

torchmetrics documents the clamp per pair, max(100 cos, 0), but both `clip_score` and `CLIPScore.compute` clamp
the mean (`max(sum / n, 0)`); the two agree whenever no pair has a negative cosine, as for trained CLIP models
on real pairs. The mean is clamped here too, so scores match torchmetrics'. Per-pair scores are returned
unclamped: a multi-host evaluation adds them up on every host, sums the sums and counts, then calls `mean_score`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.eval.clip import CLIP


def pair_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """Unit-length embeddings [B, D] x2 -> 100 cos(image_i, text_i), float32 [B]; pure and jit-able."""
    return 100.0 * jnp.sum(image_embeds * text_embeds, axis=-1)


def mean_score(total: float, count: int) -> float:
    """The reported CLIP score from the sum of `count` per-pair scores: max(total / count, 0)."""
    if count <= 0:
        raise ValueError("CLIP score of no pairs")
    return max(float(total) / count, 0.0)


def clip_score(model: CLIP, images: np.ndarray, captions: Sequence[str]) -> tuple[float, np.ndarray]:
    """uint8 images [N, H, W, 3] and their N captions -> (CLIP score, per-pair scores float32 [N]) on one host."""
    if len(images) != len(captions):
        raise ValueError(f"CLIP score needs one caption per image, got {len(images)} images, {len(captions)} captions")
    scores = np.asarray(pair_scores(model.embed_images(images), model.embed_texts(captions)))
    return mean_score(scores.sum(dtype=np.float64), len(scores)), scores
