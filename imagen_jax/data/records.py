"""One img2dataset sample <-> one `tf.train.Example`, in the feature layout of img2dataset's TFRecord shards.

A record holds `key` (the sample key, UTF-8 bytes), the encoded image under its format name (`jpg`, `png` or
`webp`), `txt` (the caption bytes, exactly as given: the training pipeline copes with non-UTF-8 captions, so
nothing is re-encoded here) and one feature per metadata field of the sample's `.json`:

    int, bool       -> int64_list   (True -> 1)
    float           -> float_list   (float32: the proto's precision)
    str             -> bytes_list   (UTF-8)
    None            -> omitted      (so a typed field never appears with a second type)
    list, dict, ... -> bytes_list   holding the value's JSON

img2dataset's own TFRecord writer differs in two corners (it stores None as b'' and lists as typed lists);
records written here stay parseable with one fixed dtype per field, which is what `tf.io.parse_example` needs.
The names `key`, `txt`, `jpg`, `png` and `webp` belong to the sample itself: metadata fields with those names
are dropped, so a stray `jpg` string in the metadata can never pass for the image.
"""

from __future__ import annotations

import json
from typing import Any

import tensorflow as tf

# The formats img2dataset encodes to (--encode_format), in the order a sample's image is picked.
IMAGE_FORMATS = ("jpg", "png", "webp")
RESERVED = ("key", "txt") + IMAGE_FORMATS


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def meta_feature(name: str, value: Any) -> tf.train.Feature | None:
    """The feature that stores metadata field `name` (None for a None value); ValueError if it cannot be stored."""
    if value is None:
        return None
    try:
        if isinstance(value, (bool, int)):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        if isinstance(value, float):
            return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        if isinstance(value, str):
            return _bytes(value.encode("utf-8"))
        return _bytes(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    except (ValueError, TypeError) as e:  # int beyond int64, lone surrogate in a str, a non-JSON object
        raise ValueError(f"metadata field {name!r} = {value!r:.80} cannot be stored in a record: {e}") from None


def example_from_sample(
    key: str, image: bytes, image_format: str, caption: bytes | None, meta: dict[str, Any]
) -> tf.train.Example:
    """Builds the record of one sample. `caption=None` (captions off) writes no `txt` feature.

    Raises ValueError naming the problem for an unknown `image_format` or a metadata value that no feature
    type can hold (see `meta_feature`).
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"sample {key!r}: image format {image_format!r} is not one of {IMAGE_FORMATS}")
    features: dict[str, tf.train.Feature] = {}
    for name, value in meta.items():
        if name not in RESERVED:
            feature = meta_feature(name, value)
            if feature is not None:
                features[name] = feature
    features["key"] = _bytes(key.encode("utf-8"))
    features[image_format] = _bytes(image)
    if caption is not None:
        features["txt"] = _bytes(caption)
    return tf.train.Example(features=tf.train.Features(feature=features))


def _value(feature: tf.train.Feature) -> Any:
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if kind == "bytes_list":
        values = [_text_or_bytes(v) for v in values]
    return values[0] if len(values) == 1 else values


def _text_or_bytes(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def sample_from_example(example: tf.train.Example) -> dict[str, Any]:
    """The inverse of `example_from_sample`, for tests and tools.

    Returns {'key': str, 'image_format': str, 'image': bytes, 'caption': bytes | None, 'meta': dict}. Metadata
    comes back as stored: bools as ints, floats rounded to float32, lists and dicts as their JSON text, byte
    strings that are not UTF-8 as bytes; a feature with several values (records from other writers) as a list.
    Raises ValueError when the record holds no image.
    """
    features = example.features.feature
    formats = [f for f in IMAGE_FORMATS if f in features and features[f].bytes_list.value]
    if not formats:
        raise ValueError(
            f"record {_value(features['key']) if 'key' in features else '?'!r} holds no image (none of {IMAGE_FORMATS})"
        )
    image_format = formats[0]
    key = features["key"].bytes_list.value[0].decode("utf-8") if "key" in features else ""
    caption = features["txt"].bytes_list.value[0] if "txt" in features else None
    meta = {name: _value(feature) for name, feature in features.items() if name not in RESERVED}
    return {
        "key": key,
        "image_format": image_format,
        "image": features[image_format].bytes_list.value[0],
        "caption": caption,
        "meta": meta,
    }
