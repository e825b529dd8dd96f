"""A stage's U-Net as its config describes it: the model kinds, the dtypes, the SR geometry, and the model's
structure, abstract parameters and shardings, built once without allocating anything.

Training (train/state.py), sampling (stage/stage.py), export and the benchmark all get the U-Net from
`stage_model`, so there is one answer to "what arrays does this config's model have, and where
do they live".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from imagen_jax.diffusion import augment
from imagen_jax.diffusion.denoiser import Denoiser
from imagen_jax.errors import ConfigError
from imagen_jax.flax_settings import init_rngs
from imagen_jax.models import efficient_unet, if_unet, unet
from imagen_jax.models.layers import platform_attention
from imagen_jax.parallel import mesh as mesh_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Top-level parameters that are data, not weights: no training step changes them (DeepFloyd IF's null_text, the T5
# states of the empty prompt that stand for "no text"; models/if_unet.py).
FROZEN_PARAMS = ("null_text",)


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One U-Net architecture: its builder, its `config.model` defaults and its config check."""

    build: Callable[..., nnx.Module]
    default_config: Callable[[], ml_collections.ConfigDict]
    check_config: Callable[..., None]
    super_resolution: Callable[[ml_collections.ConfigDict], bool]  # of config.model: an SR stage?
    # SR stages: the low-res image is upscaled to the output size before noise augmentation, and the model takes it
    # at that size (IF: bilinear, align_corners); False: augmented at low res and upsampled inside the model.
    upscale_before_augment: bool = False


MODEL_KINDS = {
    "unet": ModelKind(unet.build_unet, unet.default_config, unet.check_config, super_resolution=lambda _: False),
    "efficient_unet": ModelKind(
        efficient_unet.build_sr_unet,
        efficient_unet.default_config,
        efficient_unet.check_config,
        super_resolution=lambda _: True,
    ),
    "if_unet": ModelKind(
        if_unet.build_if_unet,
        if_unet.default_config,
        if_unet.check_config,
        super_resolution=if_unet.is_super_resolution,
        upscale_before_augment=True,
    ),
}


def compute_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ConfigError(f"compute dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


FLOAT32_LAYERS = ("out_conv",)  # the U-Nets' output layers, which compute in float32 (issue 29, point 6)


def in_compute_dtype(params: Any, dtype: jnp.dtype) -> Any:
    """The layers' kernels in the compute dtype, cast once for sampling, where the sampler would otherwise read the
    float32 EMA at every layer of every step; the output layers' (`FLOAT32_LAYERS`) stay float32. The train step
    casts nothing up front: its layers cast their kernels where they are stored (before the FSDP all-gather) and
    return float32 gradients (models/layers.py `_project`), and the few embeddings are cast where used, after any
    broadcast over the batch, so every weight gradient is reduced over the batch and the devices in float32."""

    def cast(path: tuple, p: Any) -> Any:
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1:] != ["kernel"] or any(k in FLOAT32_LAYERS for k in keys) or p.ndim < 2:
            return p
        return p.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def model_kind(config: ml_collections.ConfigDict) -> ModelKind:
    kind = config.model.get("kind", "unet")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"config.model.kind={kind!r} is not one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def is_super_resolution(config: ml_collections.ConfigDict) -> bool:
    """SR stages condition on a low-res image; the base stage does not."""
    return model_kind(config).super_resolution(config.model)


def lowres_size(config: ml_collections.ConfigDict, size: int | None = None) -> int | None:
    """The SR input size that goes with an output of `size` pixels (default: data.image_size): training crops
    (sr1024: 256 of 1024) take the matching low-res crop (64 of 256). None for a base stage."""
    if not is_super_resolution(config):
        return None
    size = int(config.data.image_size) if size is None else int(size)
    return size * int(config.model.lowres_size) // int(config.data.image_size)


def conditioning_image(config: ml_collections.ConfigDict, lowres: jax.Array, size: int) -> jax.Array:
    """What an SR stage noise-augments and hands its model, from the low-res image [B, s, s, 3]: the image itself,
    or (kinds that upscale before augmenting: IF) the image upscaled to `size` as IF's pipeline does it."""
    if model_kind(config).upscale_before_augment:
        return augment.resize_align_corners(lowres, size)
    return lowres


def train_size(config: ml_collections.ConfigDict) -> int:
    """The side of the images a training step sees: data.crop_size when SR stages train on crops."""
    return int(config.data.crop_size or config.data.image_size)


def build_model(
    config: ml_collections.ConfigDict, text_dim: int, seed: int = 0, platform: str | None = None
) -> nnx.Module:
    """The stage's U-Net (params float32, activations in train.compute_dtype, rematerialised in the backward
    pass as train.remat says, attention computed as train.attention says, 'auto' resolved for `platform`, by
    default JAX's default backend's: the parameters are the same whatever either is)."""
    return model_kind(config).build(
        config.model,
        image_size=config.data.image_size,
        text_dim=text_dim,
        rngs=init_rngs(seed),
        dtype=compute_dtype(config.train.compute_dtype),
        remat=config.train.remat,
        attention=platform_attention(config.train.attention, platform or jax.default_backend()),
        attention_chunk=config.train.attention_chunk,
    )


