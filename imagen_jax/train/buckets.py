"""Token bucketing (config.text.buckets): the T5 inside the train step encodes a batch at the smallest bucket length
that holds the batch's longest caption, not at text.max_length.

Captions are tokenised at max_length (as without buckets: a caption longer than that keeps max_length - 1 tokens and
EOS), which gives each caption's length from its mask; ids and mask are then cut to the bucket, dropping only
padding. The step is jitted with the batch's shapes, so each bucket length a run meets is one more compile: a few
buckets, few compiles. The loss is the same as at max_length, since T5's and the U-Nets' attention ignore masked
positions (IF's U-Net attends to padding: setup.validate refuses buckets there). The longest caption is that of the
global batch, which every process must agree on before it makes its part (parallel/agree.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np


def lengths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The text lengths a batch may have: text.buckets, then text.max_length (the one length when buckets are off)."""
    max_length = int(config.text.max_length)
    return tuple(int(b) for b in config.text.buckets if b < max_length) + (max_length,)


def bucket(longest: int, allowed: Sequence[int]) -> int:
    """The smallest of `allowed` (increasing, the last one max_length) that holds `longest` tokens."""
    return next((length for length in allowed if length >= longest), allowed[-1])


def longest(mask: np.ndarray) -> int:
    """The most tokens (EOS included) of any caption in a tokenised batch's mask [B, L]."""
    return int(mask.sum(axis=1).max(initial=0))


def cut(ids: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [B, max_length] cut to [B, length]; they hold only padding after `length`."""
    return ids[:, :length], mask[:, :length]
