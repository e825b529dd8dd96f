"""Precomputed T5 embeddings stored in img2dataset TFRecord shards: the format, and reading it back.

Running a large frozen T5 (XXL: 4.7B parameters) inside every train step costs as much as the U-Net itself;
`python -m imagen_jax.tools.encode_text` runs it once over the shards instead, and training with
`config.data.precomputed_text = True` reads the stored embeddings and never builds T5.

Format (fixed; readers and the writer both follow this module):

* Each output record is the input `tf.train.Example` with every feature copied unchanged (image, `txt` /
  `caption`, `key`, metadata), plus two features:
    - `t5_embedding` (bytes): the encoder output for the caption's real tokens only, shape
      [t5_length, dim], row-major, little-endian, in the folder's storage dtype (bfloat16 or float16).
    - `t5_length` (int64): the number of real tokens including EOS, i.e. the tokenizer mask's sum. It is
      always >= 1: an empty caption tokenizes to the EOS token alone. It never exceeds the tool's
      --max_length (longer captions are truncated to max_length - 1 tokens plus EOS, as in training).
  The caption is the first non-empty of `txt`, `caption` (as the training pipeline reads it), decoded as
  UTF-8 with errors='replace'; its bytes stay as they were. An input that already has these two features
  (a re-encoded folder) gets them replaced.
* `text_embeddings.json` in the output folder, written last and atomically:
    {"encoder": <T5 folder as given>, "dim": D, "max_length": L, "dtype": "bfloat16" | "float16",
     "compute_dtype": "float32" | "bfloat16", "lowercase": bool, "num_shards": n, "num_records": N}
  `lowercase`: whether captions were lower-cased and stripped before tokenizing (--lowercase, config
  text.lowercase); folders written before the field existed were not (`stored_lowercase`).
  `num_shards` counts the input shard files of the whole run. `num_records` counts the records in the
  output shards; it is left out when the run was split over processes (--process_count > 1), because
  process 0, which writes the file when its own share is done, does not see the other processes' shards.

The tool's --max_length should equal the training config's `text.max_length`: embeddings are contextual,
so the first K rows of a caption encoded at length L are not what encoding at length K gives. Readers
that ask for a shorter max_length get the stored rows truncated (and lose EOS); `read_metadata` returns
the stored max_length so the pipeline can insist on equality instead.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import tensorflow as tf

from imagen_jax.errors import DataError

EMBEDDING_FEATURE = "t5_embedding"
LENGTH_FEATURE = "t5_length"
METADATA_FILE = "text_embeddings.json"


def stored_lowercase(metadata: dict) -> bool:
    """Whether a folder's embeddings are of lower-cased captions; False for folders written before the field."""
    return bool(metadata.get("lowercase", False))


STORAGE_DTYPES = ("bfloat16", "float16")

# tf.io.parse_single_example spec for the two added features (merge it into the pipeline's own spec).
FEATURE_SPEC = {
    EMBEDDING_FEATURE: tf.io.FixedLenFeature([], tf.string),
    LENGTH_FEATURE: tf.io.FixedLenFeature([], tf.int64),
}

# Keys that must agree between folders read together: they fix what the stored numbers mean. The encoder
# is compared by its folder's base name, so the same checkpoint copied to another path still matches.
_AGREEING_KEYS = ("encoder", "dim", "max_length", "dtype", "lowercase")
_REQUIRED_KEYS = ("encoder", "dim", "max_length", "dtype")

_NUMPY_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype("<f2")}
_TF_DTYPES = {"bfloat16": tf.bfloat16, "float16": tf.float16}


def _check_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"embedding dtype {dtype!r} is not supported; use one of {STORAGE_DTYPES}")


def encode_embedding(array: np.ndarray, dtype: str) -> bytes:
    """[length, dim] float array -> the `t5_embedding` bytes (row-major, little-endian, in `dtype`).

    float16 cannot hold values beyond +-65504: a row that overflows raises instead of storing inf.
    """
    _check_dtype(dtype)
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"embedding must be [length, dim], got shape {array.shape}")
    with np.errstate(over="ignore"):  # overflow is checked just below, with a clearer message
        stored = np.ascontiguousarray(array.astype(_NUMPY_DTYPES[dtype]))
    if not np.isfinite(stored.astype(np.float32)).all():
        raise ValueError(
            f"embedding has values that are not finite in {dtype} (float16 overflows beyond "
            f"65504: store as bfloat16 instead)"
        )
    return stored.tobytes()


