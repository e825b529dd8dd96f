"""One stream element -> exactly one example, or a placeholder carrying the reason it is not delivered.

Parsing, filtering, image decoding and conversion of img2dataset records. Grayscale, palette, CMYK and
16-bit images become 8-bit RGB, alpha is composited onto white, non-UTF-8 caption bytes become U+FFFD; a
record that does not parse, an image that does not decode and a record a filter rejects become placeholders
whose `reason` (an index into REASONS) the pipeline counts and filters out.
"""

from __future__ import annotations

import ml_collections
import tensorflow as tf

from imagen_jax.data import text_records
from imagen_jax.data.reader import RECORD

# img2dataset stores the image under the name of its --encode_format; the first non-empty one is used.
IMAGE_FEATURES = ("jpg", "png", "webp")
# img2dataset writes the caption as `txt`; some converted datasets call it `caption`.
CAPTION_FEATURES = ("txt", "caption")
# Why a stream element was not delivered; index 0 is "delivered", the last is a shard's end marker.
REASONS = (
    "delivered",
    "unparsable",
    "undecodable",
    "status",
    "caption_length",
    "image_size",
    "aspect_ratio",
    "no_text_embedding",
    "shard_end",
)
_R = {name: i for i, name in enumerate(REASONS)}
CONVERSIONS = ("grayscale", "alpha", "high_bit_depth", "caption_not_utf8")

