"""The device mesh and the logical-name -> mesh-axis rules that shard parameters and batches.

Every parameter carries logical axis names (`nnx.with_partitioning`); a rules table in the config maps
each name to a mesh axis (`data`, `fsdp`, `tensor`) or to nothing. A dimension that the mesh axis does not
divide is replicated instead, so small layers of a big model never fail to shard.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
# Batches are split over every axis that holds data-parallel replicas.
BATCH_AXES = ("data", "fsdp")
# The logical name of a layer's inner width (a residual block's hidden channels, attention heads x their width,
# the feed-forward hidden width): the output of a column-parallel kernel and the input of a row-parallel one,
# split over `tensor` where it is used as where it is stored (Megatron's layout; parallel/activations.py).
INNER = "inner"


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh: axis sizes {dict(zip(AXES, sizes))} need {math.prod(sizes)} devices, have {len(devices)}"
        )
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
    # Multislice: slices talk over the data-center network, two orders of magnitude slower than their own links
    # (v5p: 6.25 against 1200 GB/s per chip), so only data parallelism (one gradient reduction per step) crosses
    # them: `data` is slices x the data-parallel groups within one.
    if sizes[0] % slices:
        raise ConfigError(
            f"mesh: data={sizes[0]} must be a multiple of the {slices} slices (only data parallelism crosses slices, "
            "over the data-center network)"
        )
    within = (sizes[0] // slices, *sizes[1:])
    grid = mesh_utils.create_hybrid_device_mesh(within, (slices, 1, 1), devices)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@dataclasses.dataclass(frozen=True)
class Rules:
    """How parameters lie on the mesh: `table` maps each logical axis name to a mesh axis, to a tuple of mesh axes
    (the first one still free and dividing the dim is taken) or to None (whole); a parameter with fewer than
    `replicate_below` elements is whole on every device (split 256 ways, a 512-wide bias is 2 elements per chip
    and a latency-bound collective per use). Hashable: it is part of the activation layout jit sees."""

    table: tuple[tuple[str, Any], ...]
    replicate_below: int = 0

    def candidates(self, name: str | None) -> tuple[str, ...]:
        axis = dict(self.table).get(name) if name is not None else None
        return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def param_rules(mesh_cfg: ml_collections.ConfigDict) -> Rules:
    """The config's mesh.rules and mesh.replicate_below as `Rules`, each checked (ConfigError naming the entry)."""
    table = []
    for rule in mesh_cfg.rules:
        if len(rule) != 2:
            raise ConfigError(f"mesh.rules: each rule is (logical_name, mesh_axis or None), got {rule!r}")
        name, axis = rule
        axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        for a in axes:
            if a not in AXES:
                raise ConfigError(f"mesh.rules: {name!r} maps to unknown mesh axis {a!r}; axes are {AXES}")
        table.append((str(name), axis if axis is None or isinstance(axis, str) else tuple(axis)))
    threshold = mesh_cfg.get("replicate_below", 0)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ConfigError(f"mesh.replicate_below must be an integer >= 0 (elements), got {threshold!r}")
    return Rules(tuple(table), threshold)


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for one array: each named dim goes to its mesh axis when that axis divides it. Names with one
    axis are placed first, then those with a choice (so ('channels_in', ('tensor', 'fsdp')) takes fsdp where a
    column-parallel kernel's 'inner' holds tensor); an array under rules.replicate_below elements stays whole."""
    if not names or math.prod(shape) < rules.replicate_below:
        return P()
    used: set[str] = set()
    spec: list[str | None] = [None] * len(shape)
    order = sorted(range(len(shape)), key=lambda i: len(rules.candidates(names[i])) > 1)
    for i in order:
        for axis in rules.candidates(names[i]):
            if axis not in used and mesh.shape[axis] > 1 and shape[i] % mesh.shape[axis] == 0:
                spec[i] = axis
                used.add(axis)
                break
    return P(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for an (abstract) nnx.State, read from each variable's logical names."""

    def one(variable: nnx.Variable) -> nnx.Variable:
        names = variable.get_metadata().get("out_sharding")
        return variable.replace(NamedSharding(mesh, spec_for(names, variable.shape, mesh, rules)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's local batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def padded_rows(count: int, mesh: Mesh) -> int:
    """The smallest batch >= `count` that `batch_sharding` splits evenly."""
    split = math.prod(mesh.shape[a] for a in BATCH_AXES)
    return -(-count // split) * split


def place_rows(x: np.ndarray | jax.Array, rows: int, mesh: Mesh) -> jax.Array:
    """`x` [B, ...] as a global array of `rows` >= B rows split over the batch axes of `mesh`, the extra rows
    copies of row 0 (`padded_rows`; callers trim them off again).

    `x` is a global array on `mesh` (e.g. a slice of a training batch, which may span processes), or host
    data that every process holds whole (numpy, or an array on one local device)."""
    sharding = batch_sharding(mesh)
    if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
        return _pad_rows(x, rows, sharding)
    host = np.asarray(x)
    host = np.concatenate([host, np.repeat(host[:1], rows - len(host), axis=0)])
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather_rows(x: jax.Array, rows: int, mesh: Mesh) -> np.ndarray:
    """The first `rows` rows of a global array on `mesh`, whole on every process (an all-gather: every process
    must call it, as with any computation on a global array)."""
    whole = _first_rows(x, rows, replicated(mesh))
    return np.asarray(whole.addressable_data(0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad_rows(x: jax.Array, rows: int, sharding: NamedSharding) -> jax.Array:
    extra = jnp.repeat(x[:1], rows - x.shape[0], axis=0)
    return jax.lax.with_sharding_constraint(jnp.concatenate([x, extra]), sharding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _first_rows(x: jax.Array, rows: int, sharding: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x[:rows], sharding)
