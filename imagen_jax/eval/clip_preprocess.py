"""CLIP image preprocessing in JAX, bit for bit as transformers' CLIPImageProcessor computes it on uint8 images.

The processor resizes the shortest side (bicubic, antialiased), centre-crops, rescales and normalises. In
transformers 5 `CLIPProcessor.from_pretrained` gives the torchvision-backed `CLIPImageProcessor` whenever
torchvision is installed, so that is what torchmetrics' CLIPScore uses; it resizes with torchvision, which on a
uint8 CPU tensor (torchmetrics moves images to the CPU first) runs torch's Pillow-derived uint8 kernel: separable
fixed-point filters, width first, each pass rounded to uint8, the weights in int16 at the most bits the axis's
largest weight allows. That is reproduced here in int32 arithmetic (exact on any backend); the normalisation is a
256-entry float32 table per channel computed as torchvision computes it, so the pixel values come out exactly.
Not reproduced: transformers' PIL backend (no torchvision, or transformers 4) resizes with Pillow, whose 22-bit
weights (and, in Pillow 13, pass order) move ~1% of pixels by one level; nor float images (processed otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError

BICUBIC = 3  # PILImageResampling.BICUBIC, the only resampling CLIP checkpoints use
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _keys_cubic(x: float) -> float:
    """The Keys cubic (a = -0.5) of antialiased bicubic, in torch's order of operations (`aa_filter`)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of the antialiased bicubic resize: (first input index [out], int32 fixed-point weights [out, K],
    precision bits). Output i reads inputs first[i] + k for k < K (weights past the input's end are 0)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the kernel widens when downsampling: antialiasing
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    first = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        n = min(max(min(int(center + support + 0.5), in_size) - lo, 0), taps)
        w = [_keys_cubic((j + lo - center + 0.5) * inv_scale) for j in range(n)]
        total = sum(w)
        first[i] = lo
        weights[i, :n] = [v / total for v in w] if total != 0.0 else w
    precision = 0  # the most bits under which the largest weight still fits int16
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return first, fixed, precision


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One pass along `axis` of int32 pixels: sum of taps times fixed-point weights, rounded, clamped to 0..255."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    first, fixed, precision = resize_weights(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = jnp.full((), 1 << (precision - 1), jnp.int32)
    for k in range(fixed.shape[1]):  # a few taps: each one a gather and a multiply-add, no [.., out, K] buffer
        index = np.minimum(first + k, in_size - 1)
        acc = acc + jnp.take(x, index, axis=axis) * jnp.asarray(fixed[:, k].reshape(shape))
    return jnp.clip(jnp.right_shift(acc, precision), 0, 255)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def resize_uint8(images: jax.Array, height: int, width: int) -> jax.Array:
    """uint8 [B, H, W, C] -> uint8 [B, height, width, C], antialiased bicubic exactly as torchvision on the CPU."""
    x = images.astype(jnp.int32)
    x = _resize_axis(x, 2, width)  # width first, as torch does
    x = _resize_axis(x, 1, height)
    return x.astype(jnp.uint8)


def _read_json_object(path: str) -> object | None:
    """The parsed JSON file, or None when there is no such file."""
    fs = filesystem.for_path(path)
    if not fs.exists(path) or fs.isdir(path):
        return None
    try:
        with fs.GFile(path, "rb") as f:
            return json.loads(f.read())
    except (*fs.errors, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot be read as JSON: {e}") from None


def _size_field(raw: dict, key: str, default: int, names: tuple[str, ...], path: str) -> tuple[int, ...]:
    """`raw[key]` as an int or a dict with exactly `names` (how processor configs write sizes), as a tuple."""
    value = raw.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * len(names)
    elif isinstance(value, dict) and set(value) == set(names):
        values = tuple(value[n] for n in names)
    else:
        want = " or ".join(["an integer", "{" + ", ".join(f'"{n}": N' for n in names) + "}"])
        raise WeightsError(f"{path}: '{key}' is {value!r}, expected {want}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise WeightsError(f"{path}: '{key}' is {value!r}, expected positive integers")
    return values


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """A CLIPImageProcessor's settings and, called, its pipeline as a traceable function."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float

    @classmethod
    def from_folder(cls, folder: str) -> ImageProcessing:
        """Reads the folder's image processor settings where transformers 5 looks: the "image_processor" object of
        processor_config.json (what its save_pretrained writes), else preprocessor_config.json (hub checkpoints).
        Missing keys take CLIPImageProcessor's defaults. Settings outside what CLIP checkpoints use (another
        resampling, a step turned off, a crop larger than the resize) are refused."""
        nested = os.path.join(folder, "processor_config.json")
        path = os.path.join(folder, "preprocessor_config.json")
        raw = _read_json_object(nested)
        if raw is not None and "image_processor" in raw:
            raw, path = raw["image_processor"], f"{nested}: image_processor"
        else:
            raw = _read_json_object(path)
        if raw is None:
            raise MissingError(
                f"{folder}: no CLIP image processor settings (looked for preprocessor_config.json and "
                "processor_config.json with an 'image_processor' object)"
            )
        if not isinstance(raw, dict):
            raise WeightsError(f"{path}: not a JSON object")
        for step in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if raw.get(step, True) is not True:
                raise WeightsError(f"{path}: '{step}' is {raw[step]!r}; only CLIP's full preprocessing is supported")
        if raw.get("resample", BICUBIC) != BICUBIC:
            raise WeightsError(f"{path}: 'resample' is {raw['resample']!r}; only bicubic ({BICUBIC}) is supported")
        (shortest_edge,) = _size_field(raw, "size", 224, ("shortest_edge",), path)
        crop_height, crop_width = _size_field(raw, "crop_size", 224, ("height", "width"), path)
        if max(crop_height, crop_width) > shortest_edge:
            raise WeightsError(f"{path}: 'crop_size' is larger than the resized shortest edge {shortest_edge}")
        stats = {}
        for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
            value = raw.get(key, default)
            value = [value] * 3 if isinstance(value, int | float) else value
            numbers = isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
            if not numbers or len(value) != 3:
                raise WeightsError(f"{path}: '{key}' is {raw.get(key)!r}, expected 3 numbers")
            stats[key] = tuple(float(v) for v in value)
        if not all(stats["image_std"]):
            raise WeightsError(f"{path}: 'image_std' has a zero")
        rescale = raw.get("rescale_factor", 1 / 255)
        if not isinstance(rescale, int | float) or rescale <= 0:
            raise WeightsError(f"{path}: 'rescale_factor' is {rescale!r}, expected a positive number")
        return cls(shortest_edge, crop_height, crop_width, stats["image_mean"], stats["image_std"], float(rescale))

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The shortest side becomes `shortest_edge`, the other `int(shortest_edge * long / short)`."""
        if height <= width:
            return self.shortest_edge, int(self.shortest_edge * width / height)
        return int(self.shortest_edge * height / width), self.shortest_edge

    def table(self) -> np.ndarray:
        """float32 [256, 3]: each uint8 level rescaled and normalised per channel as torchvision rounds it, with the
        rescale folded into the statistics: (v - mean / r) / (std / r), all in float32."""
        inverse = np.float32(1.0 / self.rescale_factor)
        mean, std = np.array(self.mean, np.float32) * inverse, np.array(self.std, np.float32) * inverse
        return (np.arange(256, dtype=np.float32)[:, None] - mean) / std

    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 [B, H, W, 3] -> float32 [B, crop_height, crop_width, 3], the processor's pixel values (NHWC)."""
        height, width = self.resized_size(*images.shape[1:3])
        resized = resize_uint8(images, height, width)
        top, left = (height - self.crop_height) // 2, (width - self.crop_width) // 2
        cropped = jax.lax.slice_in_dim(resized, top, top + self.crop_height, axis=1)
        cropped = jax.lax.slice_in_dim(cropped, left, left + self.crop_width, axis=2)
        return jnp.asarray(self.table())[cropped.astype(jnp.int32), jnp.arange(3)]
