"""LoRA (arXiv 2106.09685) for any stage's U-Net: low-rank adapters beside chosen kernels, merged into them where
the weights are used, and the adapters-only file that names the base it was trained on.

An adapter lives in the params pure dict beside the kernel it adapts: {'kernel': W, 'lora_down': A, 'lora_up': B}.
A dense kernel W [in, out] takes A [in, r] and B [r, out]. A convolution kernel W [kh, kw, in, out] takes the common
LoRA-conv form: A is a [kh, kw, in, r] convolution and B a 1x1 [r, out] one; a convolution by A followed by a 1x1
convolution by B is one convolution by their product over r, so both merge as W + (alpha / r) * A @ B (over A's
last axis). B starts at zero, so a fresh adapter leaves the model exactly as it was. The U-Net modules never see an
adapter: training merges at use inside the jitted step (train/step.py), sampling merges once at load.

Targets are regular expressions over kernel paths ('/'-joined keys, as exports name tensors; re.search), e.g.
'cross_attn/(q|k|v|out)/kernel$'; only 2-D (dense) and 4-D (convolution) kernels are adapted.

An adapters file (safetensors, tensors named '<kernel path>/lora_down' and '.../lora_up', float32) carries in its
metadata the base it adapts: its path, its parameter count and a hash of its parameter names and shapes
(`fingerprint`: it tells architectures apart, not two trainings of one architecture), and rank, alpha, targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from imagen_jax.errors import ConfigError, MissingError, StageError

DOWN, UP = "lora_down", "lora_up"
FORMAT = "imagen-jax-lora"
# Attention q/k/v/out projections (IF's add_k/add_v: the text keys/values it adds to self-attention) and the
# feed-forward linears (Efficient U-Net's), one pattern, so it matches in every model kind; convolutions are opt-in,
# e.g. r'res/conv[12]/kernel$'.
DEFAULT_TARGETS = (r"(self_attn|cross_attn)/(q|k|v|out|add_k|add_v)/kernel$|ffn/fc[12]/kernel$",)


def rank(config: ml_collections.ConfigDict) -> int:
    """config.train.lora_rank (0: no LoRA; configs saved before LoRA existed have none)."""
    return int(config.train.get("lora_rank", 0))


def named(tree: Any, prefix: str = "") -> dict[str, Any]:
    """'/'-joined path -> leaf of a params pure dict (or any tree of nested dicts)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(named(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def matching(paths: list[str], patterns: Sequence[str], field: str, what: str) -> set[str]:
    """The `paths` some regular expression of config `field` finds (re.search); a pattern that is no regular
    expression, or finds no path, is a ConfigError naming it (`what`: what the paths are)."""
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            matched = {p for p in paths if re.search(pattern, p)}
        except re.error as e:
            raise ConfigError(f"config.{field}: {pattern!r} is not a regular expression ({e})") from None
        if not matched:
            raise ConfigError(f"config.{field}: {pattern!r} matches no {what} (paths look like {paths[0]!r})")
        chosen |= matched
    return chosen


def target_kernels(config: ml_collections.ConfigDict, params: Any) -> list[str]:
    """Paths of the dense and convolution kernels that config.train.lora_targets match; a pattern that matches
    none is a ConfigError naming it."""
    kernels = [p for p, leaf in named(params).items() if p.endswith("/kernel") and len(leaf.shape) in (2, 4)]
    return sorted(matching(kernels, config.train.lora_targets, "train.lora_targets", "dense or convolution kernel"))


def _module(tree: dict, kernel_path: str) -> dict:
    node = tree
    for part in kernel_path.split("/")[:-1]:
        node = node[int(part) if part.isdigit() and int(part) in node else part]
    return node


def _adapter_shapes(kernel_shape: tuple, r: int) -> tuple[tuple, tuple]:
    """(A's shape, B's shape) for a kernel [..., in, out]: A [..., in, r], B [r, out]."""
    return (*kernel_shape[:-1], r), (r, kernel_shape[-1])


def add_adapters(config: ml_collections.ConfigDict, params: dict, key: jax.Array) -> dict:
    """`params` with a fresh adapter beside every target kernel: A ~ N(0, 1/fan_in) (fan_in: the kernel's inputs,
    kh*kw*in for a convolution), B = 0. Pure: call it under jit. No LoRA: `params` as they are."""
    r = rank(config)
    if not r:
        return params
    params = jax.tree.map(lambda x: x, params)  # a copy of the dicts (the arrays are shared) to add to
    for index, path in enumerate(target_kernels(config, params)):
        module = _module(params, path)
        down, up = _adapter_shapes(module["kernel"].shape, r)
        module[DOWN] = jax.random.normal(jax.random.fold_in(key, index), down, jnp.float32) / math.sqrt(
            math.prod(down[:-1])
        )
        module[UP] = jnp.zeros(up, jnp.float32)
    return params


def with_adapters(config: ml_collections.ConfigDict, abstract_params: dict, shardings: dict) -> tuple[dict, dict]:
    """(abstract params, shardings) of a LoRA run's parameters: the model's, plus the adapters, replicated (they are
    small); the model's own without LoRA."""
    r = rank(config)
    if not r:
        return abstract_params, shardings
    replicated = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda x: x, abstract_params)
    for path in target_kernels(config, abstract):
        module = _module(abstract, path)
        for name, shape in zip((DOWN, UP), _adapter_shapes(module["kernel"].shape, r)):
            module[name] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated)
    return abstract, jax.tree.map(lambda s: s.sharding, abstract)


def _fill(flat: dict[str, Any], like: Any, prefix: str = "") -> Any:
    """The tree `like` with its leaves replaced by `flat`'s values at the same paths."""
    if not isinstance(like, dict):
        return flat[prefix]
    return {k: _fill(flat, v, f"{prefix}/{k}" if prefix else str(k)) for k, v in like.items()}


def merge(params: dict, scale: float | jax.Array) -> dict:
    """`params` without adapters, each adapted kernel W + scale * A @ B (scale: alpha / rank, times an adapter's
    sampling scale). Pure; the tree `nnx.merge` takes."""
    if not isinstance(params, dict):
        return params
    merged = {k: merge(v, scale) for k, v in params.items() if k not in (DOWN, UP)}
    if DOWN in params:
        delta = jnp.tensordot(params[DOWN], params[UP], axes=1)
        merged["kernel"] = params["kernel"] + (scale * delta).astype(params["kernel"].dtype)
    return merged


def merged(config: ml_collections.ConfigDict, params: dict) -> dict:
    """A LoRA run's parameters (train.lora_rank > 0) with its adapters merged at alpha / rank; others as they are."""
    r = rank(config)
    return merge(params, float(config.train.lora_alpha) / r) if r else params


def fingerprint(params: Any) -> str:
    """'<parameter count>:<sha256 of the parameters' names and shapes, 16 hex digits>' (adapters left out)."""
    shapes = sorted((p, list(leaf.shape)) for p, leaf in named(params).items() if not p.endswith((DOWN, UP)))
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return f"{sum(math.prod(s) for _, s in shapes)}:{digest}"


def write_adapters(
    path: str, config: ml_collections.ConfigDict, params: dict, *, base: str, base_params: Any, step: int
) -> dict:
    """Writes the adapters of a LoRA run's `params` (numpy) to the safetensors file `path`; `base`: the folder the run
    started from (train.init_from), `base_params`: its parameters (arrays or shapes, for the fingerprint). Returns
    the metadata."""
    flat = {p: np.ascontiguousarray(a, np.float32) for p, a in named(params).items() if p.endswith((DOWN, UP))}
    if not flat:
        raise StageError("this stage has no LoRA adapters (train.lora_rank is 0): export its full weights instead")
    metadata = {
        "format": FORMAT,
        "base": base,
        "base_fingerprint": fingerprint(base_params),
        "rank": str(rank(config)),
        "alpha": repr(float(config.train.lora_alpha)),
        "targets": json.dumps(list(config.train.lora_targets)),
        "step": str(int(step)),
    }
    save_file(flat, path, metadata=metadata)
    return metadata


def read_adapters(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors by path, metadata) of an adapters file; safetensors only (data, never code)."""
    if not os.path.isfile(path):
        raise MissingError(f"{path}: LoRA adapters file not found")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise StageError(f"{path}: not an imagen-jax LoRA adapters file (metadata format is not {FORMAT!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise StageError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        if int(metadata["rank"]) < 1 or not float(metadata["alpha"]) > 0 or not metadata["base_fingerprint"]:
            raise ValueError
    except (KeyError, ValueError):
        raise StageError(
            f"{path}: its metadata needs rank (>= 1), alpha (> 0) and base_fingerprint; it has {sorted(metadata)}"
        ) from None
    return tensors, metadata


def check_base(path: str, metadata: dict, params: Any, stage: str) -> None:
    """A StageError unless the adapters of `path` were made for a base with `params`' names and shapes."""
    have = fingerprint(params)
    if metadata.get("base_fingerprint") != have:
        raise StageError(
            f"{path}: LoRA adapters for another base ({metadata.get('base')}, parameters "
            f"{metadata.get('base_fingerprint')}), not for {stage} ({have})"
        )


def apply_adapters(params: dict, adapters: list[tuple[str, float]], shardings: dict, stage: str) -> dict:
    """`params` (placed in `shardings`) with each (adapters file, scale) merged in: W + scale * alpha / r * A @ B."""
    for path, scale in adapters:
        tensors, metadata = read_adapters(path)
        check_base(path, metadata, params, stage)
        flat = named(params)
        unknown = sorted({n.rsplit("/", 1)[0] for n in tensors} - {p.rsplit("/", 1)[0] for p in flat})
        if unknown:
            raise StageError(f"{path}: adapts {unknown[0]}, which {stage} does not have")
        r = int(metadata["rank"])
        for name, tensor in tensors.items():
            module, part = name.rsplit("/", 1)
            kernel = flat.get(f"{module}/kernel")
            down, up = _adapter_shapes(tuple(kernel.shape), r) if kernel is not None else (None, None)
            want = {"lora_down": down, "lora_up": up}.get(part)
            if want is None or tuple(tensor.shape) != tuple(want):
                raise StageError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, but {stage}'s {module}/kernel at rank {r} "
                    f"needs {want}"
                )
        factor = float(scale) * float(metadata["alpha"]) / r
        with_adapters_ = _fill({**flat, **tensors}, _tree_of({**flat, **tensors}))
        params = jax.jit(merge, out_shardings=shardings)(with_adapters_, factor)
    return params


def _tree_of(flat: dict[str, Any]) -> dict:
    """Nested dicts of `flat`'s '/'-paths (digit keys as ints, as nnx.to_pure_dict has list indices)."""
    tree: dict = {}
    for path in flat:
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
    return tree
