"""Shard files -> this process's endless, seeded, numbered stream of undecoded records.

Epoch e of process p is fixed by (seed, p, e): the order of its files (a stateless shuffle), the deterministic
interleave of their records and the record shuffle all act on undecoded bytes, and each element is numbered by
its position in the epoch, so a stream can be rebuilt and skipped to any position without decoding anything.
Each shard contributes its records and then one marker element saying whether it was read to its end.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from imagen_jax.errors import DataError

# Shards read side by side (the interleave's cycle). tf.data's parallel interleave also opens the next
# 2 x CYCLE_FILES shards ahead of need, so at most MAX_OPEN_FILES are open at once (measured in
# tests/test_data_memory.py), whatever the number of shards.
CYCLE_FILES = 16
MAX_OPEN_FILES = 3 * CYCLE_FILES
# TFRecord framing around each payload: length (8), length CRC (4), data CRC (4).
_RECORD_OVERHEAD = 16
# Stream element kinds: a record, or the marker a shard's reader emits after its last record.
RECORD, SHARD_OK, SHARD_DAMAGED, SHARD_UNREADABLE = 0, 1, 2, 3


def _readable_size(path: tf.Tensor) -> np.int64:
    """Byte size of a shard file, or -1 (with a one-line warning naming it) when it cannot be read."""
    name = path.numpy().decode()
    try:
        with tf.io.gfile.GFile(name, "rb") as f:
            f.read(1)
        return np.int64(tf.io.gfile.stat(name).length)
    except (tf.errors.OpError, OSError) as e:
        print(
            f"data: warning: cannot read shard {name} ({type(e).__name__}: {str(e).splitlines()[0]}); skipped",
            flush=True,
        )
        return np.int64(-1)


def shard_records(path: tf.Tensor) -> tf.data.Dataset:
    """The records of one shard, then one marker element saying whether the shard was read to its end.

    TFRecordDataset moves past a file on a read error, so `ignore_errors` ends the shard at its damage;
    comparing the bytes read with the file size tells a damaged shard from a complete one. An unreadable
    file is never opened (a TFRecordDataset retrying a missing file under ignore_errors would spin).
    """
    size = tf.py_function(_readable_size, [path], tf.int64)
    records = tf.data.TFRecordDataset(path).take(tf.where(size < 0, tf.constant(0, tf.int64), -1)).ignore_errors()
    records = records.map(lambda r: {"record": r, "kind": tf.constant(RECORD, tf.int64)})
    marker = tf.data.Dataset.from_tensors({"record": path, "kind": tf.constant(SHARD_OK, tf.int64)})

    def check(total: tf.Tensor, element: dict) -> tuple[tf.Tensor, dict]:
        total += tf.cast(tf.strings.length(element["record"]) + _RECORD_OVERHEAD, tf.int64) * tf.cast(
            element["kind"] == RECORD, tf.int64
        )
        kind = element["kind"]
        kind = tf.where((kind == SHARD_OK) & (size < 0), tf.constant(SHARD_UNREADABLE, tf.int64), kind)
        kind = tf.where((kind == SHARD_OK) & (total != size), tf.constant(SHARD_DAMAGED, tf.int64), kind)
        message = tf.strings.join(
            [
                "data: warning: shard ",
                path,
                " is truncated or has a corrupt record after ",
                tf.strings.as_string(total),
                " of ",
                tf.strings.as_string(size),
                " bytes; the records before the damage were read",
            ]
        )
        tf.cond(kind == SHARD_DAMAGED, lambda: tf.print(message, output_stream=sys.stdout), tf.no_op)
        return total, {"record": element["record"], "kind": kind}

    return records.concatenate(marker).scan(tf.constant(0, tf.int64), check)


def mix_seed(*values: int | tf.Tensor) -> tf.Tensor:
    """A 63-bit seed from several integers (graph-safe), so per-epoch seeds differ without collisions."""
    seed = tf.constant(0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF, tf.int64)
    for v in values:
        seed = tf.bitwise.bitwise_xor(seed * 31 + 0x632BE5AB, tf.cast(v, tf.int64))
    return tf.math.floormod(seed, 2**62)


def epoch_stream(
    files: list[str], process_seed: int, epoch: tf.Tensor, shuffle_buffer: int, parallel: int
) -> tf.data.Dataset:
    """Epoch `epoch` of this process: its files in a seeded order, records interleaved and shuffled, as
    undecoded bytes numbered by their position in the epoch."""
    order = tf.random.experimental.stateless_shuffle(
        tf.constant(files), seed=tf.stack([tf.constant(process_seed, tf.int64), epoch])
    )
    open_files = min(len(files), CYCLE_FILES)
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        shard_records,
        cycle_length=open_files,
        num_parallel_calls=min(parallel, open_files) if parallel > 0 else tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.shuffle(shuffle_buffer, seed=mix_seed(process_seed, epoch))
    return ds.enumerate().map(lambda index, e: {**e, "epoch": epoch, "index": index})


def process_files(files: list[str], seed: int, process_index: int, process_count: int) -> list[str]:
    """Returns this process's disjoint share of the files, after a seeded shuffle shared by all processes."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, process_count={process_count})")
    order = np.random.default_rng(seed).permutation(len(files))
    mine = [files[i] for i in order[process_index::process_count]]
    if not mine:
        raise DataError(
            f"process {process_index} of {process_count} gets no shard files: only {len(files)} files for "
            f"{process_count} processes; write more, smaller shards"
        )
    return mine
