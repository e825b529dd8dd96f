"""How every U-Net family (unet, efficient_unet, if_unet) turns ``config.model`` into its model: the kind checked,
optional fields defaulted, an unknown or missing field named in a one-line ValueError (`read_fields`), and one
`builder` signature that the stage code calls whatever the kind. Each model file keeps its own field list,
conversions and checks, the vocabulary of its architecture; what reading and building involve is here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax.numpy as jnp
import ml_collections
from flax import nnx

ModelConfig = ml_collections.ConfigDict | Mapping[str, Any]
Model = TypeVar("Model")


def read_fields(
    model_cfg: ModelConfig, *, kind: str, builder: str, required: Sequence[str], optional: Mapping[str, Any]
) -> dict[str, Any]:
    """The fields of ``model_cfg`` without ``kind`` (which, if given, must be this family's), every ``optional``
    field defaulted; a field outside ``required`` and ``optional``, or a required one left out, is a ValueError
    naming it (the values are the caller's to convert and check)."""
    fields = dict(model_cfg)
    given = fields.pop("kind", kind)
    if given != kind:
        raise ValueError(f"config.model.kind is {given!r}; {builder} builds kind {kind!r}")
    fields = {**optional, **fields}
    allowed = [*required, *optional]
    unknown = sorted(set(fields) - set(allowed))
    missing = sorted(set(required) - set(fields))
    if unknown:
        raise ValueError(f"unknown config.model field(s) {unknown} for {kind}; allowed: {allowed}")
    if missing:
        raise ValueError(f"missing config.model field(s) {missing} for {kind}")
    return fields


def builder(
    model: Callable[..., Model], constructor_args: Callable[[ModelConfig], dict[str, Any]], name: str
) -> Callable[..., Model]:
    """The family's ``build_*`` function: ``name(model_cfg, *, image_size, text_dim, rngs, dtype, remat, attention,
    attention_chunk)`` constructs ``model`` from the keyword arguments ``constructor_args`` reads from
    ``model_cfg`` and the stage's settings, which every family takes alike."""

    def build(
        model_cfg: ModelConfig,
        *,
        image_size: int,
        text_dim: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        attention: str = "dot_product",
        attention_chunk: int = 1024,
    ) -> Model:
        return model(
            image_size=image_size,
            text_dim=text_dim,
            rngs=rngs,
            dtype=dtype,
            remat=remat,
            attention=attention,
            attention_chunk=attention_chunk,
            **constructor_args(model_cfg),
        )

    build.__name__ = build.__qualname__ = name
    build.__module__ = model.__module__
    build.__doc__ = (
        f"Builds {getattr(model, '__name__', model)} from ``config.model`` (fields in {model.__module__}'s "
        "docstring) for the stage's output ``image_size``; ``dtype`` is the compute dtype, parameters are float32; "
        "``remat`` one of layers.REMAT_POLICIES, ``attention`` one of layers.ATTENTION_KINDS."
    )
    return build
