"""tf.data input pipeline over img2dataset TFRecord shards: deterministic, resumable, robust to bad data.

Each process reads its own disjoint subset of shard FILES and makes an endless stream of its own epochs.
Epoch e of process p is fixed by (seed, p, e): the order of its files, the interleaving of their records
and the record shuffle all use seeded randomness applied to undecoded bytes. Every raw record gets a
position (epoch, index within the epoch) that travels with it into the batch, so the position after a batch
is known exactly. `make_dataset(..., start=(epoch, index))` rebuilds the stream and skips that many
undecoded records of the epoch (reading bytes, not decoding images), so a resumed run sees exactly the
examples an uninterrupted run would have seen. Random crops are seeded by the same position.
`reader.py` makes the stream of undecoded records, `decode.py` turns each into an example or a skip reason;
this module puts them together, counts, crops and batches.

Web-scraped shards always hold some bad data. Nothing here crashes or silently stops the stream:
  * a shard file that cannot be opened is skipped (`shards_unreadable`); a shard that is truncated or has a
    corrupt record yields the records before the damage (`shards_damaged`); either prints one line naming
    the file. A cut exactly at a record boundary cannot be told from a shorter file.
  * a record that does not parse (`skipped_unparsable`), an image that does not decode
    (`skipped_undecodable`), and records the filters reject (`skipped_status`, `skipped_caption_length`,
    `skipped_image_size`, `skipped_aspect_ratio`, `skipped_no_text_embedding`) are dropped and counted.
  * grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB; images with alpha are composited
    onto white; captions that are not UTF-8 get U+FFFD for the bad bytes. These are counted as `converted_*`.
  * an epoch that delivers no example at all (filters reject everything, no shard readable) would leave an
    endless stream with nothing in it: the stream fails instead, and `numpy_batches` turns that into
    NoExamplesError, one line with the counters.
Counters are exact (one update per record) and count what the pipeline has processed since the process
started, which runs ahead of training by its buffers.

Memory: at most 48 open shard files (16 read side by side, 32 opened ahead; streamed, 256 KiB buffers
each), the shuffle buffer (`shuffle_buffer` undecoded records) and a few decoded batches; never a whole shard.

Config fields read from `data_cfg` (an `ml_collections.ConfigDict`; imagen_jax/stage/config.py documents them):
  train_shards, format, image_size, crop_size, shuffle_buffer, num_parallel_calls, precomputed_text,
  min_image_size, max_aspect_ratio, min_caption_chars, max_caption_chars, require_success_status.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np
import tensorflow as tf

from imagen_jax.data import text_records
from imagen_jax.data.decode import CONVERSIONS, REASONS, Decoder
from imagen_jax.data.reader import RECORD, SHARD_DAMAGED, SHARD_UNREADABLE, epoch_stream, mix_seed, process_files
from imagen_jax.data.shards import list_shards
from imagen_jax.errors import DataError

SUPPORTED_FORMATS = ("tfrecord",)


class Position(NamedTuple):
    """Where a process's stream stands: the next record to read is record `index` of epoch `epoch`."""

    epoch: int
    index: int


def position_after(batch: dict) -> Position:
    """The stream position just after `batch` (a numpy batch from `make_dataset`)."""
    return Position(int(batch["epoch"][-1]), int(batch["index"][-1]) + 1)


class DatasetStats:
    """Exact counters of what the pipeline has processed: records, deliveries, skips per reason, shards
    read/damaged/unreadable and conversions. One variable, one add per stream element, so a read never
    sees an element half counted."""

    NAMES = (
        "records",
        "delivered",
        *(f"skipped_{r}" for r in REASONS[1:-1]),
        "shards_read",
        "shards_damaged",
        "shards_unreadable",
        *(f"converted_{c}" for c in CONVERSIONS),
    )

    def __init__(self) -> None:
        self.counts = tf.Variable(tf.zeros([len(self.NAMES)], tf.int64), trainable=False, name="data_counts")

    def add(self, reason: tf.Tensor, kind: tf.Tensor, conversions: tf.Tensor) -> None:
        """Counts one stream element (inside the pipeline)."""
        is_record = tf.cast(kind == RECORD, tf.int64)
        reasons = tf.one_hot(reason, len(REASONS), dtype=tf.int64)[:-1] * is_record  # delivered + skips
        shards = tf.cast(tf.stack([kind != RECORD, kind == SHARD_DAMAGED, kind == SHARD_UNREADABLE]), tf.int64)
        delivered = tf.cast(reason == 0, tf.int64)
        self.counts.assign_add(tf.concat([is_record[None], reasons, shards, conversions * delivered], 0))

    def read(self) -> dict[str, int]:
        return dict(zip(self.NAMES, (int(v) for v in self.counts.numpy())))


