"""Where a model's activations live on the mesh, stated instead of left to the partitioner.

Parameters carry their shardings; activations do not, and XLA's sharding propagation is free to follow a
kernel's layout instead of the batch's. For the paper's base model on a v4-512 it did: a convolution whose
kernel is split over `fsdp` on its output channels got its output split the same way, and each chip held that
activation for the whole global batch (a 16 GiB buffer). Inside `activation_layout(mesh)` (the train step
traces the model there) the model pins its activations with `constrain`: the batch over the data-parallel
axes, and the inner width of a layer (a residual block's hidden channels, attention heads, the feed-forward
hidden width) over `tensor`, so tensor-parallel chips each compute their part of the layer (Megatron's split:
column-parallel into the inner width, row-parallel out of it). Outside the context `constrain` does nothing,
so single-device code runs unchanged. Given the parameter rules too, the layers also place their weights at each
use with `use_sharding`: whole over the batch axes (FSDP's split, which stores them, undone by an all-gather there),
split over `tensor` only along a layer's inner width (logical name 'inner': the output of a column-parallel
kernel, the input of a row-parallel one), so a block costs one reduction over `tensor` (after its row-parallel
layer) and every other kernel is used whole. Leaving that gather to the partitioner is not only slower to reason about
but wrong: XLA (jax 0.10.2) partitions a 3x3 convolution whose kernel is split over fsdp x tensor, fed an
activation split over data x fsdp and tensor, into a program that computes different numbers (issue 29;
tests/test_tensor_parallel.py). `per_shard` runs a computation the partitioner cannot split
(a Pallas kernel is an opaque custom call, around which XLA would gather its inputs whole) on each device's
block of that same layout.

The layout is read while a function is traced, and `jax.jit` does not know it: a program traced outside the
context would be reused inside it without its constraints, and the reverse (issue 29, point 6). A jitted
function whose trace can run a model is therefore made with this module's `jit`, which passes the layout in
force at each call as a static argument, so each layout gets its own trace. (The train step enters the layout
inside its traced function, which needs nothing more.)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel.mesh import BATCH_AXES, INNER, Rules, spec_for


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mesh activations are pinned to and the parameter rules (None: weights left where they are stored);
    hashable, so that it can be a static argument of `jax.jit`."""

    mesh: Mesh
    rules: Rules | None


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
    """Within the block, `constrain` pins activations to `mesh` (batch over data x fsdp, inner widths over
    tensor) and, with the parameters' `rules` (`mesh.param_rules` of the config's mesh), `use_sharding` places each
    weight where it is used."""
    with _entered(Layout(mesh, rules)):
        yield


@contextlib.contextmanager
def _entered(layout: Layout | None) -> Iterator[None]:
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


class jit:  # noqa: N801 (used as jax.jit is: a decorator, or a call on a function)
    """`jax.jit(fn, **kwargs)` that traces `fn` under the activation layout in force where it is called (none
    outside `activation_layout`), as a static argument: one trace per layout, never one reused under another.
    Calls, `.trace` and `.lower` as jax.jit's; `static_argnums` count `fn`'s own positional arguments."""

    def __init__(self, fn: Callable | None = None, **jit_kwargs: Any) -> None:
        self._fn, self._kwargs = fn, jit_kwargs
        if fn is None:
            return
        statics = (*jit_kwargs.pop("static_argnames", ()), "layout")

        def traced(*args: Any, layout: Layout | None, **kwargs: Any) -> Any:
            with _entered(layout):
                return fn(*args, **kwargs)

        self._jitted = jax.jit(traced, static_argnames=statics, **jit_kwargs)
        self.__doc__, self.__name__ = fn.__doc__, getattr(fn, "__name__", "jit")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:  # used as @jit(**kwargs): this call receives the function
            return jit(*args, **self._kwargs)
        return self._jitted(*args, layout=_LAYOUT.get(), **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted.trace(*args, layout=_LAYOUT.get(), **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted.lower(*args, layout=_LAYOUT.get(), **kwargs)

    def _cache_size(self) -> int:  # jax.jit's count of compiled programs, which tests read
        return self._jitted._cache_size()


def use_sharding(shape: tuple[int, ...], names: tuple[str | None, ...]) -> NamedSharding | None:
    """Where a weight of `shape` whose axes have the logical `names` is used: split along its inner width as the
    rules store it (over `tensor`), whole along every other axis (gathered over fsdp, and over tensor where a
    kernel is stored split but used whole), so each device holds what its part of the work needs. None outside
    `activation_layout` with rules. Read at trace time, so a custom VJP can keep it for its backward pass."""
    layout = _LAYOUT.get()
    if layout is None or layout.rules is None:
        return None
    stored = spec_for(names, shape, layout.mesh, layout.rules)
    stored = (*stored, *[None] * (len(shape) - len(stored)))
    spec = [axis if name == INNER else None for axis, name in zip(stored, names, strict=True)]
    return NamedSharding(layout.mesh, P(*spec))


def constrain(x: jax.Array, inner: int | None = None) -> jax.Array:
    """`x` [B, ...] with its batch over the data-parallel axes and, when `inner` names an axis (e.g. -1 for the
    channels of a block's hidden activation, 2 for the heads of [B, L, heads, D]), that axis over `tensor`.
    Axes a mesh axis does not divide stay whole; outside `activation_layout` this is the identity."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, _spec(layout.mesh, x, inner)))


def per_shard(fn: Callable[..., jax.Array], *xs: jax.Array, inner: tuple[int | None, ...]) -> jax.Array:
    """`fn(*xs)` computed on each device's block of `xs` (each laid out as `constrain(x, inner[i])` lays it out),
    its output laid out as the first input. Outside `activation_layout`, plainly `fn(*xs)`. `fn` must treat
    the examples of the batch and the entries of each `inner` axis independently (as attention does heads)."""
    layout = _LAYOUT.get()
    if layout is None:
        return fn(*xs)
    mesh = layout.mesh
    specs = tuple(_spec(mesh, x, axis) for x, axis in zip(xs, inner, strict=True))
    batched = {spec[0] for spec in specs}
    if len(batched) > 1:  # e.g. a batch the data axes divide for one input only: keep them all whole
        specs = tuple(P(None, *spec[1:]) for spec in specs)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*xs)


def _spec(mesh: Mesh, x: jax.Array, inner: int | None) -> P:
    spec: list = [None] * x.ndim
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if batch and x.shape[0] % math.prod(mesh.shape[a] for a in batch) == 0:
        spec[0] = batch
    if inner is not None and mesh.shape["tensor"] > 1 and x.shape[inner] % mesh.shape["tensor"] == 0:
        spec[inner] = "tensor"
    return P(*spec)
