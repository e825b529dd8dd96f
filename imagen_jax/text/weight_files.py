"""The weight files of a Hugging Face model folder, read one tensor at a time, whatever their format.

A transformers folder holds one of (first found wins): `model.safetensors.index.json` (sharded safetensors),
`model.safetensors`, `pytorch_model.bin.index.json` (sharded PyTorch) or `pytorch_model.bin` (PyTorch's zip
format, read as data by `torch_checkpoint`, never unpickled by torch); then the same names with a precision
variant (`model.fp16.safetensors`, `model.safetensors.index.fp16.json` and its `model.fp16-00001-of-00002...`
shards, as `save_pretrained(variant="fp16")` writes them). google/t5-v1_1-xxl's main branch ships
`pytorch_model.bin` only; DeepFloyd IF's text encoder ships fp16 shards. A diffusers model folder (`unet/`) names
its files `diffusion_pytorch_model.*` instead (`DIFFUSERS_STEMS`).
Tensors are read when asked for, so a loader that wants the encoder never reads a
decoder, and memory holds one tensor at a time; `get(key, region)` reads only a box of a tensor (a pod host's
slices of it: text/regions.py). Files are read in place, a folder at a URL (gs://...) through tf.io.gfile's
seekable files, so a host reads the bytes it uses and no more (`bytes_read`); nothing is copied.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError
from imagen_jax.text import regions
from imagen_jax.text.torch_checkpoint import TorchCheckpoint

TRANSFORMERS_STEMS = ("model", "pytorch_model")  # file stems of (safetensors, PyTorch) weights
DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
# Full precision first: a folder that has both keeps float32 weights float32.
VARIANTS = (None, "fp16", "bf16")


def _formats(stems: tuple[str, str]) -> list[tuple[str, str, str]]:
    """(index file, single file, opener) per format, in order of preference."""
    formats = []
    for variant in VARIANTS:
        for stem, extension, kind in ((stems[0], "safetensors", "safetensors"), (stems[1], "bin", "torch")):
            if variant is None:
                formats.append((f"{stem}.{extension}.index.json", f"{stem}.{extension}", kind))
            else:
                formats.append((f"{stem}.{extension}.index.{variant}.json", f"{stem}.{variant}.{extension}", kind))
    return formats


# safetensors' dtype names (its format specification), as NumPy dtypes
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}  # fmt: skip
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on a header's size


class SafetensorsFile:
    """A safetensors file read in place: an 8-byte little-endian header size, a JSON header naming each tensor's
    dtype, shape and [begin, end) byte offsets into the payload that follows, then the payload. Tensors (or boxes
    of them) are read from a seekable file when asked for; `bytes_read` counts their bytes."""

    def __init__(self, path: str, file: Any, gap: int) -> None:
        self.path, self._file, self._gap, self.bytes_read = path, file, gap, 0
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            raise WeightsError(f"{path}: not a safetensors file (header size {length}, file size {size})")
        try:
            header = json.loads(file.read(length))
        except ValueError as e:
            raise WeightsError(f"{path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{path}: the safetensors header is not a JSON object")
        self._base, payload = 8 + length, size - 8 - length
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(int(n) for n in info["shape"])
                begin, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{path}: tensor '{name}' has an unreadable entry {str(info)[:120]}") from None
            if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= payload:
                raise WeightsError(
                    f"{path}: tensor '{name}' ({info['dtype']} {list(shape)}) does not fit its bytes "
                    f"[{begin}, {end}) of a {payload}-byte payload"
                )
            self.tensors[name] = (dtype, shape, begin)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get(self, name: str, region: regions.Region | None = None) -> np.ndarray:
        dtype, shape, begin = self.tensors[name]
        array, read = regions.read_region(
            self._file, self._base + begin, dtype, shape, region or regions.whole(shape), self._gap,
            f"{self.path}: tensor '{name}'",
        )  # fmt: skip
        self.bytes_read += read
        return array


class WeightFolder:
    """Tensor names and lazily read tensors (NumPy) of a model folder; files are closed with `stack`.
    `stems`: the names its weight files start with (transformers' by default; `DIFFUSERS_STEMS`)."""

    def __init__(self, folder: str, stack: contextlib.ExitStack, stems: tuple[str, str] = TRANSFORMERS_STEMS) -> None:
        self._stack = stack
        self._handles: dict[str, Any] = {}
        self._fs = fs = filesystem.for_path(folder)
        formats = _formats(stems)
        for index_name, single_name, kind in formats:
            index, single = os.path.join(folder, index_name), os.path.join(folder, single_name)
            if fs.exists(index) or fs.exists(single):
                self.kind = kind
                break
        else:
            names = ", ".join(n for pair in formats[:2] for n in pair[:2][::-1])
            raise MissingError(f"{folder}: no weights (looked for {names}, and their fp16/bf16 variants)")
        if fs.exists(index):
            try:
                with fs.GFile(index, "rb") as f:
                    weight_map = json.loads(f.read()).get("weight_map")
            except (*fs.errors, ValueError, AttributeError) as e:
                raise WeightsError(f"{index}: not a readable index ({e})") from None
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index}: missing key 'weight_map'")
            self.source = index
            self.where = {key: os.path.join(folder, name) for key, name in weight_map.items()}
        else:
            self.source = single
            self.where = dict.fromkeys(self._open(single).keys(), single)

    def _open(self, path: str) -> Any:
        if path not in self._handles:
            if not self._fs.exists(path) or self._fs.isdir(path):
                raise MissingError(f"{path}: weight file named in {self.source} not found")
            file = self._stack.enter_context(self._fs.GFile(path, "rb"))
            gap = regions.LOCAL_GAP if self._fs is filesystem.LOCAL else regions.URL_GAP
            if self.kind == "safetensors":
                self._handles[path] = SafetensorsFile(path, file, gap)
            else:
                self._handles[path] = TorchCheckpoint(path, file, gap)
        return self._handles[path]

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far, from every file."""
        return sum(handle.bytes_read for handle in self._handles.values())

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def _handle(self, key: str) -> Any:
        if key not in self.where:
            raise WeightsError(f"{self.source}: missing tensor '{key}'")
        handle = self._open(self.where[key])
        if key not in handle.tensors:
            raise WeightsError(f"{self.where[key]}: missing tensor '{key}' (named in {self.source})")
        return handle

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of tensor `key` (its file's header is read; none of its elements)."""
        return self._handle(key).shape(key)

    def get(self, key: str, region: regions.Region | None = None) -> np.ndarray:
        """Tensor `key`, or only its box `region` ([start, stop) per stored dimension), read from its file."""
        return self._handle(key).get(key, region)
