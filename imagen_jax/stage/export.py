"""A trained stage as plain files: config.json, ema.safetensors and export.json, readable without orbax.

An export is what you ship or sample from: the stage config (as `imagen_jax.config.to_json` writes it) and
its EMA weights as float32 tensors named by their '/'-joined path in the params pure dict
("down/0/0/res/conv1/kernel"), with no optimizer state. The folder is written into a hidden temporary sibling
and renamed into place at the end, and `export.json` is written last, so a killed export never leaves a
folder that `is_export` accepts. Local paths only.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from typing import Any

import ml_collections
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from imagen_jax import config as config_lib
from imagen_jax.errors import MissingError, OutputError, StageError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "ema.safetensors"
METADATA_FILE = "export.json"
FORMAT = "imagen-jax-export"
FORMAT_VERSION = 1
_PARTIAL = ".partial-"


def is_export(folder: str) -> bool:
    """Whether `folder` holds a complete export (all three files; export.json is written last)."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in (METADATA_FILE, WEIGHTS_FILE, CONFIG_FILE))


def flatten_params(params: dict) -> dict[str, np.ndarray]:
    """'/'-joined path -> float32 array. Keys must survive the round trip: list indices are ints (what
    nnx.to_pure_dict gives nnx.List items), names are non-empty strings without '/' that are not all digits."""
    flat: dict[str, np.ndarray] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            if not node:
                raise ValueError(f"params: empty dict at '{'/'.join(path)}' cannot be stored as tensors")
            for key, value in node.items():
                visit(value, path + (_key_text(key, path),))
            return
        array = np.asarray(node)
        name = "/".join(path)
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ValueError(f"params: '{name}' has dtype {array.dtype}, expected floating point")
        flat[name] = np.ascontiguousarray(array, dtype=np.float32)

    if not isinstance(params, dict) or not params:
        raise ValueError(f"params must be a non-empty nested dict, got {type(params).__name__}")
    visit(params, ())
    return flat


def _key_text(key: Any, path: tuple[str, ...]) -> str:
    where = "/".join(path) or "<root>"
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return str(key)
    if isinstance(key, str) and key and "/" not in key and not key.isdigit():
        return key
    raise ValueError(f"params: key {key!r} under '{where}' cannot round-trip ('/'-joined names, int list indices)")


def unflatten_params(flat: dict[str, np.ndarray], source: str = "params") -> dict:
    """The inverse of `flatten_params`: digit segments become int keys, as nnx.to_pure_dict has them."""
    params: dict = {}
    for name, array in flat.items():
        *parents, leaf = [int(part) if part.isdigit() else part for part in name.split("/")]
        node = params
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StageError(f"{source}: tensor '{name}' lies under another tensor")
        if leaf in node:
            raise StageError(f"{source}: tensor '{name}' is also a prefix of other tensors")
        node[leaf] = array
    return params


def write_export(
    folder: str,
    config: ml_collections.ConfigDict,
    params: dict,
    *,
    step: int,
    text_dim: int,
    source: str,
    overwrite: bool = False,
) -> None:
    """Writes the export atomically. An existing non-empty `folder` is an error unless `overwrite`."""
    folder = os.path.abspath(folder)
    check_writable(folder, overwrite=overwrite)
    flat = flatten_params(params)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "step": int(step),
        "num_params": int(sum(a.size for a in flat.values())),
        "num_tensors": len(flat),
        "text_dim": int(text_dim),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}", dir=parent)
    try:
        _write_json(os.path.join(tmp, CONFIG_FILE), config_lib.to_json(config))
        save_file(flat, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": FORMAT})
        _write_json(os.path.join(tmp, METADATA_FILE), metadata)
        # mkdtemp and safetensors create owner-only (0700/0600) entries; an export is meant to be shared.
        umask = _umask()
        os.chmod(os.path.join(tmp, WEIGHTS_FILE), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        _commit(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"{folder}: cannot write the export: {e}") from e
        raise


def check_writable(folder: str, *, overwrite: bool) -> None:
    """Raises OutputError if `folder` exists and is not empty, unless `overwrite`, or if it cannot be a folder
    here (it, or the nearest existing parent, is a file; or that parent is read-only). Called before the
    restore, so that no long restore is wasted."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{folder}: exists and is a file, not an export folder")
    parent = os.path.dirname(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{folder}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: cannot be created, {parent} is not writable")
    if _non_empty(folder) and not overwrite:
        raise OutputError(f"{folder}: already exists and is not empty (--overwrite / overwrite=True replaces it)")


def _non_empty(folder: str) -> bool:
    if os.path.isdir(folder):
        return bool(os.listdir(folder))
    return os.path.exists(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: str, folder: str) -> None:
    """Renames the finished temporary folder into place; an old export is moved aside first, so `folder`
    is only ever absent or complete."""
    if _non_empty(folder):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=os.path.dirname(folder))
        os.replace(folder, os.path.join(old, "export"))
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def read_metadata(folder: str) -> dict:
    """export.json, checked for format and version."""
    path = os.path.join(folder, METADATA_FILE)
    metadata = _read_json(path, "export metadata")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise StageError(f"{path}: not an imagen-jax export (format is not {FORMAT!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise StageError(f"{path}: format_version {version!r} is not supported (this reader reads {FORMAT_VERSION})")
    return metadata


def read_config(folder: str) -> ml_collections.ConfigDict:
    """Just the stage config of an export (no tensors are read)."""
    read_metadata(folder)
    return _read_config(folder)


def _read_config(folder: str) -> ml_collections.ConfigDict:
    path = os.path.join(folder, CONFIG_FILE)
    data = _read_json(path, "stage config")
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return config_lib.from_json(data)


def read_export(folder: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, params pure dict of float32 numpy arrays, metadata). Shapes are the caller's to check."""
    metadata = read_metadata(folder)
    config = _read_config(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise MissingError(f"{path}: export weights not found")
    try:
        with safe_open(path, framework="np") as f:
            flat = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:  # truncated or corrupt: safetensors checks the header against the file size
        raise StageError(f"{path}: not a readable safetensors file: {e}") from None
    for name, array in flat.items():
        if array.dtype != np.float32:
            raise StageError(f"{path}: tensor '{name}' is {array.dtype}, expected float32")
    if len(flat) != metadata.get("num_tensors"):
        raise StageError(f"{path}: holds {len(flat)} tensors, {METADATA_FILE} says {metadata.get('num_tensors')}")
    return config, unflatten_params(flat, path), metadata


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise MissingError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"{path}: cannot read {what}: {e}") from None
