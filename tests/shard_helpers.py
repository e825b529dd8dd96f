"""Small img2dataset-style TFRecord shards written by the tests themselves, and a one-epoch reader."""

from __future__ import annotations

import io

import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image

from imagen_jax.data.pipeline import make_dataset
from imagen_jax.images import from_uint8


def encode_image(array: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" and not options else options))
    return buffer.getvalue()


def feature(value: bytes | int) -> tf.train.Feature:
    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def write_records(path, records: list[dict | bytes]) -> str:
    """Writes tf.train.Examples given as {name: bytes | int}; raw bytes are written as the record itself."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            if isinstance(record, bytes):
                writer.write(record)
                continue
            example = tf.train.Example(
                features=tf.train.Features(feature={name: feature(value) for name, value in record.items()})
            )
            writer.write(example.SerializeToString())
    return str(path)


def solid(color, height: int = 20, width: int = 20) -> np.ndarray:
    return np.full((height, width, len(color)), color, np.uint8).squeeze()


def data_config(shards, image_size: int = 16, **overrides) -> ml_collections.ConfigDict:
    fields = dict(
        train_shards=shards, format="tfrecord", image_size=image_size, shuffle_buffer=64, num_parallel_calls=2
    )
    return ml_collections.ConfigDict({**fields, **overrides})


def read_epoch(cfg, **kwargs) -> tuple[list[dict], dict]:
    """Reads one epoch with batch size 1; returns the examples (images in [-1, 1], as the train step sees them)
    and the stats."""
    ds, stats = make_dataset(cfg, batch_size=1, seed=0, repeat=False, **kwargs)
    examples = [
        {"image": from_uint8(b["image"][0]), "caption": b["caption"][0].decode()} for b in ds.as_numpy_iterator()
    ]
    return examples, stats.read()
