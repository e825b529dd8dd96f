"""PyTorch checkpoints (`pytorch_model.bin`, `.pth`) read as data, never as code.

Two layouts exist. Since torch 1.6, `torch.save` writes a zip archive: `<name>/data.pkl`, a pickle of the state
dict, and `<name>/data/<key>`, each a storage's raw bytes. Before, it wrote the legacy stream: five pickles back
to back (a magic number, the protocol version, system info, the state dict, the list of storage keys), then each
storage in that order as an int64 element count and its raw bytes; files released around 2019 (the FID Inception
weights among them) are in this layout. `torch.load` runs the pickle, and a pickle can call any function. Here
every pickle is read by an unpickler that knows four things (an ordered dict, a tensor rebuilt from a storage, a
parameter wrapping one, and the storage types) and refuses every other global or persistent id with a one-line
`WeightsError`, so nothing a file names is ever imported or called. Tensors come back as `LazyTensor`s (storage,
offset, shape, strides) and are read from the file one at a time, when asked for: loading T5-XXL holds one tensor
at a time. A box of a contiguous tensor (`get(name, region)`) reads only the bytes it covers (text/regions.py): the
archive's entries are stored uncompressed, so a storage's bytes sit at a known offset of the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from imagen_jax.errors import WeightsError
from imagen_jax.text import regions

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


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy stream
_LEGACY_PROTOCOL = 1001
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)


class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors and nothing else. A zip archive's storage ids are ('storage', type, key, location, numel);
    the legacy stream's carry a sixth field, a view of another storage, which torch stopped writing in 0.4: refused.
    `storages` collects every storage named, by key."""

    def __init__(self, file: Any, legacy: bool = False) -> None:
        super().__init__(file)
        self._fields = 6 if legacy else 5
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"pickled global {module}.{name}")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == self._fields
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and (self._fields == 5 or pid[5] is None)
        ):
            raise _Refused(f"persistent id {str(pid)[:80]}")
        return self.storages.setdefault(str(pid[2]), _Storage(str(pid[2]), pid[1].dtype, int(pid[4])))


def _contiguous(t: LazyTensor) -> bool:
    return all(s == math.prod(t.shape[d + 1 :]) for d, s in enumerate(t.strides) if t.shape[d] > 1)


