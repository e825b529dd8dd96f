"""Classifier-free guidance and x0 thresholding (Imagen section 2.2-2.3).

High guidance weights push the predicted x0 far outside the data range [-1, 1]; sampling then diverges or
saturates. Static clipping cuts values at +-1; dynamic thresholding rescales each image by a high
percentile of its |x0| so saturated pixels are pushed inwards instead of flattened.

Two later refinements, both off by default. A guidance interval (Kynkaanniemi et al. 2024, arXiv 2404.07724)
guides only at middle noise levels: at the noisiest steps guidance mostly costs diversity and at the cleanest
it does little. Guidance rescale (Lin et al. 2023, arXiv 2305.08891, section 3.4) scales the guided prediction
back to the standard deviation of the conditional one, which high scales inflate (over-exposed images), and
mixes that in with weight `rescale`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

THRESHOLD_MODES = ("dynamic", "static", "none")


def guided_prediction(pred_cond: jax.Array, pred_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """uncond + scale (cond - uncond): scale 1 is the plain conditional model, > 1 strengthens the text."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescaled_guidance(guided: jax.Array, pred_cond: jax.Array, rescale: float | jax.Array) -> jax.Array:
    """rescale * guided * std(pred_cond) / std(guided) + (1 - rescale) * guided, the std per example over all its
    elements; rescale 0 returns `guided` itself (bit for bit)."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(pred_cond, axis=axes, keepdims=True) / jnp.maximum(jnp.std(guided, axis=axes, keepdims=True), 1e-12)
    mixed = rescale * (guided * ratio) + (1.0 - rescale) * guided
    return jnp.where(rescale > 0, mixed, guided)


def check_guidance_interval(interval: tuple[float, float]) -> None:
    """Raises ValueError unless `interval` is (lowest, highest) log-SNR with lowest <= highest (infinite ends
    allowed: (-inf, inf) guides every step)."""
    if len(interval) != 2 or math.isnan(interval[0]) or math.isnan(interval[1]) or interval[0] > interval[1]:
        raise ValueError(
            f"guidance interval must be (lowest, highest) log-SNR with lowest <= highest, got {tuple(interval)}"
        )


def check_guidance_rescale(rescale: float) -> None:
    """Raises ValueError unless 0 <= rescale <= 1."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1] (0: off; the paper uses 0.7), got {rescale}")


def check_percentile(percentile: float) -> None:
    """Raises ValueError unless 0 < percentile <= 1 (a quantile level, not a percent)."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"thresholding percentile must be in (0, 1] (e.g. 0.995), got {percentile}")


def check_threshold_max(threshold_max: float) -> None:
    """Raises ValueError unless threshold_max >= 1 (the scale s never goes below 1)."""
    if not threshold_max >= 1.0:
        raise ValueError(f"threshold_max must be >= 1 (inf: no upper bound), got {threshold_max}")


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995, threshold_max: float = math.inf) -> jax.Array:
    """Per example: s = quantile(|x0|, percentile) clamped to [1, threshold_max]; x0 -> clip(x0, -s, s) / s.

    x0 then lies in [-1, 1]. An upper bound (DeepFloyd IF: 1.5 for stage I, 1.0 for stage II, i.e. plain
    clipping) caps how far a saturated image is shrunk; inf is Imagen's unbounded rule."""
    check_percentile(percentile)
    check_threshold_max(threshold_max)
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    if threshold_max != math.inf:
        s = jnp.minimum(s, threshold_max)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def static_clip(x0: jax.Array) -> jax.Array:
    """Clips x0 to the data range [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


def check_threshold_mode(mode: str) -> None:
    """Raises ValueError for an unknown thresholding mode (call early, before tracing)."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown thresholding mode {mode!r}; valid modes: {', '.join(THRESHOLD_MODES)}")


def threshold(
    x0: jax.Array, mode: str = "dynamic", percentile: float = 0.995, threshold_max: float = math.inf
) -> jax.Array:
    """Applies the named thresholding ('dynamic', 'static' or 'none') to an x0 estimate; `threshold_max` bounds
    the dynamic scale."""
    check_threshold_mode(mode)
    if mode == "dynamic":
        return dynamic_threshold(x0, percentile, threshold_max)
    if mode == "static":
        return static_clip(x0)
    return x0
