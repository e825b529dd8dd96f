"""Shard file listing: globs, brace patterns, lists, comma-separated strings and list files, local or gs://.

img2dataset names shards `00000.tfrecord`, `00001.tfrecord`, ..., so configs naturally say
`gs://bucket/cc12m/{00000..01242}.tfrecord`. `tf.io.gfile.glob` knows `*`, `?` and `[...]` but not braces,
so braces are expanded here (bash semantics: `{a,b}` alternatives, `{0..12}` ranges, zero padding kept when an
endpoint is written with leading zeros) before each piece is globbed. A pattern ending in `.txt` is a list
file: one path or pattern per line (blank lines and `#` comments skipped; relative entries are relative to
the list file's folder), e.g. the shards that survived a cleaning pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from imagen_jax.errors import DataError, MissingError

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Splits on `sep` outside braces, so `a/{0,1}.tfrecord,b/*.tfrecord` gives two patterns."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _range_items(lo_text: str, hi_text: str) -> list[str]:
    lo, hi = int(lo_text), int(hi_text)
    padded = any(t.lstrip("-").startswith("0") and len(t.lstrip("-")) > 1 for t in (lo_text, hi_text))
    width = max(len(lo_text), len(hi_text)) if padded else 0
    step = 1 if hi >= lo else -1
    return [f"{n:0{width}d}" for n in range(lo, hi + step, step)]


def expand_braces(pattern: str) -> list[str]:
    """Expands `{a,b}` alternatives and `{lo..hi}` numeric ranges (nested braces allowed), in order."""
    open_at = pattern.find("{")
    if open_at < 0:
        if "}" in pattern:
            raise DataError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    depth = 0
    for close_at in range(open_at, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[close_at], 0)
        if depth == 0:
            break
    else:
        raise DataError(f"unbalanced '{{' in shard pattern {pattern!r}")
    head, body, tail = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    match = _RANGE.match(body)
    if match:
        choices = _range_items(*match.groups())
    else:
        choices = [c for alt in _split_top_level(body) for c in expand_braces(alt)]
        if len(choices) < 2:
            raise DataError(f"brace group {{{body}}} in shard pattern {pattern!r} is neither a,b nor lo..hi")
    return [e for choice in choices for e in expand_braces(head + choice + tail)]


def _patterns(spec: str | Sequence[str]) -> list[str]:
    if isinstance(spec, str):
        items = _split_top_level(spec)
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise TypeError(f"shard spec must be a string or a list of strings, got {type(spec).__name__}")
    patterns = [p.strip() for p in items if isinstance(p, str) and p.strip()]
    if len(patterns) != len(items) or not patterns:
        raise DataError(f"shard spec {spec!r} holds an empty or non-string pattern")
    return patterns


def list_shards(spec: str | Sequence[str]) -> list[str]:
    """Returns the sorted, de-duplicated shard files that `spec` names.

    `spec` is one pattern, a comma-separated string of patterns, or a list of patterns; each pattern may use
    braces and glob wildcards. Every pattern must match at least one file, so a typo in one of several
    patterns fails loudly instead of silently training on less data.
    """
    import tensorflow as tf  # Deferred: listing is the only TF use here and TF import costs seconds.

    files: set[str] = set()
    for pattern in _patterns(spec):
        if pattern.endswith(".txt"):
            files.update(list_shards(_read_list_file(pattern)))
            continue
        matched = [f for piece in expand_braces(pattern) for f in tf.io.gfile.glob(piece)]
        if not matched:
            raise MissingError(f"no shard files match {pattern!r}")
        files.update(matched)
    return sorted(files)


def _read_list_file(path: str) -> list[str]:
    """The entries of a shard list file, relative ones resolved against its folder."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "r") as f:
            lines = f.read().splitlines()
    except (tf.errors.OpError, UnicodeDecodeError) as e:
        raise MissingError(f"cannot read shard list file {path!r}: {str(e).splitlines()[0]}") from None
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise DataError(f"shard list file {path!r} lists no files")
    return [e if e.startswith("/") or "://" in e else f"{folder}/{e}" for e in entries]