class TorchCheckpoint:
    """One PyTorch checkpoint (zip archive or legacy stream): its tensor names, and each tensor read on demand as a
    NumPy array. `file`: the checkpoint already open (seekable, e.g. a tf.io.gfile.GFile of a URL), else `path` is
    opened; `gap`: see regions.read_region. `bytes_read` counts the tensor bytes read so far."""

    def __init__(self, path: str, file: BinaryIO | None = None, gap: int = regions.LOCAL_GAP) -> None:
        self.path, self._gap, self.bytes_read = path, gap, 0
        self._zip: zipfile.ZipFile | None = None
        self._file: BinaryIO = file if file is not None else open(path, "rb")  # noqa: SIM115 (closed by close())
        self._where: dict[str, tuple[int, int]] = {}  # storage key -> (byte offset, elements stored)
        state = self._open_zip() if zipfile.is_zipfile(self._file) else self._open_legacy()
        if not isinstance(state, dict) or not all(isinstance(v, LazyTensor) for v in state.values()):
            self.close()
            raise WeightsError(f"{path}: the pickle is not a state dict of tensors")
        self.tensors: dict[str, LazyTensor] = dict(state)

    def _unpickle(self, file: Any, legacy: bool = False) -> tuple[Any, dict[str, _Storage]]:
        unpickler = _TensorUnpickler(file, legacy)
        try:
            return unpickler.load(), unpickler.storages
        except _Refused as e:
            self.close()
            raise WeightsError(f"{self.path}: refused {e}: only tensors are read from PyTorch checkpoints") from None
        except _PICKLE_ERRORS as e:
            self.close()
            raise WeightsError(f"{self.path}: unreadable state dict pickle ({type(e).__name__}: {e})") from None

    def _open_zip(self) -> Any:
        self._zip = zipfile.ZipFile(self._file)
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            self.close()
            raise WeightsError(f"{self.path}: expected one <name>/data.pkl in the archive, found {len(pickles)}")
        self._prefix = pickles[0][: -len("data.pkl")]
        return self._unpickle(io.BytesIO(self._zip.read(pickles[0])))[0]

    def _open_legacy(self) -> Any:
        f = self._file
        f.seek(0)
        try:
            magic = _TensorUnpickler(f).load()
        except (_Refused, *_PICKLE_ERRORS):
            magic = None
        if magic != _LEGACY_MAGIC:
            self.close()
            raise WeightsError(
                f"{self.path}: not a PyTorch checkpoint (neither a zip archive nor torch's legacy format)"
            )
        protocol, sys_info = self._unpickle(f)[0], self._unpickle(f)[0]
        if protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            self.close()
            raise WeightsError(
                f"{self.path}: a legacy PyTorch file of protocol {protocol} ({sys_info}); only little-endian protocol "
                f"{_LEGACY_PROTOCOL} files are read"
            )
        state, storages = self._unpickle(f, legacy=True)
        keys = self._unpickle(f)[0]
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            self.close()
            raise WeightsError(f"{self.path}: the storage list does not match the storages the state dict names")
        end = f.tell()
        size = f.seek(0, os.SEEK_END)
        for key in map(str, keys):
            f.seek(end)
            head = f.read(8)
            numel = int.from_bytes(head, "little", signed=True) if len(head) == 8 else size
            self._where[key] = (end + 8, numel)
            end += 8 + max(numel, 0) * storages[key].dtype.itemsize
        if end > size:
            self.close()
            raise WeightsError(f"{self.path}: truncated: its storages need {end} bytes, the file has {size}")
        return state

    def _entry(self, name: str, storage: _Storage) -> zipfile.ZipInfo:
        try:
            return self._zip.getinfo(f"{self._prefix}data/{storage.key}")
        except KeyError:
            raise WeightsError(f"{self.path}: storage {storage.key} of tensor '{name}' is missing") from None

    def _offset(self, name: str, storage: _Storage) -> int | None:
        """The file offset of a storage's first byte, when its bytes lie there as they are (None: compressed)."""
        if self._zip is None:
            return self._where[storage.key][0]
        entry = self._entry(name, storage)
        if entry.compress_type != zipfile.ZIP_STORED:
            return None
        if storage.key not in self._where:
            self._file.seek(entry.header_offset)
            header = self._file.read(30)  # the entry's local header: its name and extra field come after it
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise WeightsError(f"{self.path}: storage {storage.key} of tensor '{name}' has no local header")
            skip = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            self._where[storage.key] = (entry.header_offset + 30 + skip, storage.numel)
        return self._where[storage.key][0]

    def _read(self, name: str, storage: _Storage) -> bytes:
        if self._zip is not None:
            data = self._zip.read(self._entry(name, storage).filename)
        else:
            offset, numel = self._where[storage.key]
            self._file.seek(offset)
            data = self._file.read(max(numel, 0) * storage.dtype.itemsize)
        self.bytes_read += len(data)
        return data

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str, region: regions.Region | None = None) -> np.ndarray:
        """The tensor `name` (or its box `region`, [start, stop) per dimension) as a contiguous array. A box of a
        contiguous tensor reads only the bytes it covers; otherwise the tensor's storage is read whole."""
        t = self.tensors[name]
        if region is not None and region != regions.whole(t.shape) and _contiguous(t):
            base = self._offset(name, t.storage)
            item = t.storage.dtype.itemsize
            if base is not None and t.offset >= 0 and t.offset + math.prod(t.shape) <= t.storage.numel:
                array, read = regions.read_region(
                    self._file, base + t.offset * item, t.storage.dtype, t.shape, region, self._gap,
                    f"{self.path}: tensor '{name}'",
                )  # fmt: skip
                self.bytes_read += read
                return array
        whole = self._whole(name, t)
        return whole if region is None else np.array(whole[tuple(slice(a, b) for a, b in region)])

    def _whole(self, name: str, t: LazyTensor) -> np.ndarray:
        flat = np.frombuffer(self._read(name, t.storage), dtype=t.storage.dtype)
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.strides) if n > 0)
        if flat.size < t.storage.numel or t.offset < 0 or min(t.strides, default=0) < 0 or last >= max(flat.size, 1):
            raise WeightsError(f"{self.path}: tensor '{name}' lies outside its storage ({flat.size} elements)")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[t.offset :], t.shape, tuple(s * item for s in t.strides))
        return np.array(view, order="C")  # a copy: owns its memory, C-contiguous, writable

    def close(self) -> None:
        for handle in (self._zip, self._file):
            if handle is not None:
                handle.close()
