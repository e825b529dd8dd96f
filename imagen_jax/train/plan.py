"""Will it fit, and how fast could it go? The real train step compiled ahead of time for a TPU slice, on a
machine without one (libtpu from PyPI: `pip install -e ".[plan]"`).

`plan(config, slice_name, t5_config)` builds the mesh from the slice's compile-only devices
(`jax.experimental.topologies`), sets up the train step with the same `train.setup.setup` call as training
(T5 from a config.json alone: shapes, no weights), lowers it on abstract arrays and compiles it with the TPU
compiler. Nothing is allocated. It reports, per device: the bytes of parameters, optimizer state, EMA, T5 and
the batch (from the arrays' shardings), the compiler's temporaries (activations, gradients, workspace) and
whether the sum fits the chip's HBM; FLOPs per step from the compiled cost analysis beside a count of the
step's matmuls and convolutions (from its jaxpr); and a roofline step time and images/s from the chip's bf16
peak and HBM bandwidth.

`plan_sampling(configs, names, slice_name, t5_config, batch_size)` does the same for sampling a cascade: with
T5 and every stage's parameters resident at once on the sampling mesh (all devices on fsdp, as sample.py
places them), it compiles the programs sampling runs (stage.sampling's T5 encode; per stage diffusion.sampler's
text conditioning and step loop, the model on the guidance-doubled batch) and reports each one's bytes, the
peak against HBM, and roofline times per sampler step. A one-chip slice gives what one device holding the
whole cascade needs: the TPU compiler's figure, the nearest proxy for a GPU there is without a GPU compiler.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax import filesystem
from imagen_jax.diffusion import sampler as sampler_lib
from imagen_jax.diffusion.timesteps import resolve_steps
from imagen_jax.errors import ConfigError, UsageError, first_line
from imagen_jax.eval import scorer as scorer_lib
from imagen_jax.models.layers import platform_attention
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel.activations import activation_layout
from imagen_jax.stage import config as stage_config
from imagen_jax.stage import lora, sampling
from imagen_jax.stage.model import (
    compute_dtype,
    conditioning_image,
    lowres_size,
    stage_model,
    t5_shardings,
    train_size,
)
from imagen_jax.text import T5Encoder
from imagen_jax.train import buckets, trainable
from imagen_jax.train import setup as setup_lib
from imagen_jax.train import state as state_lib

GIB = 2**30
# XLA's refusal when a program's temporaries do not fit: "... HLO temporaries (49.37G) exceeds available HBM ..."
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: .*?HLO temporaries \(([\d.]+[KMGT]?)\)")
_AVAILABLE_HBM = re.compile(r"exceeds available HBM \(([\d.]+[KMGT]?)\)")
# A TPU "windowed einsum": an FSDP all-gather (or reduce-scatter) split into a loop that overlaps each piece's
# transfer with the convolution or matmul using it. XLA's cost analysis counts the loop's body once.
_WINDOWED_LOOP = re.compile(r"\bwhile\([^\n]*body=%?[\w.\-]*windowed_dot_general_body")
SHAPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "text", "shapes")
T5_SHAPES = {name: os.path.join(SHAPES, f"t5-v1_1-{name}.json") for name in ("xxl", "xl", "large")}
SAMPLER = "ddpm"  # the cascade's default sampler (sample.py --sampler): what a sampling plan compiles


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of a TPU generation."""

    name: str
    hbm_bytes: int
    bf16_tflops: float  # peak dense bf16
    hbm_gbps: float  # HBM bandwidth, GB/s
    cores_in_name: int  # slice names count TensorCores (v4, v5p: 2 per chip) or chips (v5e, v6e)
    topology_prefix: str  # what libtpu calls the generation in a topology name
    torus_dims: int  # 3: v4/v5p (megacore chips, 3-D torus); 2: v5e/v6e
    # A chip's share of the published all-reduce bandwidth of a pod (v4: 1.1 PB/s over 4096 chips; v5e 51.2 TB/s
    # and v6e 102.4 TB/s over 256), half its bidirectional ICI bandwidth where that is given (v5e 400, v6e 800
    # GB/s); v5p publishes only its ICI (1200 GB/s): half of it. The collectives' bytes are sent at this rate.
    collective_gbps: float
    # A chip's share of the data-center network between slices (Multislice), GB/s: v5p 50 Gbit/s per chip, v5e
    # 6.4 Tbit/s per 256-chip pod (both Cloud TPU's published tables); None where no figure is published (v4, v6e):
    # the plan then gives the bytes sent over it, not their time.
    dcn_gbps: float | None


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275.0, 1200.0, 2, "v4", 3, 268.6, None),
    "v5p": Chip("TPU v5p", 95 * GIB, 459.0, 2765.0, 2, "v5", 3, 600.0, 50 / 8),
    "v5e": Chip("TPU v5e", 16 * GIB, 197.0, 819.0, 1, "v5e", 2, 200.0, 6400 / 256 / 8),
    "v6e": Chip("TPU v6e", 32 * GIB, 918.0, 1640.0, 1, "v6e", 2, 400.0, None),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # e.g. "v4-512"
    chip: Chip
    chips: int
    topology: str  # e.g. "v4:4x8x8"


