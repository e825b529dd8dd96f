"""Where evaluation captions and reference images come from: COCO's caption JSON, a text file, image folders
and img2dataset shards.

Captions are a seeded subset, so two evaluations of the same source and seed sample the same prompts. Reference
images are centre-cropped and resized to the evaluated resolution exactly as training data is
(`data.decode`), so FID compares the model's images with the real ones at the size it was trained on; a file
or record that does not decode is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from imagen_jax.errors import DataError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _subset(items: list, num: int, seed: int, source: str, what: str) -> list:
    if num < 1:
        raise UsageError(f"the number of captions must be >= 1, got {num}")
    if num > len(items):
        raise UsageError(f"{source}: asked for {num} captions but it has only {len(items)} {what}")
    picks = np.random.default_rng(seed).permutation(len(items))[:num]
    return [items[i] for i in sorted(picks)]


def _coco(path: str, num: int, seed: int) -> list[str]:
    """One caption of each of `num` images (COCO has ~5 per image): the images and the caption of each seeded."""
    by_image: dict[int, list[str]] = {}
    with open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        for entry in data["annotations"]:
            by_image.setdefault(int(entry["image_id"]), []).append(str(entry["caption"]).strip())
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a COCO captions file (needs annotations[].image_id/caption): {e}") from e
    images = _subset(sorted(by_image), num, seed, path, "images")
    rng = np.random.default_rng(seed + 1)
    return [by_image[i][int(rng.integers(len(by_image[i])))] for i in images]


def read_captions(source: str, num: int, seed: int = 0) -> list[str]:
    """`num` captions from COCO's `captions_val2014.json` (one per image), a UTF-8 text file (one per line) or
    img2dataset shards (a pattern; their `txt`/`caption` field), a seeded subset in the source's order."""
    if source.endswith(".json"):
        return _coco(source, num, seed)
    if source.endswith(".txt"):
        with open_text(source) as f:
            lines = [line.strip() for line in f if line.strip()]
        return _subset(lines, num, seed, source, "non-blank lines")
    return _subset([c for _, c in shard_records(source, images=False)], num, seed, source, "captioned records")


def open_text(path: str):
    """A local or gs:// text file, opened for reading as UTF-8; a missing one is a one-line DataError."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise DataError(f"{path}: no such file")
    return tf.io.gfile.GFile(path, "r")


def shard_records(pattern: str, *, images: bool = True) -> Iterator[tuple[bytes, str]]:
    """(encoded image, caption) of each record of the shards `pattern` names, in file order; records that do
    not parse are skipped."""
    import tensorflow as tf

    from imagen_jax.data.decode import CAPTION_FEATURES, IMAGE_FEATURES
    from imagen_jax.data.shards import list_shards

    for record in tf.data.TFRecordDataset(list_shards(pattern)).as_numpy_iterator():
        try:
            features = tf.train.Example.FromString(record).features.feature
        except Exception:  # noqa: BLE001 (protobuf's DecodeError and friends: a damaged record)
            continue
        caption = next((features[n].bytes_list.value[0] for n in CAPTION_FEATURES if features[n].bytes_list.value), b"")
        encoded = next((features[n].bytes_list.value[0] for n in IMAGE_FEATURES if features[n].bytes_list.value), b"")
        if images and not encoded:
            continue
        yield encoded, caption.decode("utf-8", "replace")


def folder_images(folder: str) -> Iterator[tuple[bytes, str]]:
    """(file bytes, file name) of the images in `folder` (not recursive), in name order."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(folder):
        raise DataError(f"{folder}: not a folder")
    names = sorted(n for n in tf.io.gfile.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for name in names:
        with tf.io.gfile.GFile(os.path.join(folder, name), "rb") as f:
            yield f.read(), name


class ReferenceImages:
    """Decoded reference images, uint8 [size, size, 3], from a folder or shards; counts what it skipped."""

    def __init__(self, source: str, image_size: int):
        self.source, self.image_size = source, image_size
        self.delivered = self.skipped = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        import tensorflow as tf

        from imagen_jax.data.decode import _resize_center_crop, _to_rgb

        records = folder_images(self.source) if _is_folder(self.source) else shard_records(self.source)
        for encoded, _ in records:
            try:
                rgb, _ = _to_rgb(tf.constant(encoded))
                image = _resize_center_crop(rgb, self.image_size).numpy()
            except (tf.errors.OpError, ValueError):
                self.skipped += 1
                continue
            self.delivered += 1
            yield image

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Batches of at most `batch_size` images, `limit` images in all (None: every image)."""
        batch: list[np.ndarray] = []
        taken = 0
        for image in self:
            batch.append(image)
            taken += 1
            if len(batch) == batch_size or taken == limit:
                yield np.stack(batch)
                batch = []
            if taken == limit:
                return
        if batch:
            yield np.stack(batch)


def _is_folder(source: str) -> bool:
    import tensorflow as tf

    return tf.io.gfile.isdir(source)
