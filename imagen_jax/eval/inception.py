"""The FID InceptionV3 in Flax NNX: uint8 images of any size -> the 2048-d pool3 features of FID, KID and
precision/recall.

The network is TensorFlow's `inception-2015-12-05` graph, which FID was defined with, as pytorch-fid and
torch-fidelity port it; it differs from torchvision's InceptionV3 where the TF graph does: its average pools
ignore the zero padding (count_include_pad=False) and the last block (Mixed_7c) max-pools its pool branch.
Preprocessing is torch-fidelity's, which reproduces the graph's: one bilinear resize to 299x299 exactly as
TensorFlow 1.x computes it (no antialiasing, no half-pixel centres: source = dest * in / out), then
(x - 128) / 128. Layout NHWC; each batch norm (inference form, eps 1e-3) is folded into its convolution at load
time, in float64. Convolutions run at full float32 precision on every backend (FID is sensitive to small
feature changes; accelerators would otherwise multiply in bfloat16 or TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax import flax_settings  # noqa: F401  (before any variable is built)
from imagen_jax.eval.inception_weights import BN_EPS, BN_TENSORS, CONVS, ConvSpec, read_weights

INPUT_SIZE = 299
FEATURE_DIM = 2048


class Conv(nnx.Module):
    """Convolution with its batch norm folded in (kernel HWIO, bias), then ReLU."""

    def __init__(self, name: str) -> None:
        spec: ConvSpec = CONVS[name]
        self.kernel = nnx.Param(jnp.zeros((*spec.kernel, spec.cin, spec.cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((spec.cout,), jnp.float32))
        self.stride = spec.stride
        self.padding = tuple((p, p) for p in spec.padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return jax.nn.relu(y + self.bias[...])


def _window_counts(n: int) -> np.ndarray:
    """How many of the 3 taps of a stride-1, pad-1 window fall inside a length-n axis, per position."""
    i = np.arange(n)
    return (np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1).astype(np.float32)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool over the window's inside part only (TF's; torch's count_include_pad=False)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    counts = np.outer(_window_counts(x.shape[1]), _window_counts(x.shape[2]))
    return summed / counts[None, :, :, None]


def max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


class _Block(nnx.Module):
    """A mixed block: its convolutions, named as in the weight files (`Mixed_5b.branch1x1`, ...)."""

    def __init__(self, name: str) -> None:
        prefix = f"{name}."
        for path in CONVS:
            if path.startswith(prefix):
                setattr(self, path[len(prefix) :], Conv(path))


class InceptionA(_Block):
    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_3x3(x))], axis=-1)


class InceptionB(_Block):
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(_Block):
    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_3x3(x))], axis=-1)


class InceptionD(_Block):
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b average-pools its pool branch; the TF graph's Mixed_7c max-pools it (`max_pool=True`)."""

    def __init__(self, name: str, max_pool: bool) -> None:
        super().__init__(name)
        self.max_pool = max_pool

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool_3x3(x, 1, padding=1) if self.max_pool else avg_pool_3x3(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(b3),
            self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d),
            self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ]
        return jnp.concatenate(branches, axis=-1)


def _tf1_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1's bilinear sampling along one axis: source = dest * (in / out) in float32; lower and upper neighbour
    and the upper one's weight."""
    source = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lower = source.astype(np.int64)
    return lower, np.minimum(lower + 1, n_in - 1), source - lower.astype(np.float32)


def resize_like_tf1(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """Bilinear resize of [N, H, W, C] to `size` as TensorFlow 1.x's resize_bilinear (align_corners=False), in
    float32, in the order torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` computes it."""
    x = images.astype(jnp.float32)
    y_lo, y_hi, dy = _tf1_taps(x.shape[1], size[0])
    x_lo, x_hi, dx = _tf1_taps(x.shape[2], size[1])
    top, bottom = jnp.take(x, y_lo, axis=1), jnp.take(x, y_hi, axis=1)
    dx = dx[None, None, :, None]
    upper = jnp.take(top, x_lo, axis=2) + (jnp.take(top, x_hi, axis=2) - jnp.take(top, x_lo, axis=2)) * dx
    lower = jnp.take(bottom, x_lo, axis=2) + (jnp.take(bottom, x_hi, axis=2) - jnp.take(bottom, x_lo, axis=2)) * dx
    return upper + (lower - upper) * dy[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [N, H, W, 3] of any size -> the network's float32 input [N, 299, 299, 3] in [-1, 1)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
        raise ValueError(f"Inception input must be uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    return (resize_like_tf1(images) - 128.0) / 128.0


class InceptionV3(nnx.Module):
    """The FID network: `model(images)` maps uint8 [N, H, W, 3] to float32 [N, 2048] pool3 features.
    `weights_id` names the weights (see inception_weights), so features of different weights are never mixed."""

    def __init__(self, weights_id: str = "", source_sha256: str = "") -> None:
        self.weights_id = weights_id
        self.source_sha256 = source_sha256
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"):
            setattr(self, name, Conv(name))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (InceptionA(f"Mixed_5{c}") for c in "bcd")
        self.Mixed_6a = InceptionB("Mixed_6a")
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (InceptionC(f"Mixed_6{c}") for c in "bcde")
        self.Mixed_7a = InceptionD("Mixed_7a")
        self.Mixed_7b = InceptionE("Mixed_7b", max_pool=False)
        self.Mixed_7c = InceptionE("Mixed_7c", max_pool=True)

    def trunk(self, x: jax.Array) -> jax.Array:
        """Preprocessed float32 [N, 299, 299, 3] -> [N, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool_3x3(x, 2)))
        x = max_pool_3x3(x, 2)
        for block in "5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c":
            x = getattr(self, f"Mixed_{block}")(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.trunk(preprocess(images))


def inception_features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    """Pure form of `InceptionV3.__call__` for jit: `jax.jit(inception_features, static_argnums=0)`, the state
    an argument (replicated), the images' batch axis shardable over devices."""
    return nnx.merge(graphdef, state)(images)


def _fold(tensors: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight (out, in, kh, kw) and its batch norm -> HWIO kernel and bias, computed in float64."""
    w = tensors[f"{name}.conv.weight"].astype(np.float64)
    gamma, beta, mean, var = (tensors[f"{name}.bn.{t}"].astype(np.float64) for t in BN_TENSORS)
    scale = gamma / np.sqrt(var + BN_EPS)
    kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    return kernel.astype(np.float32), (beta - mean * scale).astype(np.float32)


def load_inception(path: str) -> InceptionV3:
    """The network with the weights of a file written by tools.convert_inception or make_random_inception."""
    tensors, metadata = read_weights(path)
    abstract = nnx.eval_shape(lambda: InceptionV3(metadata["weights_id"], metadata.get("source_sha256", "")))
    graphdef, state = nnx.split(abstract)
    folded = {name: dict(zip(("kernel", "bias"), _fold(tensors, name))) for name in CONVS}
    flat = [
        (where, variable.replace(jnp.asarray(folded[".".join(map(str, where[:-1]))][where[-1]])))
        for where, variable in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
