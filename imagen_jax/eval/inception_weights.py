"""The FID InceptionV3's weights as data: the tensor layout, the safetensors file the model loads, random weights.

The FID network is the TensorFlow graph `inception-2015-12-05` (pool3 features); pytorch-fid and torch-fidelity
ship it as `pt_inception-2015-12-05-6726825d.pth` / `weights-inception-2015-12-05-6726825d.pth`, the same file
(torch hub names end in the first hex digits of the file's sha256) with torchvision's names:
`Mixed_5b.branch1x1.conv.weight` (out, in, kh, kw), `Mixed_5b.branch1x1.bn.{weight,bias,running_mean,
running_var}` (eps 1e-3), and an unused 1008-way `fc`. `tools.convert_inception` copies the convolution and batch
norm tensors once, unchanged (float32, torch layout and names), into a safetensors file whose metadata records
where they came from (`weights_id`, `source_sha256`), so statistics computed with one set of weights can refuse
features from another. NumPy only (no JAX), so that command lines and the torch fixture script can use it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from typing import NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from imagen_jax.errors import MissingError, WeightsError

BN_EPS = 1e-3  # TensorFlow's batch norm epsilon in the 2015 graph
STANDARD_SHA256_PREFIX = "6726825d"  # pt_inception-2015-12-05-6726825d.pth
STANDARD_WEIGHTS_ID = f"inception-2015-12-05-{STANDARD_SHA256_PREFIX}"
FORMAT = "imagen_jax.inception_v3"  # the metadata key "format" of a file load_inception reads
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


class ConvSpec(NamedTuple):
    """One convolution + batch norm + ReLU: channels, kernel (h, w), stride, zero padding (h, w)."""

    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)


def _same(cin: int, cout: int, kh: int, kw: int | None = None) -> ConvSpec:
    """A stride-1 convolution that keeps the spatial size."""
    kw = kh if kw is None else kw
    return ConvSpec(cin, cout, (kh, kw), 1, (kh // 2, kw // 2))


def _valid(cin: int, cout: int, k: int, stride: int = 1) -> ConvSpec:
    return ConvSpec(cin, cout, (k, k), stride)


def _block_a(cin: int, pool: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": _same(cin, 64, 1),
        "branch5x5_1": _same(cin, 48, 1),
        "branch5x5_2": _same(48, 64, 5),
        "branch3x3dbl_1": _same(cin, 64, 1),
        "branch3x3dbl_2": _same(64, 96, 3),
        "branch3x3dbl_3": _same(96, 96, 3),
        "branch_pool": _same(cin, pool, 1),
    }


def _block_b(cin: int) -> dict[str, ConvSpec]:
    return {
        "branch3x3": _valid(cin, 384, 3, 2),
        "branch3x3dbl_1": _same(cin, 64, 1),
        "branch3x3dbl_2": _same(64, 96, 3),
        "branch3x3dbl_3": _valid(96, 96, 3, 2),
    }


def _block_c(cin: int, c7: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": _same(cin, 192, 1),
        "branch7x7_1": _same(cin, c7, 1),
        "branch7x7_2": _same(c7, c7, 1, 7),
        "branch7x7_3": _same(c7, 192, 7, 1),
        "branch7x7dbl_1": _same(cin, c7, 1),
        "branch7x7dbl_2": _same(c7, c7, 7, 1),
        "branch7x7dbl_3": _same(c7, c7, 1, 7),
        "branch7x7dbl_4": _same(c7, c7, 7, 1),
        "branch7x7dbl_5": _same(c7, 192, 1, 7),
        "branch_pool": _same(cin, 192, 1),
    }


def _block_d(cin: int) -> dict[str, ConvSpec]:
    return {
        "branch3x3_1": _same(cin, 192, 1),
        "branch3x3_2": _valid(192, 320, 3, 2),
        "branch7x7x3_1": _same(cin, 192, 1),
        "branch7x7x3_2": _same(192, 192, 1, 7),
        "branch7x7x3_3": _same(192, 192, 7, 1),
        "branch7x7x3_4": _valid(192, 192, 3, 2),
    }


def _block_e(cin: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": _same(cin, 320, 1),
        "branch3x3_1": _same(cin, 384, 1),
        "branch3x3_2a": _same(384, 384, 1, 3),
        "branch3x3_2b": _same(384, 384, 3, 1),
        "branch3x3dbl_1": _same(cin, 448, 1),
        "branch3x3dbl_2": _same(448, 384, 3),
        "branch3x3dbl_3a": _same(384, 384, 1, 3),
        "branch3x3dbl_3b": _same(384, 384, 3, 1),
        "branch_pool": _same(cin, 192, 1),
    }


def _all_convs() -> dict[str, ConvSpec]:
    convs = {
        "Conv2d_1a_3x3": _valid(3, 32, 3, 2),
        "Conv2d_2a_3x3": _valid(32, 32, 3),
        "Conv2d_2b_3x3": _same(32, 64, 3),
        "Conv2d_3b_1x1": _same(64, 80, 1),
        "Conv2d_4a_3x3": _valid(80, 192, 3),
    }
    blocks = {
        "Mixed_5b": _block_a(192, 32),
        "Mixed_5c": _block_a(256, 64),
        "Mixed_5d": _block_a(288, 64),
        "Mixed_6a": _block_b(288),
        "Mixed_6b": _block_c(768, 128),
        "Mixed_6c": _block_c(768, 160),
        "Mixed_6d": _block_c(768, 160),
        "Mixed_6e": _block_c(768, 192),
        "Mixed_7a": _block_d(768),
        "Mixed_7b": _block_e(1280),
        "Mixed_7c": _block_e(2048),
    }
    for block, members in blocks.items():
        convs.update({f"{block}.{name}": spec for name, spec in members.items()})
    return convs


CONVS: dict[str, ConvSpec] = _all_convs()  # torchvision's module path of each conv -> its shape


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor the network reads, by its name in the .pth files, with its torch shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in CONVS.items():
        shapes[f"{name}.conv.weight"] = (spec.cout, spec.cin, *spec.kernel)
        shapes.update({f"{name}.bn.{t}": (spec.cout,) for t in BN_TENSORS})
    return shapes


def random_weights(seed: int) -> dict[str, np.ndarray]:
    """Full-size random weights, the same for a seed on every machine (each tensor from its own stream, keyed by
    seed and name). He-normal kernels and batch norms near identity keep activations of order one through all
    the layers, so features neither vanish nor blow up; the batch norm statistics are not trivial, so a
    mis-mapped or mis-folded one shows."""
    tensors = {}
    for name, shape in tensor_shapes().items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        kind = name.rsplit(".", 1)[1]
        if kind == "weight" and len(shape) == 4:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif kind == "weight":
            value = rng.uniform(0.8, 1.2, shape)
        elif kind == "running_var":
            value = rng.uniform(0.8, 1.25, shape)
        else:  # bias, running_mean
            value = 0.1 * rng.standard_normal(shape)
        tensors[name] = value.astype(np.float32)
    return tensors


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_weights(path: str, tensors: dict[str, np.ndarray], *, weights_id: str, source_sha256: str) -> None:
    """Writes `tensors` (exactly the network's, float32) with their provenance; a temporary name is renamed when
    complete, so `path` is never half-written."""
    shapes = tensor_shapes()
    if set(tensors) != set(shapes):
        missing = sorted(set(shapes) - set(tensors)) or sorted(set(tensors) - set(shapes))
        raise WeightsError(f"{path}: Inception tensors differ from the network's at '{missing[0]}'")
    metadata = {"format": FORMAT, "weights_id": weights_id, "source_sha256": source_sha256}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".inception-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(tensors[k], np.float32) for k in shapes}, staging, metadata=metadata)
        os.replace(staging, path)
    except BaseException:
        os.remove(staging)
        raise


def make_random_inception(path: str, seed: int = 0) -> str:
    """Writes full-size random weights (`random_weights(seed)`) in load_inception's format, for the demo and tests
    (the real weights cannot be downloaded there); returns their weights_id."""
    weights_id = f"random-seed-{seed}"
    write_weights(path, random_weights(seed), weights_id=weights_id, source_sha256="")
    return weights_id


def read_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (float32, torch layout) and metadata of a file written by `write_weights`; a missing tensor or
    one of the wrong shape is a one-line WeightsError naming it."""
    if not os.path.isfile(path):
        raise MissingError(
            f"{path}: Inception weights not found (convert pt_inception-2015-12-05-6726825d.pth once with "
            "python -m imagen_jax.tools.convert_inception)"
        )
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or "weights_id" not in metadata:
                raise WeightsError(
                    f"{path}: not an Inception weight file of imagen_jax.tools.convert_inception (its metadata "
                    f"has no format '{FORMAT}' and weights_id)"
                )
            stored = set(f.keys())
            tensors = {}
            for name, shape in tensor_shapes().items():
                if name not in stored:
                    raise WeightsError(f"{path}: missing Inception tensor '{name}'")
                value = f.get_tensor(name)
                if value.shape != shape:
                    raise WeightsError(f"{path}: Inception tensor '{name}' has shape {value.shape}, expected {shape}")
                tensors[name] = value.astype(np.float32, copy=False)
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata
