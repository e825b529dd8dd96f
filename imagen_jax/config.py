"""Experiment configs: load `configs/*.py`, apply strict `--config.a.b=value` overrides, save as JSON.

A config file is a plain Python module with `get_config()`; it imports its defaults from the installed package
(`imagen_jax.stage.config.base_config`), so no sys.path tricks are needed to load one. Overrides are strict on
purpose: a typo in a key or a value of the wrong type on a pod launch should fail in the first second with a
message naming it, not after the model compiled. Loading one is light: it imports no JAX model code until the
config file itself does.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import traceback
from typing import Any

import ml_collections

from imagen_jax.errors import ConfigError

PREFIX = "--config."


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_imagen_config", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path!r} has no get_config() function")
        config = module.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r} line {e.lineno}: {type(e).__name__}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's code: name its line, not ours
        raise ConfigError(f"config file {path!r}{_line_in(path, e)}: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path!r} returned {type(config).__name__}, not a ConfigDict")
    return config


def _line_in(path: str, error: BaseException) -> str:
    """' line N' of the innermost frame of `error`'s traceback that lies in `path` ('' when none does)."""
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)
    ]
    return f" line {frames[-1].lineno}" if frames else ""


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, prefix + key + "."))
    return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` into the type of the current value of `key`."""
    if isinstance(current, str) or current is None:
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key!r} expects a bool (true/false), got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, (int, float, str)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config key {key!r} expects a tuple like (1, 2), got {text!r}")
        return type(current)(value)
    if type(value) is not type(current):
        raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}")
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` to the parsed `text`; unknown keys and wrong types raise ConfigError."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise _unknown(config, ".".join(parents[: i + 1]))
        node = child
    if leaf not in node:
        raise _unknown(config, key)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; set one of its fields, e.g. {key}.<field>=...")
    with node.unlocked():
        node[leaf] = _parse_value(key, text, current)


def _unknown(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(config), n=1, cutoff=0.85)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def apply_overrides(config: ml_collections.ConfigDict, args: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `--config.a.b value`) arguments; anything else is an error."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(PREFIX):
            raise ConfigError(
                f"unrecognised argument {arg!r} (config overrides look like --config.train.batch_size=64)"
            )
        body = arg[len(PREFIX) :]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(args):
            key, text = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"config override {arg!r} has no value")
        apply_override(config, key, text)
        i += 1
    return config


def to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe dict of the config (tuples become lists)."""
    return json.loads(config.to_json())


def from_json(data: dict) -> ml_collections.ConfigDict:
    """Rebuilds a ConfigDict saved with `to_json`, restoring lists to tuples as configs use them."""

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return ml_collections.ConfigDict({k: convert(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(convert(v) for v in value)
        return value

    return convert(data)