def parse_slice(name: str) -> Slice:
    """'v4-512' (512 TensorCores = 256 chips, 4x8x8), 'v5e-256' (256 chips, 16x16), ...: powers of two."""
    family, _, count = name.partition("-")
    if family not in CHIPS or not count.isdigit():
        raise UsageError(
            f"--topology {name!r}: expected GENERATION-N with GENERATION in {', '.join(CHIPS)}, "
            "e.g. v4-8, v4-512, v5e-256, v5p-128"
        )
    chip = CHIPS[family]
    n = int(count)
    chips = n // chip.cores_in_name
    if chips < 1 or n % chip.cores_in_name or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if chip.cores_in_name == 2 else "chips"
        raise UsageError(f"--topology {name!r}: N counts {unit} and must give a power-of-two number of chips")
    return Slice(name, chip, chips, f"{chip.topology_prefix}:{'x'.join(map(str, _torus(chips, chip.torus_dims)))}")


def _torus(chips: int, dims: int) -> list[int]:
    """Chip grid of a slice: 2-D a x b with a <= b; 3-D grown as 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ..."""
    k = chips.bit_length() - 1
    if dims == 2:
        return [2 ** (k // 2), 2 ** (k - k // 2)]
    shape = [1, 1, 1]
    order = [0, 1, 2] + [2, 1, 0] * k
    for axis in order[:k]:
        shape[axis] *= 2
    return shape


def slice_devices(tpu_slice: Slice, slices: int = 1) -> list:
    """Compile-only devices of the slice, or of `slices` copies of it joined over the data-center network
    (Multislice; each device's `slice_index` says which), with no TPU needed (libtpu must be installed)."""
    # libtpu on a machine without TPUs: never ask the cloud metadata server what this VM is, do not take the
    # single-process lock (several plans may run at once), and say what the host is so it does not guess.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu_slice.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        from jax.experimental import topologies

        # A host has up to 2x2x1 chips; a slice of one or two chips (v5p-2, v5e-1) is a host's part.
        grid = _torus(tpu_slice.chips, tpu_slice.chip.torus_dims) + [1] * (3 - tpu_slice.chip.torus_dims)
        description = topologies.get_topology_desc(
            tpu_slice.topology, "tpu", chip_config_name="megacore" if tpu_slice.chip.torus_dims == 3 else "default",
            chips_per_host_bounds=tuple(min(g, h) for g, h in zip(grid, (2, 2, 1))), num_slices=slices,
        )  # fmt: skip
    except (RuntimeError, ValueError, ImportError) as e:
        raise UsageError(
            f"cannot describe TPU slice {tpu_slice.name} ({tpu_slice.topology}): {e}; the planner needs "
            'libtpu: pip install -e ".[plan]"'
        ) from None
    return list(description.devices)


def abstract_text(config: ml_collections.ConfigDict, t5_config: str, mesh: jax.sharding.Mesh) -> setup_lib.Text:
    """T5 of the shape `t5_config` describes (a config.json, a T5 folder, or xxl/xl/large), on `mesh`, as the
    train step and the cascade see it (parameters in text.dtype, placed by the config's mesh.rules); with
    data.precomputed_text no encoder, only its width."""
    path = T5_SHAPES.get(t5_config, t5_config)
    if filesystem.for_path(path).isdir(path):  # a local or a URL folder
        path = os.path.join(path, "config.json")
    encoder = T5Encoder.abstract(path, dtype=compute_dtype(config.text.dtype))
    if config.data.precomputed_text:
        return setup_lib.Text(None, {}, {}, encoder.dim, f"precomputed T5 embeddings of width {encoder.dim}")
    shardings = t5_shardings(config, encoder.state, mesh)
    params = jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), encoder.state, shardings)
    return setup_lib.Text(encoder, params, shardings, encoder.dim, f"T5 of {path} (shapes only)")


