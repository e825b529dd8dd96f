"""The weight files of a Hugging Face model folder, read one tensor at a time, whatever their format.

A transformers folder holds one of (first found wins): `model.safetensors.index.json` (sharded safetensors),
`model.safetensors`, `pytorch_model.bin.index.json` (sharded PyTorch) or `pytorch_model.bin` (PyTorch's zip
format, read as data by `torch_checkpoint`, never unpickled by torch); then the same names with a precision
variant (`model.fp16.safetensors`, `model.safetensors.index.fp16.json` and its `model.fp16-00001-of-00002...`
shards, as `save_pretrained(variant="fp16")` writes them). google/t5-v1_1-xxl's main branch ships
`pytorch_model.bin` only; DeepFloyd IF's text encoder ships fp16 shards. A diffusers model folder (`unet/`) names
its files `diffusion_pytorch_model.*` instead (`DIFFUSERS_STEMS`).
Tensors are read when asked for, so a loader that wants the encoder never reads a
decoder, and memory holds one tensor at a time. A folder at a URL (gs://...) is read through tf.io.gfile; each
weight file is copied to the local cache (filesystem.local_copy) when a tensor is first read from it, so only
the shards that hold the tensors asked for are copied.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError
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
            local = filesystem.local_copy(path)
            if self.kind == "safetensors":
                self._handles[path] = self._stack.enter_context(safe_open(local, framework="np"))
            else:
                checkpoint = TorchCheckpoint(local)
                self._stack.callback(checkpoint.close)
                self._handles[path] = checkpoint
        return self._handles[path]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> np.ndarray:
        if key not in self.where:
            raise WeightsError(f"{self.source}: missing tensor '{key}'")
        handle = self._open(self.where[key])
        if self.kind == "safetensors":
            return handle.get_tensor(key)
        if key not in handle.tensors:
            raise WeightsError(f"{self.where[key]}: missing tensor '{key}' (named in {self.source})")
        return handle.get(key)