def decode_embedding(
    raw: tf.Tensor, length: tf.Tensor, dim: int, dtype: str, max_length: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """The `t5_embedding` bytes and `t5_length` of one record -> (embedding [max_length, dim] in `dtype`,
    zero-padded; mask bool [max_length], True on real tokens). Graph-safe, for a tf.data map.

    A stored length above `max_length` is truncated to it; a byte string whose size does not match
    length x dim fails the map with an error saying so.
    """
    _check_dtype(dtype)
    values = tf.io.decode_raw(raw, _TF_DTYPES[dtype], little_endian=True)
    length = tf.cast(length, tf.int32)
    tf.debugging.assert_equal(
        tf.size(values),
        length * dim,
        message=f"{EMBEDDING_FEATURE} size does not match {LENGTH_FEATURE} x dim ({dim})",
    )
    kept = tf.minimum(length, max_length)
    rows = tf.reshape(values, [length, dim])[:kept]
    embedding = tf.pad(rows, [[0, max_length - kept], [0, 0]])
    mask = tf.range(max_length) < kept
    return tf.ensure_shape(embedding, [max_length, dim]), mask


def _read_folder_metadata(folder: str) -> dict:
    path = os.path.join(folder, METADATA_FILE)  # posix joining, right for gs:// too
    if not tf.io.gfile.exists(path):
        raise DataError(
            f"{folder}: no {METADATA_FILE}; write the shards with python -m imagen_jax.tools.encode_text "
            f"(or let the run that was interrupted finish)"
        )
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            metadata = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise DataError(f"{folder}: {METADATA_FILE} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise DataError(f"{folder}: {METADATA_FILE} must hold a JSON object")
    for key in _REQUIRED_KEYS:
        if key not in metadata:
            raise DataError(f"{folder}: {METADATA_FILE} lacks key {key!r}")
    if metadata["dtype"] not in STORAGE_DTYPES:
        raise DataError(f"{folder}: {METADATA_FILE} has dtype {metadata['dtype']!r}; expected one of {STORAGE_DTYPES}")
    for key in ("dim", "max_length"):
        if not isinstance(metadata[key], int) or metadata[key] < 1:
            raise DataError(f"{folder}: {METADATA_FILE} has {key} {metadata[key]!r}; expected a positive integer")
    return metadata


def _encoder_name(encoder: str) -> str:
    return os.path.basename(str(encoder).rstrip("/"))


def agreeing(metadata: dict, key: str) -> object:
    """The value of `key` in text_embeddings.json `metadata` as compared between runs and folders: the encoder's
    base name (the same T5 read from another path agrees), lowercase False when absent (older files), else as
    stored (None when absent)."""
    if key == "encoder":
        return _encoder_name(metadata.get(key))
    return stored_lowercase(metadata) if key == "lowercase" else metadata.get(key)


def read_metadata(shard_files: list[str]) -> dict:
    """Reads text_embeddings.json from the folder of each shard file and checks that they agree.

    Returns the first folder's metadata without its per-folder counts (`num_shards`, `num_records`).
    Raises a one-line ValueError naming the folder whose file is missing, malformed, or disagrees with the
    first folder's on encoder (base name), dim, max_length, dtype or lowercase.
    """
    folders = list(dict.fromkeys(os.path.dirname(f) or "." for f in shard_files))
    if not folders:
        raise DataError("read_metadata needs at least one shard file")
    first = _read_folder_metadata(folders[0])
    for folder in folders[1:]:
        other = _read_folder_metadata(folder)
        for key in _AGREEING_KEYS:
            mine, theirs = (agreeing(m, key) for m in (other, first))
            if mine != theirs:
                raise DataError(
                    f"{folder}: {METADATA_FILE} has {key} {mine!r} but {folders[0]} has {theirs!r}; "
                    f"all shards read together need the same T5 embeddings"
                )
    return {k: v for k, v in first.items() if k not in ("num_shards", "num_records")}