_STRING = tf.io.FixedLenFeature([], tf.string, default_value="")
_INT = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
_FEATURE_SPEC = {
    **{name: _STRING for name in IMAGE_FEATURES + CAPTION_FEATURES + ("status",)},
    "original_width": _INT,
    "original_height": _INT,
}
# Precomputed text, with defaults so a record without it is counted as such rather than as unparsable.
_TEXT_SPEC = {
    text_records.EMBEDDING_FEATURE: _STRING,
    text_records.LENGTH_FEATURE: tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def _first_nonempty(features: dict[str, tf.Tensor], names: tuple[str, ...]) -> tf.Tensor:
    value = features[names[-1]]
    for name in reversed(names[:-1]):
        value = tf.where(tf.strings.length(features[name]) > 0, features[name], value)
    return value


def _to_rgb(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Any decodable image -> (float32 [H,W,3] in [0,255], conversions [grayscale, alpha, high_bit_depth]).

    decode_image turns 16-bit PNGs into 8 bits and CMYK JPEGs into RGB itself; gray is tiled and alpha is
    composited onto white (the RGB under transparent pixels is often garbage).
    """
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
    channels = tf.shape(image)[-1]
    image = tf.cast(image, tf.float32)
    has_alpha = (channels == 2) | (channels == 4)
    alpha = tf.where(has_alpha, image[..., -1:] / 255.0, tf.ones_like(image[..., :1]))
    color = tf.cond(channels <= 2, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    rgb = color * alpha + 255.0 * (1.0 - alpha)
    is_png = tf.strings.substr(encoded, 1, 3) == "PNG"
    high_bit = is_png & (tf.strings.substr(encoded, 24, 1) == "\x10")
    return rgb, tf.cast(tf.stack([channels <= 2, has_alpha, high_bit]), tf.int64)


def _resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes the short side to `size` with antialiasing, centre-crops to size x size, rounds to uint8: a quarter
    of float32's bytes through tf.data and onto the devices; the train step maps it to [-1, 1] there. Images
    stored at the size already (img2dataset --image_size) skip the resize, which is most of the decode's cost."""
    shape = tf.shape(image)
    return tf.cond(
        (shape[0] == size) & (shape[1] == size),
        lambda: tf.ensure_shape(tf.cast(tf.round(image), tf.uint8), [size, size, 3]),
        lambda: _resize(image, size),
    )


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(height, width)
    new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
    image = tf.image.resize(image, [new_h, new_w], method="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image[top : top + size, left : left + size]
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(image, [size, size, 3])


class Decoder:
    """Turns each stream element into exactly one example, with the reason it is (not) delivered."""

    def __init__(self, data_cfg: ml_collections.ConfigDict, size: int, text: dict | None):
        self.size = size
        self.text = text  # precomputed-text metadata, or None
        self.min_size = int(data_cfg.get("min_image_size", 0))
        self.max_aspect = float(data_cfg.get("max_aspect_ratio", 0.0))
        self.min_chars = int(data_cfg.get("min_caption_chars", 1))
        self.max_chars = int(data_cfg.get("max_caption_chars", 0))
        self.require_success = bool(data_cfg.get("require_success_status", True))
        self.spec = dict(_FEATURE_SPEC, **(_TEXT_SPEC if text else {}))

    def placeholder(self, element: dict, reason: int | tf.Tensor) -> dict:
        example = {
            "image": tf.zeros([self.size, self.size, 3], tf.uint8),
            "caption": tf.constant(""),
            "reason": tf.cast(reason, tf.int64),
            "kind": element["kind"],
            "epoch": element["epoch"],
            "index": element["index"],
            "conversions": tf.zeros([len(CONVERSIONS)], tf.int64),
            "features": self._empty_features(),
        }
        if self.text:
            example["text"] = tf.zeros([self.text["max_length"], self.text["dim"]], self.text["tf_dtype"])
            example["mask"] = tf.zeros([self.text["max_length"]], tf.bool)
        return example

    def _empty_features(self) -> dict:
        return {name: tf.constant(spec.default_value, spec.dtype) for name, spec in self.spec.items()}

    def parse(self, element: dict) -> dict:
        """Parses the Example and applies the filters that need no pixels; may raise (unparsable)."""
        features = tf.io.parse_single_example(element["record"], self.spec)
        caption = _first_nonempty(features, CAPTION_FEATURES)
        fixed = tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="replace")
        chars = tf.strings.length(fixed, unit="UTF8_CHAR")
        reason = tf.constant(0, tf.int64)

        def reject(condition, name):
            return tf.where((reason == 0) & condition, tf.constant(_R[name], tf.int64), reason)

        if self.require_success:
            reason = reject((tf.strings.length(features["status"]) > 0) & (features["status"] != "success"), "status")
        too_long = chars > self.max_chars if self.max_chars > 0 else tf.constant(False)
        reason = reject((chars < self.min_chars) | too_long, "caption_length")
        if self.text:
            reason = reject(features[text_records.LENGTH_FEATURE] < 1, "no_text_embedding")
        example = self.placeholder(element, reason)
        example["caption"] = fixed
        example["features"] = features
        example["conversions"] = tf.concat([tf.zeros([3], tf.int64), tf.cast(fixed != caption, tf.int64)[None]], 0)
        return example

    def decode(self, example: dict) -> dict:
        """Decodes the image (and stored text), applies the size filters; may raise (undecodable)."""
        features = example["features"]
        rgb, conversions = _to_rgb(_first_nonempty(features, IMAGE_FEATURES))
        shape = tf.shape(rgb)
        height = tf.where(features["original_height"] > 0, features["original_height"], tf.cast(shape[0], tf.int64))
        width = tf.where(features["original_width"] > 0, features["original_width"], tf.cast(shape[1], tf.int64))
        reason = example["reason"]
        short, long = tf.minimum(height, width), tf.maximum(height, width)
        reason = tf.where((reason == 0) & (short < self.min_size), tf.constant(_R["image_size"], tf.int64), reason)
        if self.max_aspect > 0:
            too_wide = tf.cast(long, tf.float32) > self.max_aspect * tf.cast(short, tf.float32)
            reason = tf.where((reason == 0) & too_wide, tf.constant(_R["aspect_ratio"], tf.int64), reason)
        out = {**example, "reason": reason, "image": _resize_center_crop(rgb, self.size)}
        out["conversions"] = example["conversions"] + tf.concat([conversions, tf.zeros([1], tf.int64)], 0)
        if self.text:
            out["text"], out["mask"] = text_records.decode_embedding(
                features[text_records.EMBEDDING_FEATURE],
                features[text_records.LENGTH_FEATURE],
                self.text["dim"],
                self.text["dtype"],
                self.text["max_length"],
            )
        return out

    def __call__(self, element: dict) -> tf.data.Dataset:
        """A one-element dataset: the decoded example, or a placeholder carrying why it was dropped.

        Each fallible stage runs on a one-element dataset under `ignore_errors` with a fallback behind it,
        so a bad record costs only itself and nothing upstream of the decode is ever skipped silently.
        """
        single = tf.data.Dataset.from_tensors

        def parse(element: dict) -> dict:
            return tf.cond(
                element["kind"] == RECORD,
                lambda: self.parse(element),
                lambda: self.placeholder(element, _R["shard_end"]),
            )

        def decode(example: dict) -> dict:
            return tf.cond(example["reason"] == 0, lambda: self.decode(example), lambda: example)

        parsed = single(element).map(parse).ignore_errors()
        parsed = parsed.concatenate(single(self.placeholder(element, _R["unparsable"]))).take(1)
        decoded = parsed.map(decode).ignore_errors()
        return decoded.concatenate(single(self.placeholder(element, _R["undecodable"]))).take(1)