def _abstract(shape: tuple, dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, text_dim: int) -> dict:
    batch, size, length = int(config.train.batch_size), train_size(config), int(config.text.max_length)
    sharding = mesh_lib.batch_sharding(mesh)

    def array(shape: tuple, dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    out = {"image": array((batch, size, size, 3), jnp.uint8), "mask": array((batch, length), jnp.bool_)}
    if config.data.precomputed_text:
        out["text"] = array((batch, length, text_dim), jnp.bfloat16)
    else:
        out["ids"] = array((batch, length), jnp.int32)
    return out


def _gib(text: str) -> int:
    """XLA's human-readable sizes ('49.37G': binary units) in bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(float(text.rstrip("KMGT")) * units.get(text[-1], 1))


@functools.cache
def usable_hbm(device: Any) -> int:
    """The HBM one program may use on `device`'s chip, as the TPU compiler states it when it refuses a program larger
    than any chip: below the nominal capacity, which the runtime does not give away whole (libtpu 0.0.42: v4 30.75
    of 32 GiB, v5e 15.75 of 16, v5p 95.74 of 95, v6e 31.25 of 32). What a plan's total is held against."""
    mesh = jax.sharding.Mesh([device], ("one",))
    too_big = jax.jit(lambda: jnp.zeros((2**38,), jnp.int8) + 1, out_shardings=mesh_lib.replicated(mesh))
    try:
        too_big.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        found = _AVAILABLE_HBM.search(str(e))
        if found is not None:
            return _gib(found.group(1))
        raise ConfigError(f"the TPU compiler did not state the chip's usable HBM: {first_line(e)}") from None
    raise ConfigError("the TPU compiler compiled a 256 GiB program for one chip; it cannot be planning for a TPU")


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize  # PRNG key types too (jnp.dtype refuses them)
    return total


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the dot_generals and convolutions of a (closed) jaxpr, counted from their shapes (2 per
    multiply-add), through nested jaxprs (jit, remat, custom derivatives; scans times their length; a cond's
    largest branch, as one runs: `platform_dependent` attention holds the TPU kernel and the other platforms'
    form). A Pallas call counts nothing: its body is one block of a grid, so the branch without it is the count."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            continue
        if name == "cond":
            total += max(matmul_flops(branch) for branch in eqn.params["branches"])
            continue
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += repeat * matmul_flops(sub)
    return total


def _conv_flops(eqn: Any) -> float:
    """2 x the multiply-adds of a convolution that touch the input: a window tap over zero padding (or between
    the samples of a dilated input, as in a strided convolution's backward pass) multiplies nothing. Counted per
    spatial dimension, which is exact because the valid taps of a window are a product over dimensions."""
    p, lhs, rhs = eqn.params, eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    numbers = p["dimension_numbers"]  # specs: (batch or out feature, feature, spatial...)
    taps = 1
    for d, (lhs_d, rhs_d, out_d) in enumerate(zip(numbers.lhs_spec[2:], numbers.rhs_spec[2:], numbers.out_spec[2:])):
        n, k, lo = lhs[lhs_d], rhs[rhs_d], p["padding"][d][0]
        stride, lhs_dil, rhs_dil = p["window_strides"][d], p["lhs_dilation"][d], p["rhs_dilation"][d]
        taps *= sum(
            1
            for o in range(out[out_d])
            for j in range(k)
            if 0 <= (q := o * stride - lo + j * rhs_dil) <= (n - 1) * lhs_dil and q % lhs_dil == 0
        )
    outputs = math.prod(out) // math.prod(out[d] for d in numbers.out_spec[2:])  # batch x out features
    return 2.0 * outputs * taps * rhs[numbers.rhs_spec[1]]


def windowed_loops(hlo: str) -> int:
    """How many windowed-einsum loops (FSDP collectives overlapped with their matmul or convolution) a compiled
    TPU program (`compiled.as_text()`) has."""
    return len(_WINDOWED_LOOP.findall(hlo))


_COLLECTIVE = re.compile(
    r"= (?P<result>.*?) (?P<kind>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\((?P<attrs>[^\n]*)"
)
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}
# replica groups as the TPU compiler prints them: over named mesh axes, as an iota [groups,size]<=..., or listed
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]+)\}")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _shapes_bytes(text: str) -> list[int]:
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        width = _DTYPE_BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype)[:2]) // 8)
        sizes.append(math.prod(int(d) for d in dims.split(",") if d) * width)
    return sizes


def _group_size(attrs: str) -> int:
    if m := _MESH_GROUPS.search(attrs):
        axes = dict(re.findall(r"'(\w+)'=(\d+)", m[1]))
        return math.prod(int(axes[a]) for a in re.findall(r"'(\w+)'", m[2]))
    if m := _IOTA_GROUPS.search(attrs):
        return int(m[1])
    if m := _LISTED_GROUPS.search(attrs):
        return len(m[1].split(","))
    return 1


# The TPU compiler writes a reduce-scatter as a fusion of an all-reduce and the slice each device keeps: the
# all-reduce inside a computation of this name is a reduce-scatter of its (whole) result.
_REDUCE_SCATTER_FUSION = re.compile(r"^%all-reduce-scatter[\w.-]* \(", re.M)
_COMPUTATION_END = re.compile(r"^\}", re.M)


def _reduce_scatter_spans(hlo: str) -> list[tuple[int, int]]:
    return [(m.start(), _COMPUTATION_END.search(hlo, m.end()).start()) for m in _REDUCE_SCATTER_FUSION.finditer(hlo)]


