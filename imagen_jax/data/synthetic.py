"""Synthetic img2dataset-like TFRecord shards with photo-like JPEGs, for benchmarking the input pipeline where
no real shards are at hand (`python -m imagen_jax.tools.bench --data`).

Images are JPEG quality 90 of natural-ish content (1/f colour noise, flat-coloured shapes with hard edges,
sensor-like pixel noise; 0.2-0.4 bytes/pixel, as web photos) stored as `img2dataset --resize_mode keep_ratio
--image_size 1.25*S` would deliver them for a stage of output size S: short side round(1.25*S), aspect ratio
1:1, 4:3, 3:2 or 16:9, landscape or portrait, so resizing does real down-sampling work as on real shards.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

from imagen_jax.errors import DataError

STORED_SCALE = 1.25  # stored short side / output size: img2dataset keep_ratio at 1.25x the stage's size
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)
SYNTHETIC_SHARDS = 8

_SUBJECTS = (
    "a dog",
    "two cyclists",
    "an old lighthouse",
    "a bowl of ramen",
    "a city street",
    "a red barn",
    "a child with a kite",
    "a mountain lake",
    "a vintage car",
    "a cat on a sofa",
    "a wedding cake",
)
_SCENES = (
    "at sunset",
    "in the rain",
    "on a sunny beach",
    "in a snowy forest",
    "under neon lights",
    "in a busy market",
    "seen from above",
    "in soft morning light",
)
_STYLES = ("a photograph of", "a close-up photo of", "an illustration of", "stock photo:", "a painting of")


def _natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 [H,W,3] image with photo-like statistics, so JPEG size and decode cost are realistic: 1/f
    colour noise (octaves summed at 1/8 resolution, then bicubic up-sampled), a few flat shapes with hard
    edges, and +-10 pixel noise. A flat colour would compress (and decode) unrealistically well."""
    low_h, low_w = max(2, height // 8), max(2, width // 8)
    low = np.zeros((low_h, low_w, 3), np.float32)
    cells = 2
    while cells <= min(low_h, low_w):
        grid_h, grid_w = round(cells * low_h / min(low_h, low_w)), round(cells * low_w / min(low_h, low_w))
        grid = rng.normal(0, 1, (grid_h, grid_w, 3)).astype(np.float32)
        octave = [np.asarray(Image.fromarray(grid[..., c]).resize((low_w, low_h), Image.BICUBIC)) for c in range(3)]
        low += 60.0 / cells**0.8 * np.stack(octave, -1)
        cells *= 2
    low += rng.uniform(60, 190, 3).astype(np.float32)
    image = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
        x1, y1 = (x0, y0) + rng.uniform(0.05, 0.5, 2) * (width, height)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _caption(rng: np.random.Generator) -> str:
    return f"{rng.choice(_STYLES)} {rng.choice(_SUBJECTS)} {rng.choice(_SCENES)}"


def write_synthetic_shards(
    out_dir: str, *, size: int, num_images: int, num_shards: int = SYNTHETIC_SHARDS, seed: int = 0
) -> list[str]:
    """Writes `num_images` img2dataset-like records for output size `size` into `num_shards` TFRecord files.

    Images are JPEG quality 90 with short side round(STORED_SCALE * size) and an aspect ratio from ASPECTS
    (landscape or portrait), as `img2dataset --resize_mode keep_ratio` delivers; original_width/height
    say the source photo was twice as large. Returns the shard paths.
    """
    import tensorflow as tf  # Deferred (here and below): TF takes seconds to import; model mode needs none.

    if size < 1 or num_images < 1 or not 1 <= num_shards <= num_images:
        raise DataError(
            f"need size >= 1, num_images >= 1 and 1 <= num_shards <= num_images; got size={size}, "
            f"num_images={num_images}, num_shards={num_shards}"
        )

    def feature(value: bytes | int) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    rng = np.random.default_rng(seed)
    short = max(1, round(STORED_SCALE * size))
    bounds = np.linspace(0, num_images, num_shards + 1).round().astype(int)
    tf.io.gfile.makedirs(out_dir)
    paths = []
    for shard, (first, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = os.path.join(out_dir, f"{shard:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for index in range(first, stop):
                long = round(short * ASPECTS[index % len(ASPECTS)])
                height, width = (short, long) if rng.random() < 0.75 else (long, short)
                buffer = io.BytesIO()
                Image.fromarray(_natural_image(rng, height, width)).save(buffer, format="JPEG", quality=90)
                example = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            "jpg": feature(buffer.getvalue()),
                            "txt": feature(_caption(rng).encode()),
                            "key": feature(f"{shard:05d}{index - first:04d}".encode()),
                            "status": feature(b"success"),
                            "width": feature(width),
                            "height": feature(height),
                            "original_width": feature(2 * width),
                            "original_height": feature(2 * height),
                        }
                    )
                )
                writer.write(example.SerializeToString())
        paths.append(path)
    return paths


def mean_image_bytes(files: list[str], limit: int = 256) -> float:
    """Mean size of the stored (encoded) image over the first `limit` records of `files`."""
    import tensorflow as tf

    from imagen_jax.data.decode import IMAGE_FEATURES

    sizes = []
    for record in tf.data.TFRecordDataset(files).take(limit).as_numpy_iterator():
        features = tf.train.Example.FromString(record).features.feature
        encoded = [features[n].bytes_list.value[0] for n in IMAGE_FEATURES if n in features]
        sizes.append(max((len(e) for e in encoded), default=0))
    if not sizes:
        raise DataError(f"shards {files[:3]}... hold no records")
    return float(np.mean(sizes))
