"""tf.data input pipeline over img2dataset TFRecord shards: file split per process, decode, resize, batch.

Web-scraped shards always hold some records whose image does not decode (truncated downloads, HTML saved as
.jpg, a failed resize). Such records are dropped and counted, never fatal: `make_dataset` returns a
`DatasetStats` whose counters the training loop can log, so a shard set that is mostly garbage shows up as a
number rather than as a slow, silent loss of data. Only the image decode is allowed to fail this way: a shard
that is not a TFRecord file, or is truncated, raises `tf.errors.DataLossError` when read.

Config fields read from `data_cfg` (an `ml_collections.ConfigDict`):
  train_shards        glob, brace pattern (`{00000..00012}`), list, or comma-separated string; local or gs://.
  format              'tfrecord' (default); any other value is an error naming it.
  image_size          S: the short side is resized (antialiased) to S, then the centre S x S is cropped.
  crop_size           C > 0: then a seeded random C x C crop of that (SR stages train on crops); 0 = none.
  shuffle_buffer      records held in the shuffle buffer (default 10_000).
  num_parallel_calls  parallelism of file interleave and decode; -1 means tf.data.AUTOTUNE (default -1).
"""

from __future__ import annotations

import numpy as np
import ml_collections
import tensorflow as tf

from imagen_jax.data.shards import list_shards

# img2dataset stores the image under the name of its --encode_format; the first non-empty one is used.
IMAGE_FEATURES = ("jpg", "png", "webp")
# img2dataset writes the caption as `txt`; some converted datasets call it `caption`.
CAPTION_FEATURES = ("txt", "caption")
SUPPORTED_FORMATS = ("tfrecord",)

_FEATURE_SPEC = {
    name: tf.io.FixedLenFeature([], tf.string, default_value="") for name in IMAGE_FEATURES + CAPTION_FEATURES
}


class DatasetStats:
    """Counters the pipeline updates as it reads: records read, records dropped, empty captions kept.

    Counts are of records the pipeline has processed, which runs ahead of the consumer by its buffers, and
    they accumulate across epochs and iterators of the same dataset. All three live in one variable that
    each record updates with a single add, so a read never sees a record half counted.
    """

    def __init__(self) -> None:
        # [records, skipped (image missing or undecodable), delivered examples with an empty caption]
        self.counts = tf.Variable(tf.zeros([3], tf.int64), trainable=False, name="data_counts")

    def add(self, ok: tf.Tensor, empty_caption: tf.Tensor) -> None:
        """Counts one record (inside the pipeline); ok: it decoded; empty_caption: its caption is ''."""
        ok = tf.cast(ok, tf.int64)
        self.counts.assign_add(tf.stack([tf.constant(1, tf.int64), 1 - ok, ok * tf.cast(empty_caption, tf.int64)]))

    def read(self) -> dict[str, int]:
        """Returns {'records', 'skipped_decode', 'empty_captions'} as Python ints.

        `skipped_decode` counts records dropped because their image was missing or did not decode;
        `empty_captions` counts delivered examples whose caption is empty (kept: they train the
        unconditional branch of classifier-free guidance like dropped text does).
        """
        records, skipped, empty = (int(v) for v in self.counts.numpy())
        return {"records": records, "skipped_decode": skipped, "empty_captions": empty}


def _first_nonempty(features: dict[str, tf.Tensor], names: tuple[str, ...]) -> tf.Tensor:
    value = features[names[-1]]
    for name in reversed(names[:-1]):
        value = tf.where(tf.strings.length(features[name]) > 0, features[name], value)
    return value