def collective_bytes(hlo: str) -> dict[str, dict[str, float]]:
    """Per kind of collective in a compiled per-device program (`compiled.as_text()`): how many, and the bytes one
    device sends over the interconnect for them, by ring algorithms over a group of n devices: an all-gather to R
    bytes sends R (n - 1) / n, a reduce-scatter to a shard of R bytes R (n - 1), an all-reduce of R bytes
    2 R (n - 1) / n, an all-to-all R (n - 1) / n, a permute R. An all-reduce inside the TPU compiler's
    reduce-scatter fusion is that fusion's reduce-scatter. A loop's body is counted once, as in XLA's cost
    analysis."""
    found = {kind: {"count": 0, "bytes": 0.0} for kind in COLLECTIVES}
    scatters = _reduce_scatter_spans(hlo)
    for m in _COLLECTIVE.finditer(hlo):
        kind, sizes = m["kind"], _shapes_bytes(m["result"])
        if kind == "all-reduce" and any(a < m.start() < b for a, b in scatters):
            kind, sizes = "reduce-scatter", [size / _group_size(m["attrs"]) for size in sizes]
        if m["start"] and kind in ("all-gather", "collective-permute"):  # async: (operands..., outputs...)
            sizes = sizes[len(sizes) // 2 :]
        size, n = sum(sizes), _group_size(m["attrs"])
        moved = {
            "all-gather": size * (n - 1) / n,
            "reduce-scatter": size * (n - 1),
            "all-reduce": 2 * size * (n - 1) / n,
            "all-to-all": size * (n - 1) / n,
            "collective-permute": size,
        }[kind]
        found[kind]["count"] += 1
        found[kind]["bytes"] += moved
    return found


# A transfer between slices: the TPU compiler lowers a collective over devices of several slices to host
# transfers that the Multislice runtime carries over the data-center network (a send per device and piece).
_DCN_SEND = re.compile(
    r"= \((?P<result>[^\n]*?), u32\[\], token\[\]\) send\([^\n]*_xla_megascale_transfer_type=\"(?P<kind>\w+)\""
)


def dcn_bytes(hlo: str, slices: int) -> dict[str, dict[str, float]]:
    """Per kind of transfer between `slices` slices in a compiled per-device program (ALL_REDUCE, ...): how many,
    and the bytes one device sends over the data-center network for them, by a ring over the slices: an
    all-reduce of R bytes 2 R (s - 1) / s, any other kind R (s - 1) / s. A loop's body is counted once."""
    found: dict[str, dict[str, float]] = {}
    for m in _DCN_SEND.finditer(hlo):
        size, share = sum(_shapes_bytes(m["result"])), (slices - 1) / slices
        entry = found.setdefault(m["kind"].lower().replace("_", "-"), {"count": 0, "bytes": 0.0})
        entry["count"] += 1
        entry["bytes"] += size * share * (2 if m["kind"] == "ALL_REDUCE" else 1)
    return found


def flops_note(microbatches: int, windowed: int, flops_xla: float | None, flops_counted: float) -> tuple[str, float]:
    """Why XLA's FLOPs fall short of the step's, if they do, and the FLOPs the roofline should use.

    XLA's cost analysis counts a loop's body once, not once per trip: with micro-batches (a compiled loop over
    the whole step) and with windowed einsums (the TPU compiler's loops over an FSDP collective's pieces,
    which it makes when activations per chip are large) its figure misses work, and the roofline takes the
    larger of it and the count (matmuls and convolutions, without elementwise work)."""
    if flops_xla is None:
        return "", flops_counted
    reasons = []
    if microbatches > 1:
        reasons.append(f"the {microbatches} micro-batch loop iterations")
    if windowed:
        reasons.append(
            f"the trips of {windowed} windowed-einsum loops (FSDP all-gathers and reduce-scatters overlapped with "
            "the convolutions and matmuls using them)"
        )
    if not reasons:
        return "", flops_xla
    memory = " times the micro-batch count" if microbatches > 1 else ""
    note = (
        f"XLA's cost analysis counts a loop body once, so it misses {' and '.join(reasons)}: the roofline uses "
        f"the counted FLOPs and XLA's bytes accessed{memory}"
        + (", short of the windowed loops' trips" if windowed else "")
    )
    return note, max(flops_xla, flops_counted)


@dataclasses.dataclass(frozen=True)
class Program:
    """What the TPU compiler says of one program, per device."""

    name: str
    compiled: bool  # False: refused for lack of HBM; `temporaries` is then what the compiler said it needs
    arguments: int  # bytes of its inputs
    temporaries: int  # the compiler's (activations, gathered weights, gradients, workspace)
    total: int  # arguments + temporaries + outputs - outputs aliased to inputs
    flops_xla: float | None  # the whole program's: one device's cost analysis x the devices; None if not compiled
    bytes_accessed: float | None
    windowed: int  # windowed-einsum loops in the compiled program
    output_shardings: Any = None
    collectives: dict | None = None  # collective_bytes of the compiled program; None if not compiled
    dcn: dict | None = None  # dcn_bytes of the compiled program (between slices)


def compile_program(name: str, lowered: Any, arguments: int, devices: int, what: str, slices: int = 1) -> Program:
    """Compiles `lowered` with the TPU compiler (for `slices` slices: Multislice). When the compiler refuses for
    lack of HBM, the Program carries the temporaries it said it needs and `arguments` (its inputs' bytes, from
    their shardings) for the total; any other refusal is a one-line ConfigError naming `what`."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the compiler's own verdict when temporaries exceed the HBM left
        needed = _OUT_OF_MEMORY.search(str(e))
        if needed is None:
            raise ConfigError(f"the TPU compiler rejected {what}: {first_line(e)}") from None
        temporaries = _gib(needed.group(1))
        return Program(name, False, arguments, temporaries, arguments + temporaries, None, None, 0)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temporaries = int(memory.temp_size_in_bytes)
    total = (int(memory.argument_size_in_bytes) + temporaries + int(memory.output_size_in_bytes)
             - int(memory.alias_size_in_bytes))  # fmt: skip
    return Program(
        name,
        True,
        int(memory.argument_size_in_bytes),
        temporaries,
        total,
        float(cost.get("flops", 0.0)) * devices,  # the cost analysis is of one device's partitioned program
        float(cost.get("bytes accessed", 0.0)),
        windowed_loops(hlo := compiled.as_text()),
        compiled.output_shardings,
        collective_bytes(hlo),
        dcn_bytes(hlo, slices),
    )


def roofline(
    flops: float, bytes_accessed: float, chip: Chip, devices: int, collective: float = 0.0, dcn: float = 0.0
) -> tuple[float, str]:
    """(seconds, the dominant term: 'compute', 'memory', 'communication' or 'data-center network'): the largest
    of FLOPs over the devices' bf16 peak, one device's bytes accessed over its HBM bandwidth, the bytes its
    collectives send (`collective_bytes`) over its share of the interconnect (`Chip.collective_gbps`) and those it
    sends to other slices (`dcn_bytes`) over its share of the data-center network (`Chip.dcn_gbps`, where
    published); they overlap (XLA runs collectives asynchronously), so the step takes the longest."""
    terms = {
        "compute": flops / devices / (chip.bf16_tflops * 1e12),
        "memory": bytes_accessed / (chip.hbm_gbps * 1e9),
        "communication": collective / (chip.collective_gbps * 1e9),
    }
    if dcn and chip.dcn_gbps:
        terms["data-center network"] = dcn / (chip.dcn_gbps * 1e9)
    bound = max(terms, key=terms.get)
    return terms[bound], bound


def sent_total(table: dict | None) -> float:
    """The bytes one device sends, summed over the kinds of a `collective_bytes` or `dcn_bytes` table (0 for None:
    not compiled)."""
    return sum(c["bytes"] for c in (table or {}).values())


def plan(config: ml_collections.ConfigDict, slice_name: str, t5_config: str = "xxl", slices: int = 1) -> dict:
    """Compiles the train step of `config` for the TPU slice `slice_name`, or for `slices` of them joined over the
    data-center network (Multislice: the mesh's `data` axis spans them), and returns the figures (see the module
    docstring); mesh axes set to -1 in the config take the slices' devices."""
    stage_config.validate(config)
    tpu_slice = parse_slice(slice_name)
    if slices < 1:
        raise UsageError(f"--slices {slices}: expected 1 or more")
    devices = slice_devices(tpu_slice, slices)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    setup_lib.check_batch_split(config, mesh)
    text = abstract_text(config, t5_config, mesh)
    trainer = setup_lib.setup(config, mesh, text)
    state, batch = trainer.abstract_state(), abstract_batch(config, mesh, text.dim)
    streak = trainer.no_streak(abstract=True)
    n = len(devices)
    held = {
        "params": bytes_per_device(state["params"]),
        "optimizer": bytes_per_device(state["opt_state"]),
        "ema": bytes_per_device(state["ema"]),
        "t5": bytes_per_device(text.params),
        "batch": bytes_per_device(batch),
    }
    fine_tuning = frozen_savings(config, trainer, state, held["optimizer"])
    usable = usable_hbm(devices[0])
    evaluation = evaluation_bytes(config, sum(held.values()), usable)
    traced = trainer.train_step.trace(state, text.params, batch, streak)
    flops_counted = matmul_flops(traced.jaxpr)
    where = f"{slices} x {slice_name}" if slices > 1 else slice_name
    step = compile_program("train step", traced.lower(), sum(held.values()), n, f"the train step for {where}", slices)
    note, compute_flops = flops_note(int(config.train.microbatches), step.windowed, step.flops_xla, flops_counted)
    # The micro-batch loop's bytes are counted once too: scaled by its trip count (which counts the optimizer's
    # share k times, so a slight overestimate).
    loops = int(config.train.microbatches)
    # Between slices the step sends its gradient reduction, once per step (after the micro-batch loop): not scaled.
    collective, dcn = sent_total(step.collectives) * loops, sent_total(step.dcn)
    step_s, bound = roofline(compute_flops, (step.bytes_accessed or 0.0) * loops, tpu_slice.chip, n, collective, dcn)
    dcn_gbps = tpu_slice.chip.dcn_gbps
    return {
        "slice": slice_name,
        "slices": slices,
        "topology": tpu_slice.topology,
        "chip": tpu_slice.chip.name,
        "devices": n,
        "mesh": dict(mesh.shape),
        "attention": platform_attention(config.train.attention, devices[0].platform),
        "global_batch": int(config.train.batch_size),
        # planned at text.max_length: with text.buckets (T5 in the step), the largest of the lengths it compiles for
        "text_tokens": batch["mask"].shape[1],
        "text_lengths": [batch["mask"].shape[1]] if config.data.precomputed_text else list(buckets.lengths(config)),
        "unet_params": trainer.model.num_params,
        "t5_params": sum(math.prod(x.shape) for x in jax.tree.leaves(text.params)),
        "text": text.description,
        "per_device_bytes": {**held, "temporaries": step.temporaries, "total": step.total},
        "hbm_bytes": tpu_slice.chip.hbm_bytes,
        "hbm_usable_bytes": usable,
        "fits": step.total <= usable,
        "hbm_margin": 1.0 - step.total / usable,
        "flops_per_step_xla": step.flops_xla,
        "flops_per_step_counted": flops_counted,
        "flops_note": note,
        "windowed_loops": step.windowed,
        "bytes_accessed_per_device": step.bytes_accessed,
        "collectives_per_device": step.collectives,  # one pass of the micro-batch loop's body
        "collective_s": collective / (tpu_slice.chip.collective_gbps * 1e9),
        "dcn_per_device": step.dcn,
        "dcn_s": dcn / (dcn_gbps * 1e9) if dcn_gbps else None,
        "compute_s": compute_flops / n / (tpu_slice.chip.bf16_tflops * 1e12),
        "memory_s": (step.bytes_accessed or 0.0) * loops / (tpu_slice.chip.hbm_gbps * 1e9),
        "roofline_step_s": step_s,
        "roofline_bound": bound,
        "compiled": step.compiled,
        "roofline_images_per_s": config.train.batch_size / step_s if step_s else float("inf"),
        **fine_tuning,
        **evaluation,
    }


def evaluation_bytes(config: ml_collections.ConfigDict, held: int, usable: int) -> dict:
    """With eval.every set: the Inception and CLIP weights on every chip while the loop evaluates (they wait in host
    memory otherwise, train/periodic_eval.py), and whether they fit beside the held state (the sampler's own
    temporaries come on top: `--sample` plans them). Without it, nothing."""
    if not int(config.eval.every):
        return {}
    weights = scorer_lib.device_bytes(str(config.eval.clip) or None)
    total = held + sum(weights.values())
    return {"eval_weights_bytes": weights, "eval_held_total": total, "eval_fits": total <= usable}


def frozen_savings(
    config: ml_collections.ConfigDict, trainer: setup_lib.TrainSetup, state: dict, optimizer: int
) -> dict:
    """With train.trainable or LoRA: the trained parameters (count, of all, adapters included) and the per-device
    optimizer bytes the frozen ones save (every model parameter trained, no adapters, minus `optimizer`); else {}."""
    if not config.train.trainable and not lora.rank(config):
        return {}
    everything = config.copy_and_resolve_references()
    everything.train.trainable, everything.train.lora_rank = (), 0
    shardings = state_lib.state_shardings(everything, trainer.model, trainer.tx, trainer.mesh)
    full = state_lib.abstract_state(everything, trainer.text.dim, trainer.tx, shardings)["opt_state"]
    sizes = {p: math.prod(s.shape) for p, s in lora.named(state["params"]).items()}
    return {
        "trainable_params": sum(sizes[p] for p in trainable.trained_paths(config, state["params"])),
        "all_params": sum(sizes.values()),
        "optimizer_bytes_saved_by_frozen": bytes_per_device(full) - optimizer,
    }


def sampling_mesh(devices: Sequence[Any]) -> jax.sharding.Mesh:
    """`stage.model.local_mesh`'s layout on `devices`: all of them on fsdp, so every weight is split over them
    by the configs' mesh.rules and the batch over the same devices."""
    return mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}), devices)


