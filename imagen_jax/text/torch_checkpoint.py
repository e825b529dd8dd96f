"""PyTorch checkpoints (`pytorch_model.bin`) read as data, never as code.

A PyTorch checkpoint is a zip archive: `<name>/data.pkl`, a pickle of the state dict, and `<name>/data/<key>`,
each a storage's raw bytes. `torch.load` runs the pickle, and a pickle can call any function. Here it is read by
an unpickler that knows four things (an ordered dict, a tensor rebuilt from a storage, a parameter wrapping one,
and the storage types) and refuses every other global or persistent id with a one-line `WeightsError`, so
nothing a file names is ever imported or called. Tensors come back as `LazyTensor`s (storage, offset, shape,
strides) and are read from the archive one at a time, when asked for: loading T5-XXL holds one tensor at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from imagen_jax.errors import WeightsError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """Where a tensor's elements are: `storage` (an archive entry), element `offset`, `shape` and `strides`."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple, strides: tuple, *_: Any) -> LazyTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor rebuilt from {type(storage).__name__}, not a storage")
    return LazyTensor(storage, int(offset), tuple(int(s) for s in shape), tuple(int(s) for s in strides))


def _rebuild_parameter(data: LazyTensor, *_: Any) -> LazyTensor:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Refused(Exception):
    pass


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"pickled global {module}.{name}")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _Refused(f"persistent id {str(pid)[:80]}")
        return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))


class TorchCheckpoint:
    """One `pytorch_model.bin` (zip format): its tensor names, and each tensor read on demand as a NumPy array."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise WeightsError(
                f"{path}: not a zip-format PyTorch checkpoint (files saved by torch < 1.6 are not read; re-save "
                "it with a current torch or convert it to safetensors)"
            ) from None
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: expected one <name>/data.pkl in the archive, found {len(pickles)}")
        self._prefix = pickles[0][: -len("data.pkl")]
        try:
            state = _TensorUnpickler(io.BytesIO(self._zip.read(pickles[0]))).load()
        except _Refused as e:
            raise WeightsError(f"{path}: refused {e}: only tensors are read from PyTorch checkpoints") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise WeightsError(f"{path}: unreadable state dict pickle ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, LazyTensor) for v in state.values()):
            raise WeightsError(f"{path}: the pickle is not a state dict of tensors")
        self.tensors: dict[str, LazyTensor] = dict(state)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a contiguous array (its storage is read from the archive, nothing else)."""
        t = self.tensors[name]
        try:
            raw = self._zip.read(f"{self._prefix}data/{t.storage.key}")
        except KeyError:
            raise WeightsError(f"{self.path}: storage {t.storage.key} of tensor '{name}' is missing") from None
        flat = np.frombuffer(raw, dtype=t.storage.dtype)
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.strides) if n > 0)
        if flat.size < t.storage.numel or t.offset < 0 or min(t.strides, default=0) < 0 or last >= max(flat.size, 1):
            raise WeightsError(f"{self.path}: tensor '{name}' lies outside its storage ({flat.size} elements)")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[t.offset :], t.shape, tuple(s * item for s in t.strides))
        return np.array(view, order="C")  # a copy: owns its memory, C-contiguous, writable

    def close(self) -> None:
        self._zip.close()