class NoExamplesError(DataError):
    """A whole epoch of this process's shard files delivered no example: every record was skipped, or none
    could be read. Raised instead of waiting forever on an endless stream that holds nothing."""


_EMPTY_EPOCH = "delivered no example"
_EMPTY_EPOCH_MESSAGE = re.compile(r"assertion failed: \[(data: epoch .*? " + _EMPTY_EPOCH + r"[^\]]*)\]")
# Scan state: (the epoch of the previous element, examples delivered in that epoch so far).
_EMPTY_EPOCH_START = (tf.constant(-1, tf.int64), tf.constant(0, tf.int64))


def _empty_epoch_guard(num_files: int, start: Position):
    """A scan step that fails the stream when an epoch ends (the next one begins: the record shuffle mixes the
    shard end markers into the records, so only the next epoch's first element marks the end) without one
    example delivered. The epoch a resumed stream starts inside is exempt: its examples may all lie before
    the resume point. Every epoch has at least one element (a marker per shard), so an endless stream of
    nothing fails at the start of its second epoch."""

    def step(state: tuple, example: dict) -> tuple[tuple, dict]:
        previous, delivered = state
        ended = (example["epoch"] != previous) & (previous >= 0)
        partial = (previous == start.epoch) & (start.index > 0)
        empty = ended & (delivered == 0) & ~partial
        message = tf.strings.join(
            [
                "data: epoch ",
                tf.strings.as_string(previous),
                " of this process (",
                str(num_files),
                " shard files) ",
                _EMPTY_EPOCH,
            ]
        )
        delivered = tf.where(example["epoch"] == previous, delivered, 0) + tf.cast(example["reason"] == 0, tf.int64)
        with tf.control_dependencies([tf.debugging.Assert(~empty, [message], name="empty_epoch")]):
            return (example["epoch"], delivered), tf.nest.map_structure(tf.identity, example)

    return step


def numpy_batches(ds: tf.data.Dataset, stats: DatasetStats) -> Iterator[dict]:
    """`ds.as_numpy_iterator()` for a `make_dataset` stream, where an epoch that delivers nothing raises
    NoExamplesError with one line naming the counters (which say why every record was skipped)."""
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            match = _EMPTY_EPOCH_MESSAGE.search(e.message)
            if not match:
                raise
            counts = ", ".join(f"{k}={v}" for k, v in stats.read().items() if v)
            raise NoExamplesError(
                f"{match.group(1)} (counters: {counts}); check data.train_shards and the "
                f"data filters (imagen_jax/stage/config.py)"
            ) from None
        yield batch