def _resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes the short side to `size` with antialiasing, centre-crops to size x size, maps to [-1, 1]."""
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(height, width)
    new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
    image = tf.image.resize(image, [new_h, new_w], method="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image[top : top + size, left : left + size]
    image = tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)
    return tf.ensure_shape(image, [size, size, 3])


def _process_files(files: list[str], seed: int, process_index: int, process_count: int) -> list[str]:
    """Returns this process's disjoint share of the files, after a seeded shuffle shared by all processes."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    order = np.random.default_rng(seed).permutation(len(files))
    mine = [files[i] for i in order[process_index::process_count]]
    if not mine:
        raise ValueError(
            f"process {process_index} of {process_count} gets no shard files: only {len(files)} files for "
            f"{process_count} processes; write more, smaller shards"
        )
    return mine


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
) -> tuple[tf.data.Dataset, DatasetStats]:
    """Builds this process's stream of {'image': f32 [B,S,S,3] in [-1,1], 'caption': string [B]} batches
    (S = crop_size when cropping).

    `batch_size` is per process; the last partial batch is dropped. Iterate with `ds.as_numpy_iterator()`.
    The same seed gives the same stream; each process reads a disjoint subset of shard files.
    """
    fmt = data_cfg.get("format", "tfrecord")
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"data.format {fmt!r} is not supported; use one of {SUPPORTED_FORMATS}")
    if "train_shards" not in data_cfg or "image_size" not in data_cfg:
        raise ValueError("data config needs both 'train_shards' and 'image_size'")
    size = int(data_cfg.image_size)
    if size <= 0 or batch_size <= 0:
        raise ValueError(f"data.image_size ({size}) and batch_size ({batch_size}) must be positive")
    crop_size = int(data_cfg.get("crop_size", 0))
    if crop_size < 0 or crop_size > size:
        raise ValueError(f"data.crop_size ({crop_size}) must be 0 (no crop) or at most data.image_size ({size})")
    shuffle_buffer = int(data_cfg.get("shuffle_buffer", 10_000))
    calls = int(data_cfg.get("num_parallel_calls", -1))
    parallel = tf.data.AUTOTUNE if calls == -1 else calls

    files = _process_files(list_shards(data_cfg.train_shards), seed, process_index, process_count)
    # Distinct per-process record-shuffle seeds, so hosts do not mirror each other's shuffle pattern.
    record_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    stats = DatasetStats()

    # A one-record dataset per record, so that `ignore_errors` covers the decode and nothing upstream: a
    # corrupt or non-TFRecord shard must fail loudly, not be skipped forever by a repeating stream.
    def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        features = tf.io.parse_single_example(serialized, _FEATURE_SPEC)
        encoded = _first_nonempty(features, IMAGE_FEATURES)
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = _resize_center_crop(tf.cast(image, tf.float32), size)
        return {"image": image, "caption": _first_nonempty(features, CAPTION_FEATURES)}

    placeholder = {"image": tf.zeros([size, size, 3]), "caption": tf.constant(""), "ok": tf.constant(False)}

    # Exactly one element per record: the decoded example (ok) or, when decoding failed, a placeholder.
    def try_decode(serialized: tf.Tensor) -> tf.data.Dataset:
        decoded = tf.data.Dataset.from_tensors(serialized).map(lambda r: {**decode(r), "ok": tf.constant(True)})
        return decoded.ignore_errors().concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)

    # Counted after the deterministic interleave: one update per record, so the counters are exact.
    def count(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        stats.add(example["ok"], tf.strings.length(example["caption"]) == 0)
        return example

    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=record_seed)
    if repeat:
        ds = ds.repeat()
    open_files = min(len(files), 16)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=open_files,
        num_parallel_calls=parallel if calls == -1 else min(calls, open_files),
        deterministic=True,
    )
    ds = ds.shuffle(shuffle_buffer, seed=record_seed)
    ds = ds.interleave(try_decode, cycle_length=parallel, num_parallel_calls=parallel, deterministic=True)
    ds = ds.map(count).filter(lambda example: example["ok"])
    ds = ds.map(lambda example: {"image": example["image"], "caption": example["caption"]})
    if 0 < crop_size < size:
        # Seeded per-example random crops (SR stages train on crops and run fully convolutionally).
        crop_seeds = tf.data.Dataset.random(seed=record_seed).batch(2)
        ds = tf.data.Dataset.zip(ds, crop_seeds).map(
            lambda example, seed: {**example, "image": tf.image.stateless_random_crop(example["image"], [crop_size, crop_size, 3], seed)},
            num_parallel_calls=parallel, deterministic=True,
        )
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE), stats
