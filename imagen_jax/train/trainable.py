"""Which parameters a run trains (config.train.trainable, and LoRA's adapters); the others are frozen: the step
computes no gradient for them, the optimizer keeps no state for them and neither updates nor weight decay nor the
EMA moves them.

A parameter's path is its keys in the params pure dict joined by '/', as exports name their tensors:
'down/0/1/cross_attn/q/kernel', 'text_proj/bias', 'mid/res/conv1/kernel' (LoRA adapters: '.../q/lora_down' and
'.../q/lora_up'). train.trainable holds regular expressions matched with re.search (anywhere in the path; anchor
with ^ and $): a parameter trains when one matches. Empty: every parameter trains, or with LoRA only the adapters
(patterns then add parameters that train whole beside them). FROZEN_PARAMS (IF's null_text) never train.

The train state splits its params into two nested dicts (`split`), the trained ones and the frozen ones, and
differentiates and optimizes only the first; `combine` puts them back together.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from imagen_jax.stage import lora
from imagen_jax.stage.model import FROZEN_PARAMS


def trained_paths(config: ml_collections.ConfigDict, params: Any) -> frozenset[str]:
    """The paths of `params` (arrays, shapes or shardings; LoRA's adapters included) that the run trains; a pattern
    of train.trainable that matches no parameter is a ConfigError naming it."""
    everything = list(lora.named(params))
    paths = [p for p in everything if p.split("/")[0] not in FROZEN_PARAMS]
    adapters = {p for p in paths if p.endswith((lora.DOWN, lora.UP))}
    patterns = tuple(config.train.trainable)
    if not patterns:
        # A full run keeps optimizer moments for FROZEN_PARAMS too (the step never moves them): the state's layout
        # since the first checkpoints, so that runs saved before trainable subsets existed resume.
        return frozenset(adapters or everything)
    chosen = set(adapters) | lora.matching(paths, patterns, "train.trainable", "parameter")
    return frozenset(chosen)


def split(tree: Any, trained: frozenset[str], prefix: str = "") -> tuple[dict, dict]:
    """(the leaves at `trained` paths, the others), each a nested dict without empty branches."""
    on, off = {}, {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            a, b = split(value, trained, path)
            if a:
                on[key] = a
            if b:
                off[key] = b
        elif path in trained:
            on[key] = value
        else:
            off[key] = value
    return on, off


def combine(a: dict, b: dict) -> dict:
    """The nested dict with the leaves of both (the inverse of `split`)."""
    merged = dict(a)
    for key, value in b.items():
        merged[key] = combine(merged[key], value) if key in merged else value
    return merged


def describe(config: ml_collections.ConfigDict, params: Any) -> str:
    """One log line: how many parameters (and tensors) train, and of how many."""
    trained = trained_paths(config, params)
    sizes = {p: math.prod(leaf.shape) for p, leaf in lora.named(params).items()}
    count, total = sum(sizes[p] for p in trained), sum(sizes.values())
    return (
        f"trainable: {count:,} of {total:,} parameters ({100 * count / total:.2f}%) in {len(trained)} of "
        f"{len(sizes)} tensors; the others are frozen (no gradient, no optimizer state)"
    )