def precomputed_text_metadata(data_cfg: ml_collections.ConfigDict) -> dict:
    """The text_embeddings.json of the configured shards (dim, max_length, dtype, encoder)."""
    return text_records.read_metadata(list_shards(data_cfg.train_shards))


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    start: Position = Position(0, 0),
    text_max_length: int | None = None,
    text_lowercase: bool | None = None,
    files: Sequence[str] | None = None,
) -> tuple[tf.data.Dataset, DatasetStats]:
    """Builds this process's stream of batches, starting at stream position `start`.

    Batches (numpy via `ds.as_numpy_iterator()`): 'image' uint8 [B,S,S,3] (S = crop_size when cropping;
    `images.from_uint8` maps it to the model's [-1,1], on the device in training), 'caption' UTF-8 bytes [B],
    'epoch' and 'index' int64 [B] (the stream position of each example; `position_after(batch)` is where a
    resumed stream must start), and with `data.precomputed_text` also 'text' [B,L,D] (stored dtype,
    zero-padded) and 'mask' bool [B,L]. `batch_size` is per process. `repeat=False` gives only epoch
    `start.epoch` (for tests and tools).
    `text_max_length` and `text_lowercase` (precomputed text) must equal the max_length and caption
    lower-casing the embeddings were stored with. `files`: the listing of data.train_shards when the caller
    made it (a multi-host run lists once, on process 0, and hands every process the same list).
    """
    fmt = data_cfg.get("format", "tfrecord")
    if fmt not in SUPPORTED_FORMATS:
        raise DataError(
            f"data.format {fmt!r} is not supported; use one of {SUPPORTED_FORMATS} (convert webdataset .tar "
            f"shards with python -m imagen_jax.tools.convert_shards)"
        )
    if "train_shards" not in data_cfg or "image_size" not in data_cfg:
        raise DataError("data config needs both 'train_shards' and 'image_size'")
    size = int(data_cfg.image_size)
    if size <= 0 or batch_size <= 0:
        raise DataError(f"data.image_size ({size}) and batch_size ({batch_size}) must be positive")
    crop_size = int(data_cfg.get("crop_size", 0))
    if crop_size < 0 or crop_size > size:
        raise DataError(f"data.crop_size ({crop_size}) must be 0 (no crop) or at most data.image_size ({size})")
    if start.epoch < 0 or start.index < 0:
        raise DataError(f"data start position {tuple(start)} must be non-negative")
    shuffle_buffer = max(1, int(data_cfg.get("shuffle_buffer", 10_000)))
    parallel = int(data_cfg.get("num_parallel_calls", -1))
    parallel_or_auto = tf.data.AUTOTUNE if parallel == -1 else parallel

    all_files = list_shards(data_cfg.train_shards) if files is None else list(files)
    files = process_files(all_files, seed, process_index, process_count)
    text = None
    if data_cfg.get("precomputed_text", False):
        text = text_records.read_metadata(all_files)
        if text_max_length is not None and text["max_length"] != text_max_length:
            raise DataError(
                f"precomputed text embeddings were stored with max_length {text['max_length']} but "
                f"config.text.max_length is {text_max_length}; set them equal or re-run encode_text"
            )
        if text_lowercase is not None and text_records.stored_lowercase(text) != text_lowercase:
            raise DataError(
                f"precomputed text embeddings were stored with lowercase {text_records.stored_lowercase(text)} "
                f"but config.text.lowercase is {text_lowercase}; set them equal or re-run encode_text "
                f"{'with' if text_lowercase else 'without'} --lowercase"
            )
        text["tf_dtype"] = {"bfloat16": tf.bfloat16, "float16": tf.float16}[text["dtype"]]
    # Distinct per-process seeds, so processes do not mirror each other's shuffle pattern.
    process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1, np.uint64)[0] >> 2)
    stats = DatasetStats()
    decoder = Decoder(data_cfg, size, text)

    def epoch_from(epoch: tf.Tensor) -> tf.data.Dataset:
        skip = tf.where(epoch == start.epoch, tf.constant(start.index, tf.int64), 0)
        return epoch_stream(files, process_seed, epoch, shuffle_buffer, parallel).skip(skip)

    last_epoch = 2**62 if repeat else start.epoch + 1
    ds = tf.data.Dataset.range(start.epoch, last_epoch).flat_map(epoch_from)
    ds = ds.interleave(decoder, cycle_length=parallel_or_auto, num_parallel_calls=parallel_or_auto, deterministic=True)

    def count(example: dict) -> dict:
        stats.add(example["reason"], example["kind"], example["conversions"])
        return example

    ds = ds.map(count).scan(_EMPTY_EPOCH_START, _empty_epoch_guard(len(files), start))
    ds = ds.filter(lambda example: example["reason"] == 0)
    keep = ("image", "caption", "epoch", "index") + (("text", "mask") if text else ())

    def finish(example: dict) -> dict:
        out = {k: example[k] for k in keep}
        if 0 < crop_size < size:
            # Seeded by the example's stream position, so a resumed run crops exactly as the first did.
            crop_seed = tf.stack([mix_seed(process_seed, example["epoch"]), example["index"]])
            out["image"] = tf.image.stateless_random_crop(example["image"], [crop_size, crop_size, 3], crop_seed)
        return out

    ds = ds.map(finish, num_parallel_calls=parallel_or_auto, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE), stats