def make_apply_fn(graphdef: nnx.GraphDef) -> Callable:
    """apply_fn(params, x_t, t, text, text_mask, drop_text, dropout_key=None, **conditioning) for the
    diffusion code; SR stages take conditioning lowres=[B,h,w,3] (noise-augmented) and lowres_t=[B]."""

    def apply_fn(params, x_t, t, text, text_mask, drop_text, dropout_key=None, **conditioning):
        model = nnx.merge(graphdef, params)
        return model(x_t, t, text, text_mask, drop_text=drop_text, dropout_key=dropout_key, **conditioning)

    return apply_fn


def make_denoiser(graphdef: nnx.GraphDef) -> Denoiser:
    """The U-Net as the samplers call it: its text conditioning (keys and values of every cross-attention
    included) computed once per prompt, the unconditional half's from the null text alone, and a per-step call
    that reuses it; denoise takes the conditioning of `make_apply_fn`."""

    def condition(params, text, text_mask):
        return nnx.merge(graphdef, params).text_context(text, text_mask, precompute=True)

    def null_condition(params, text, text_mask):
        return nnx.merge(graphdef, params).null_text_context(*text_mask.shape)

    def denoise(params, x_t, t, context, **conditioning):
        return nnx.merge(graphdef, params).denoise(x_t, t, context, **conditioning)

    return Denoiser(condition, null_condition, denoise)


@dataclasses.dataclass(frozen=True)
class StageModel:
    """What jitted functions close over: the U-Net's structure and its parameters' shapes and shardings."""

    graphdef: nnx.GraphDef
    abstract_params: dict  # pure dict of ShapeDtypeStructs carrying their NamedShardings
    param_shardings: dict  # pure dict of NamedSharding, same tree

    @functools.cached_property
    def denoiser(self) -> Denoiser:
        """One object per model: the samplers take it as a jit static argument, so a fresh one per call would
        recompile every time."""
        return make_denoiser(self.graphdef)

    @property
    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))


def stage_model(config: ml_collections.ConfigDict, text_dim: int, mesh: Mesh) -> StageModel:
    """Shapes and shardings of the stage's U-Net on `mesh` (by the config's mesh.rules), via jax.eval_shape; its
    computation (the graphdef) for the platform of the mesh's devices (e.g. TPU in the planner's compiles)."""
    platform = mesh.devices.flat[0].platform
    abstract_model = nnx.eval_shape(lambda: build_model(config, text_dim, platform=platform))
    graphdef, abstract, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the U-Net has non-parameter state, which the train state does not carry: {rest}")
    rules = mesh_lib.param_rules(config.mesh)
    shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract, mesh, rules))
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abstract), shardings
    )
    return StageModel(graphdef, abstract, shardings)


def t5_shardings(config: ml_collections.ConfigDict, state: Any, mesh: Mesh) -> Any:
    """Where each parameter of a T5 (abstract) `state` lives on `mesh`: its logical names (embed, mlp,
    heads_x_dim, ...) mapped by the config's mesh.rules, like the U-Net's (training and sampling alike)."""
    return mesh_lib.state_shardings(state, mesh, mesh_lib.param_rules(config.mesh))


def local_mesh() -> Mesh:
    """This host's devices, all on the fsdp axis: where sampling and export put T5 and a stage's weights.

    The config's mesh.rules then split each parameter over the devices as in training (so a T5-XXL beside
    three U-Nets fits chips that could not each hold a copy) and the batch is split over the same devices.
    No tensor axis: the layers gather their weights and compute each example whole on one device, which
    keeps the images bit for bit those of one device."""
    return mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}), jax.local_devices())


def shape_differences(have: Any, want: Any, source: str) -> list[str]:
    """Every array of `want` (a tree of arrays or ShapeDtypeStructs) missing from `have` (read from `source`,
    e.g. "checkpoint") or shaped differently, then every array of `have` that `want` lacks; parameters
    first, as they tell the most."""
    have, want = _leaf_shapes(have), _leaf_shapes(want)
    differences = []
    for name, shape in want.items():
        if name not in have:
            differences.append(f"{name}: not in {source}, expected {shape}")
        elif have[name] != shape:
            differences.append(f"{name}: {source} {have[name]}, expected {shape}")
    differences += [f"{name}: {source} {shape}, not in this model" for name, shape in have.items() if name not in want]
    return sorted(differences, key=lambda d: not d.startswith("params."))


def _path_name(path: tuple) -> str:
    """A key path as a dotted name; orbax and jax spell dict keys, list indices and namedtuple fields alike."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}