@dataclasses.dataclass
class _Figures:
    """A sampling program's figures: its compile, its FLOPs and roofline, and (set once all are compiled) its
    peak, with the resident weights it does not take."""

    program: Program
    takes: str  # the resident weights among its inputs: "t5" or a stage's name
    inputs: int  # bytes of its other inputs (ids, text, the sampler's state), from their shardings
    counted: float  # matmul and convolution FLOPs from the jaxpr
    flops: float  # what the roofline uses (flops_note)
    note: str
    seconds: float
    bound: str
    peak: int = 0


def _figures(traced: Any, name: str, takes: str, weights: int, inputs: int, chip: Chip, devices: int) -> _Figures:
    program = compile_program(name, traced.lower(), weights + inputs, devices, f"the {name} program")
    counted = matmul_flops(traced.jaxpr)
    note, flops = flops_note(1, program.windowed, program.flops_xla, counted)
    seconds, bound = roofline(flops, program.bytes_accessed or 0.0, chip, devices, sent_total(program.collectives))
    return _Figures(program, takes, inputs, counted, flops, note, seconds, bound)


def plan_sampling(
    configs: Sequence[ml_collections.ConfigDict],
    names: Sequence[str],
    slice_name: str,
    t5_config: str = "xxl",
    batch_size: int = 4,
) -> dict:
    """Compiles what sampling the cascade `configs` (base stage first; `names` label them, e.g. their files)
    runs, for the TPU slice `slice_name`, with T5 and every stage's parameters resident at once on the sampling
    mesh (`sampling_mesh`, as sample.py places them): T5's encoding of `batch_size` prompts, and per stage its
    text conditioning and its sampler loop (`diffusion.sampler`'s compiled chunk: per step one model call on
    the guidance-doubled batch, and the update). The programs are the functions sampling runs, lowered on
    abstract inputs shaped and placed as sampling places them; steps, guidance and schedule are each config's
    (train.sample_*, diffusion.*), the sampler the cascade's default (ddpm). XLA counts the step loop's body
    once, so the loop's FLOPs and bytes are one step's. Returns per-device bytes, the peak over the programs
    (each one's compiled total plus the resident weights it does not take) against HBM, and roofline times."""
    if not configs or len(configs) != len(names):
        raise UsageError(f"a sampling plan needs one name per stage config, got {len(names)} for {len(configs)}")
    if batch_size < 1:
        raise UsageError(f"--batch_size {batch_size}: the number of prompts must be at least 1")
    for index, (name, config) in enumerate(zip(names, configs)):
        stage_config.validate(config)
        low, size = lowres_size(config), int(config.data.image_size)
        if index == 0 and low is not None:
            raise UsageError(
                f"--config {name}: a {low}->{size} super-resolution stage cannot start the cascade; give the base "
                "stage's --config first, then the SR stages' in order"
            )
        previous = int(configs[index - 1].data.image_size)
        if index and low is None:
            raise UsageError(f"--config {name}: a base stage ({size}x{size}) after the first stage; only one starts")
        if index and low != previous:
            raise UsageError(
                f"--config {name}: takes {low}x{low} input, but the stage before it makes {previous}x{previous}"
            )
    tpu_slice = parse_slice(slice_name)
    devices = slice_devices(tpu_slice)
    n, chip, usable = len(devices), tpu_slice.chip, usable_hbm(devices[0])
    mesh = sampling_mesh(devices)
    first = configs[0].copy_and_resolve_references()
    first.data.precomputed_text = False  # the cascade always encodes its prompts
    text = abstract_text(first, t5_config, mesh)
    encoder = text.encoder
    rows, length = mesh_lib.padded_rows(batch_size, mesh), int(first.text.max_length)
    batch, whole = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    ids, mask = _abstract((rows, length), jnp.int32, batch), _abstract((rows, length), jnp.bool_, batch)
    with activation_layout(mesh):  # sampling.encode's program
        traced = sampling._encode.trace(encoder.apply, text.params, ids, mask, batch_size, whole)
    encoded = _abstract((batch_size, length, encoder.dim), encoder.dtype, whole)
    resident = {"t5": bytes_per_device(text.params), "text": bytes_per_device(encoded)}
    programs = [_figures(traced, "T5 encode", "t5", resident["t5"], bytes_per_device((ids, mask)), chip, n)]
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    stages = []
    for name, config in zip(names, configs):
        model = stage_model(config, encoder.dim, mesh)
        resident[name] = bytes_per_device(model.abstract_params)
        dcfg = config.diffusion
        steps, grid = resolve_steps(config.train.sample_steps, dcfg.schedule)
        guidance = float(config.train.sample_guidance_scale)
        guided = guidance != 1.0
        placed = _abstract((rows, length, encoder.dim), encoder.dtype, batch)  # sampling.sample's place(text)
        rules = mesh_lib.param_rules(config.mesh)  # sampling.sample places weights at use by these
        with activation_layout(mesh, rules):
            traced = sampler_lib._condition.trace(
                model.abstract_params, placed, mask, denoiser=model.denoiser, guided=guided
            )
        inputs = bytes_per_device((placed, mask))
        condition = _figures(traced, f"{name} text conditioning", name, resident[name], inputs, chip, n)
        # The context enters the step loop where the conditioning program leaves it.
        outs, tree = jax.tree.flatten(traced.out_info)
        shardings = jax.tree.leaves(condition.program.output_shardings) or [batch] * len(outs)
        context = jax.tree.unflatten(tree, [_abstract(o.shape, o.dtype, s) for o, s in zip(outs, shardings)])
        size = int(config.data.image_size)
        x = _abstract((rows, size, size, 3), jnp.float32, batch)
        model_kwargs = {}
        low = lowres_size(config)
        if low is not None:  # what sampling.sample hands the model: the noise-augmented (for IF, upscaled) input
            lowres = jax.eval_shape(
                lambda z, c=config, s=size: conditioning_image(c, z, s), _abstract((rows, low, low, 3), jnp.float32)
            )
            model_kwargs = {
                "lowres": _abstract(lowres.shape, jnp.float32, batch),
                "lowres_t": _abstract((rows,), jnp.float32, batch),
            }
        index, scalar = _abstract((), jnp.int32), _abstract((), jnp.float32)
        chunk_args = (
            model.abstract_params, (x, x), _abstract((rows,), key_dtype, batch), index, index, index, context,
            model_kwargs, scalar, scalar, scalar, None if grid is None else _abstract(grid.shape, grid.dtype), None,
            index, None, None, (scalar, scalar, scalar),  # first visit; no RePaint order, no inpainting; guidance
        )  # fmt: skip
        with activation_layout(mesh, rules):
            traced = sampler_lib._run_chunk.trace(
                *chunk_args, denoiser=model.denoiser, sampler=SAMPLER, schedule=dcfg.schedule,
                objective=dcfg.objective, thresholding=dcfg.thresholding,
                percentile=float(dcfg.dynamic_threshold_percentile),
                threshold_max=float(dcfg.threshold_max or math.inf), variance=dcfg.variance, guided=guided,
            )  # fmt: skip
        inputs = bytes_per_device(chunk_args[1:])
        step = _figures(traced, f"{name} sampler step", name, resident[name], inputs, chip, n)
        programs += [condition, step]
        stages.append({
            "name": name,
            "image_size": size,
            "lowres_size": low,
            "unet_params": model.num_params,
            "steps": steps,
            "guidance_scale": guidance,
            "model_batch": 2 * rows if guided else rows,
            "step_flops": step.flops,
            "step_flops_xla": step.program.flops_xla,
            "step_flops_counted": step.counted,
            "step_flops_note": step.note,
            "windowed_loops": step.program.windowed,
            "bytes_accessed_per_step": step.program.bytes_accessed,
            "roofline_step_s": step.seconds,
            "roofline_bound": step.bound,
            "roofline_stage_s": condition.seconds + steps * step.seconds,
        })  # fmt: skip
    for f in programs:  # beside each program, the resident weights it does not take (the encode makes the text)
        beside = {f.takes, "text"} if f.takes == "t5" else {f.takes}
        # jit drops the parameters a program does not use (the conditioning uses a stage's text layers only)
        # from its compiled inputs, but they stay resident: what its arguments leave out is added back.
        pruned = max(0, resident[f.takes] + f.inputs - f.program.arguments)
        f.peak = f.program.total + pruned + sum(b for k, b in resident.items() if k not in beside)
    peak = max(programs, key=lambda f: f.peak)
    return {
        "slice": slice_name,
        "topology": tpu_slice.topology,
        "chip": chip.name,
        "devices": n,
        "mesh": dict(mesh.shape),
        "prompts": batch_size,
        "rows": rows,
        "sampler": SAMPLER,
        "t5_params": sum(math.prod(x.shape) for x in jax.tree.leaves(text.params)),
        "text": text.description,
        "stages": stages,
        "resident_bytes_per_device": resident,
        "programs": [
            {
                "name": f.program.name,
                "compiled": f.program.compiled,
                "arguments": f.program.arguments,
                "temporaries": f.program.temporaries,
                "total": f.program.total,
                "peak": f.peak,
                "flops": f.flops,
                "flops_note": f.note,
                "bytes_accessed_per_device": f.program.bytes_accessed,
                "collectives_per_device": f.program.collectives,
                "roofline_s": f.seconds,
                "roofline_bound": f.bound,
            }
            for f in programs
        ],
        "peak_bytes_per_device": peak.peak,
        "peak_program": peak.program.name,
        "hbm_bytes": chip.hbm_bytes,
        "hbm_usable_bytes": usable,
        "fits": peak.peak <= usable,
        "hbm_margin": 1.0 - peak.peak / usable,
        "compiled": all(f.program.compiled for f in programs),
        "roofline_encode_s": programs[0].seconds,
        "roofline_cascade_s": programs[0].seconds + sum(s["roofline_stage_s"] for s in stages),
    }
