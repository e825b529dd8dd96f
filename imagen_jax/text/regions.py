"""A box of a tensor read from its file: only the bytes the box covers, in as few reads as the gaps allow.

A pod host holds a few slices of each T5 weight (its devices' shards); reading whole tensors made every one of
64 hosts read the whole checkpoint. `host_region` is the smallest box holding this host's slices of a sharded
array; `read_region` reads that box of a C-contiguous tensor stored at a byte offset of a file (a safetensors
payload, a PyTorch storage): one read per run of contiguous bytes, with runs closer than `gap` bytes read as one
(a local file: a page; a URL, where each read is a request: 1 MiB).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from imagen_jax.errors import WeightsError

Region = tuple[tuple[int, int], ...]  # [start, stop) per dimension

LOCAL_GAP = 4096
URL_GAP = 1 << 20


def whole(shape: tuple[int, ...]) -> Region:
    return tuple((0, n) for n in shape)


def host_region(indices: Iterable[tuple[slice, ...]], shape: tuple[int, ...]) -> Region:
    """The smallest box of an array of `shape` that holds every slice in `indices` (e.g. a sharding's
    `devices_indices_map(shape)` values for this process's devices)."""
    box = [(n, 0) for n in shape]
    for index in indices:
        for d, (s, n) in enumerate(zip(index, shape)):
            start, stop, _ = s.indices(n)
            box[d] = (min(box[d][0], start), max(box[d][1], stop))
    return tuple((a, b) if a < b else (0, 0) for a, b in box)


def local_index(index: tuple[slice, ...], region: Region, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`index` (into the whole array of `shape`) as an index into the array of `region` alone."""
    out = []
    for s, (a, _), n in zip(index, region, shape):
        start, stop, _ = s.indices(n)
        out.append(slice(start - a, stop - a))
    return tuple(out)


def _runs(shape: tuple[int, ...], region: Region) -> tuple[np.ndarray, int]:
    """Element offsets (increasing) of the contiguous runs that make up `region` of a C-contiguous `shape`, and
    the elements in each: the dimensions after the last partly taken one are whole, so each run spans them."""
    if not shape:
        return np.zeros(1, np.int64), 1
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    k = len(shape) - 1
    while k > 0 and region[k] == (0, shape[k]):
        k -= 1
    run = (region[k][1] - region[k][0]) * strides[k]
    starts = np.array([region[k][0] * strides[k]], np.int64)
    for d in range(k - 1, -1, -1):
        a, b = region[d]
        starts = np.add.outer(np.arange(a, b, dtype=np.int64) * strides[d], starts).ravel()
    return starts, run


def read_region(
    file: BinaryIO | Any, base: int, dtype: np.dtype, shape: tuple[int, ...], region: Region, gap: int, name: str
) -> tuple[np.ndarray, int]:
    """`region` of the C-contiguous tensor of `shape` and `dtype` whose first byte is at `base` in `file` (seekable),
    as a new array, and the bytes read for it. `name` (file and tensor) is for the error a short read gives."""
    lengths = tuple(b - a for a, b in region)
    if math.prod(lengths) == 0:
        return np.empty(lengths, dtype), 0
    item = dtype.itemsize
    starts, run = _runs(shape, region)
    ends = starts + run
    breaks = np.nonzero((starts[1:] - ends[:-1]) * item >= gap)[0] + 1
    out = np.empty(lengths, dtype)
    flat, read = out.reshape(-1), 0
    for first, last in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(starts)]])):
        begin, size = int(starts[first]), int(ends[last - 1] - starts[first])
        file.seek(base + begin * item)
        data = file.read(size * item)
        if len(data) != size * item:
            raise WeightsError(f"{name}: truncated: {len(data)} of {size * item} bytes at offset {base + begin * item}")
        read += len(data)
        span = np.frombuffer(data, dtype)
        if size == (last - first) * run:  # the runs are back to back
            flat[first * run : last * run] = span
            continue
        for j in range(first, last):
            offset = int(starts[j]) - begin
            flat[j * run : (j + 1) * run] = span[offset : offset + run]
    return out, read
