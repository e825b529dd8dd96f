"""The planner: TPU slice names, and the real train step and the cascade's sampling programs compiled for a TPU
slice by the TPU compiler on this CPU-only machine (libtpu from PyPI, the `plan` extra), with memory and FLOPs
that add up."""

import json

import pytest

from imagen_jax import config as config_lib
from imagen_jax.errors import ConfigError, UsageError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train.plan import parse_slice
from imagen_jax.train.setup import check_batch_split


@pytest.mark.parametrize(
    "name, chips, topology",
    [("v4-8", 4, "v4:2x2x1"), ("v4-64", 32, "v4:2x4x4"), ("v4-512", 256, "v4:4x8x8"), ("v5p-128", 64, "v5:4x4x4"),
     ("v5e-8", 8, "v5e:2x4"), ("v5e-256", 256, "v5e:16x16"), ("v6e-32", 32, "v6e:4x8"), ("v5p-2", 1, "v5:1x1x1"),
     ("v6e-1", 1, "v6e:1x1"), ("v5e-2", 2, "v5e:1x2")],
)  # fmt: skip
def test_slice_names_count_tensorcores_for_v4_v5p_and_chips_for_v5e_v6e(name, chips, topology):
    tpu_slice = parse_slice(name)
    assert (tpu_slice.chips, tpu_slice.topology) == (chips, topology)


@pytest.mark.parametrize("name", ["v4-6", "v4-1", "v7-8", "v5e", "tpu-8"])
def test_bad_slice_names_are_one_line_usage_errors(name):
    with pytest.raises(UsageError, match=f"--topology '{name}'"):
        parse_slice(name)


def _tiny_config(tmp_path, **mesh):
    c = config_lib.load_config_file("configs/demo.py")
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
    c.model.attn_resolutions, c.model.head_dim, c.train.batch_size, c.text.max_length = (4,), 8, 8, 8
    for axis, size in mesh.items():
        c.mesh[axis] = size
    t5 = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4,
          "feed_forward_proj": "gated-gelu"}  # fmt: skip
    (tmp_path / "t5.json").write_text(json.dumps(t5))
    return c, str(tmp_path / "t5.json")


def test_plans_hold_totals_against_the_hbm_the_compiler_lets_a_program_use():
    """The TPU compiler's own usable HBM per chip (stated when it refuses a program larger than any chip), a little
    below the nominal capacity; a plan's total is held against it (issue 29, point 2)."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    from imagen_jax.train import plan

    usable = {}
    for name in ("v4-8", "v5e-8", "v5p-8", "v6e-8"):
        tpu_slice = plan.parse_slice(name)
        usable[name] = plan.usable_hbm(plan.slice_devices(tpu_slice)[0])
        assert 0.95 * tpu_slice.chip.hbm_bytes < usable[name] < 1.01 * tpu_slice.chip.hbm_bytes, name
    assert usable == {
        "v4-8": 30.75 * 2**30,
        "v5e-8": 15.75 * 2**30,
        "v5p-8": int(95.74 * 2**30),
        "v6e-8": 31.25 * 2**30,
    }


@pytest.mark.slow  # four TPU compiles, ~2 min
def test_plan_compiles_for_a_tpu_slice_and_its_figures_add_up(tmp_path):
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    from imagen_jax.tools.plan import format_report
    from imagen_jax.train.plan import plan

    config, t5 = _tiny_config(tmp_path, data=4, fsdp=1)
    replicated = plan(config, "v4-8", t5)
    assert replicated["chip"] == "TPU v4" and replicated["devices"] == 4 and replicated["fits"]
    m = replicated["per_device_bytes"]
    assert m["total"] >= m["params"] + m["optimizer"] + m["ema"] + m["t5"] + m["batch"]
    assert m["params"] == m["ema"] == replicated["unet_params"] * 4  # float32, whole on every device
    # XLA's FLOPs (one device's program x devices) agree with the matmuls and convolutions counted in the jaxpr, up
    # to the elementwise work XLA counts too (normalisation, activations, the optimizer): ~19% of this tiny model
    assert 0.7 < replicated["flops_per_step_counted"] / replicated["flops_per_step_xla"] <= 1.0
    assert replicated["roofline_images_per_s"] > 0

    config, t5 = _tiny_config(tmp_path, data=1, fsdp=4)
    sharded = plan(config, "v4-8", t5)
    assert sharded["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert sharded["per_device_bytes"]["params"] < 0.5 * m["params"]  # FSDP: each device holds a share
    assert sharded["flops_per_step_counted"] == replicated["flops_per_step_counted"]  # same program, other layout
    assert replicated["flops_note"] == sharded["flops_note"] == ""

    # micro-batches: a compiled loop, whose iterations XLA's cost analysis does not count; the count does
    config.train.microbatches = 2
    looped = plan(config, "v4-8", t5)
    assert "micro-batch loop" in looped["flops_note"]
    assert abs(looped["flops_per_step_counted"] / sharded["flops_per_step_counted"] - 1) < 0.01
    compute_s = looped["flops_per_step_counted"] / 4 / 275e12
    memory_s = looped["bytes_accessed_per_device"] * 2 / 1200e9  # the loop's bytes counted once: times 2
    sent = sum(c["bytes"] for c in looped["collectives_per_device"].values())
    assert sent > 0 and looped["collective_s"] == pytest.approx(sent * 2 / 268.6e9)  # v4's share of the ICI
    assert looped["roofline_step_s"] == pytest.approx(max(compute_s, memory_s, looped["collective_s"]))
    assert (looped["compute_s"], looped["memory_s"]) == (pytest.approx(compute_s), pytest.approx(memory_s))

    # two v5e-4 slices (Multislice): the gradient reduction crosses the data-center network, once per step
    config, t5 = _tiny_config(tmp_path, data=2, fsdp=4)
    multi = plan(config, "v5e-4", t5, slices=2)
    assert (multi["slices"], multi["devices"], multi["mesh"]["data"]) == (2, 8, 2)
    crossing = sum(c["bytes"] for c in multi["dcn_per_device"].values())
    assert crossing > 0 and multi["dcn_s"] == pytest.approx(crossing / 3.125e9)
    terms = (multi["compute_s"], multi["memory_s"], multi["collective_s"], multi["dcn_s"])
    assert multi["roofline_step_s"] == pytest.approx(max(terms))
    assert "sent per device to other slices (data-center network): all-reduce" in format_report("demo", multi)


def test_plan_cli_errors_are_one_line(capsys):
    from imagen_jax.tools import plan as plan_tool

    assert plan_tool.main(["--config", "configs/demo.py", "--topology", "v9-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plan: error: --topology 'v9-8': expected GENERATION-N")
    assert plan_tool.main(["--config", "configs/demo.py", "--topology", "v4-8", "--config.train.nope=1"]) == 2
    assert capsys.readouterr().err.strip() == "plan: error: unknown config key 'train.nope'"


@pytest.mark.parametrize("stride", [1, 2])
def test_counted_conv_flops_skip_padding_like_xla(stride):
    """The planner's analytic count of a padded (and strided) convolution, forward and backward, equals XLA's cost
    analysis: window taps over zero padding, or between a dilated input's samples, multiply nothing."""
    import jax
    import jax.numpy as jnp

    from imagen_jax.train.plan import matmul_flops

    def conv(x, w):
        layout = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=layout)

    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    out_positions = (6 // stride) ** 2 * 2 * 4
    for fn in (conv, jax.grad(lambda x, w: jnp.sin(conv(x, w)).sum(), argnums=(0, 1))):
        cost = jax.jit(fn).lower(x, w).compile().cost_analysis()
        xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
        assert matmul_flops(jax.make_jaxpr(fn)(x, w)) == xla
    assert matmul_flops(jax.make_jaxpr(conv)(x, w)) < 2 * out_positions * 27  # fewer than the padded windows' taps


def test_flash_attention_counts_its_other_platforms_form_once_per_example():
    """`flash` attention is a `platform_dependent` cond: the TPU branch's Pallas kernel (whose body is one block of
    a grid, so counts nothing) and the other platforms' form. The count takes the largest branch, once: the
    attention's own matmuls, proportional to the batch (summing both branches and the kernel's one block made a
    2-micro-batch step count 1.4% more than one batch)."""
    import jax
    import jax.numpy as jnp

    from imagen_jax.models import layers
    from imagen_jax.train.plan import matmul_flops

    def count(batch: int, kind: str) -> float:
        q = jnp.ones((batch, 64, 2, 8))
        return matmul_flops(jax.make_jaxpr(lambda q: layers.attention(q, q, q, kind=kind, chunk=32))(q))

    plain = 2 * 2 * (64 * 64 * 8) * 2  # QK^T and PV, per head, per example
    assert count(1, "dot_product") == plain and count(3, "dot_product") == 3 * plain
    assert count(1, "flash") == plain and count(3, "flash") == 3 * plain


def test_windowed_einsum_loops_are_found_and_the_roofline_counts_their_trips():
    """With many activations per chip the TPU compiler overlaps an FSDP collective with its matmul as a loop over
    the collective's pieces; XLA's cost analysis counts that loop's body once. The planner finds such loops in
    the compiled program, says so, and takes the counted FLOPs (seen on the mini presets at v5e-8: 321 loops,
    XLA's figure 48% short)."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from imagen_jax.train import plan as plan_lib

    mesh = jax.sharding.Mesh(np.array(plan_lib.slice_devices(plan_lib.parse_slice("v5e-8"))), ("fsdp",))

    def figures(batch):
        x = jax.ShapeDtypeStruct((batch, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
        w = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp")))

        def loss(w, x):  # a layer's forward and weight gradient, its kernel stored over fsdp
            y = jax.lax.with_sharding_constraint(x @ w, NamedSharding(mesh, P("fsdp", None)))
            return jnp.sum(jnp.tanh(y).astype(jnp.float32))

        step = jax.jit(jax.grad(loss))
        compiled = step.lower(w, x).compile()
        cost = compiled.cost_analysis()
        xla = (cost[0] if isinstance(cost, list) else cost)["flops"] * 8
        return plan_lib.windowed_loops(compiled.as_text()), xla, plan_lib.matmul_flops(jax.make_jaxpr(step)(w, x))

    small, xla, counted = figures(8 * 16)  # a plain all-gather: XLA counts it all (plus the tanh)
    assert small == 0 and 1.0 <= xla / counted < 1.05
    assert plan_lib.flops_note(1, small, xla, counted) == ("", xla)
    windowed, xla, counted = figures(8 * 4096)
    assert windowed > 0 and xla < 0.9 * counted
    note, flops = plan_lib.flops_note(1, windowed, xla, counted)
    assert flops == counted and f"trips of {windowed} windowed-einsum loops" in note


@pytest.mark.slow  # one TPU compile, ~1 min
def test_fsdp_gathers_kernels_in_bfloat16_and_reduces_their_gradients_in_float32(tmp_path):
    """The layers cast their kernels to the compute dtype where they are stored, so under FSDP the TPU program
    all-gathers them in bfloat16: half the bytes of the float32 parameters (on CPU, XLA gathers in float32 whatever
    the dtype); and their gradients come back in float32, so they are all-reduced in float32 (issue 29, point 6)."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    import collections
    import re

    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.train import plan as plan_lib
    from imagen_jax.train import setup as setup_lib

    config, _ = _tiny_config(tmp_path, data=1, fsdp=4)
    config.train.compute_dtype, config.data.precomputed_text = "bfloat16", True
    mesh = mesh_lib.make_mesh(config.mesh, plan_lib.slice_devices(plan_lib.parse_slice("v4-8")))
    trainer = setup_lib.setup(config, mesh, setup_lib.Text(None, {}, {}, 16, "precomputed"))
    batch = plan_lib.abstract_batch(config, mesh, 16)
    hlo = (
        trainer.train_step.lower(trainer.abstract_state(), {}, batch, trainer.no_streak(abstract=True))
        .compile()
        .as_text()
    )
    gathers = re.findall(r"= \(?(\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", hlo)
    ranks = collections.Counter((dtype, len(shape.split(","))) for dtype, shape in gathers)
    assert ranks[("bf16", 4)] > 0  # conv kernels [3, 3, in, out] are gathered ...
    # ... and no kernel ([in, out] or [3, 3, in, out]) in float32; GroupNorm's [batch, groups, channels/group]
    # statistics are small float32 gathers of rank 3. Known exception since the layers gather their weights at
    # use (issue 29): XLA gathers the up path's two 1x1 skip kernels ([1, 1, 48, 16], [1, 1, 32, 16]) before
    # their cast, in float32.
    f32 = [(dtype, shape) for dtype, shape in gathers if dtype == "f32" and len(shape.split(",")) in (2, 4)]
    assert not [shape for _, shape in f32 if not shape.startswith("1,1,")]
    assert len(f32) <= 2

    # Every all-reduce of an array of rank >= 2 (the kernels' gradients) is in float32: with autodiff's gradients
    # they were bfloat16 (small bfloat16 vectors are forward gathers that XLA makes all-reduces of).
    reduced = [
        (dtype, shape)
        for line in hlo.splitlines()
        if re.search(r" all-reduce(?:-start)?\(", line)
        for dtype, shape in re.findall(r"(\w+)\[([\d,]*)\]", line.split(" all-reduce")[0].split("=", 1)[1])
    ]
    assert [s for d, s in reduced if d == "f32" and len(s.split(",")) == 4], reduced
    assert not [s for d, s in reduced if d != "f32" and len(s.split(",")) >= 2], reduced

    # The planner's communication term counts them: each bfloat16 kernel gathered once (3/4 of it from the other 3
    # devices), and each float32 gradient reduced once: reduce-scattered (3/4 of it, at 4 bytes an element; the TPU
    # compiler writes one as a fusion of an all-reduce and a slice, which the planner reads as the reduce-scatter
    # it is) or, where XLA's combiner merged several into one all-reduce before slicing, all-reduced (twice that).
    import math

    import jax

    sent = plan_lib.collective_bytes(hlo)
    params = jax.tree.leaves(trainer.abstract_state()["params"])
    kernels = sum(2 * math.prod(x.shape) for x in params if x.ndim >= 2)
    assert 1.0 <= sent["all-gather"]["bytes"] / (0.75 * kernels) < 1.1, (sent, kernels)
    assert sent["reduce-scatter"]["count"] > 0, sent
    once = sent["reduce-scatter"]["bytes"] + sent["all-reduce"]["bytes"] / 2
    assert 1.0 <= once / (1.5 * kernels) < 1.1, (sent, kernels)


def test_collective_bytes_read_every_form_of_replica_groups():
    """Ring-algorithm bytes per device from compiled TPU HLO lines: groups over named mesh axes, as an iota, or
    listed; an async start's (operand, output) tuple; a combined all-reduce of several arrays; the TPU compiler's
    reduce-scatter fusion (an all-reduce and a slice) as the reduce-scatter it is."""
    from imagen_jax.train.plan import collective_bytes

    hlo = "\n".join([
        "%all-reduce-scatter.2 (input: f32[8,6]) -> f32[2,6] {",
        "  %x = f32[8,6]{1,0} all-reduce(%input), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add",
        "  ROOT %y = f32[2,6]{1,0} dynamic-slice(%x, %i, %j), dynamic_slice_sizes={2,6}",
        "}",
        "  %ag = bf16[16,64]{0,1} all-gather(%c), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dims={1}",
        "  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%d), replica_groups=[2,4]<=[8], dimensions={0}",
        "  %rs = f32[4,8]{1,0} reduce-scatter(%e), replica_groups={{0,1},{2,3}}, dimensions={0}",
        "  %ar = (f32[16]{0}, bf16[32]{0}) all-reduce(%f, %g), replica_groups=mesh['axis_0'=4] {'axis_0'}",
        "  %gte = bf16[32]{0} get-tuple-element(%ar), index=1",
    ])  # fmt: skip
    sent = collective_bytes(hlo)
    assert sent["all-gather"] == {"count": 2, "bytes": 16 * 64 * 2 * 3 / 4 + 32 * 4 * 3 / 4}
    assert sent["reduce-scatter"] == {"count": 2, "bytes": 4 * 8 * 4 * 1 + 2 * 6 * 4 * 3}  # the fusion's too
    assert sent["all-reduce"] == {"count": 1, "bytes": 2 * (16 * 4 + 32 * 2) * 3 / 4}
    assert sent["all-to-all"]["count"] == sent["collective-permute"]["count"] == 0


def test_multislice_meshes_put_data_across_slices_and_the_plan_counts_what_crosses():
    """Two v5e-4 slices joined over the data-center network (Multislice): the mesh's `data` axis spans them (a
    `data` that is not a multiple of the slices is refused in one line); a gradient reduced over `data` crosses as
    the Multislice runtime's all-reduce of each device's fsdp shard, 2 R (s - 1) / s bytes per device, timed at v5e's
    published share of the network (3.125 GB/s per chip) as a roofline term of its own; v4 publishes none."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from imagen_jax.train.plan import CHIPS, dcn_bytes, roofline, slice_devices

    devices = slice_devices(parse_slice("v5e-4"), 2)
    assert sorted(d.slice_index for d in devices) == [0] * 4 + [1] * 4
    config = config_lib.load_config_file("configs/demo.py")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    config.mesh.data, config.mesh.fsdp = 1, 8
    with pytest.raises(ConfigError, match=r"^mesh: data=1 must be a multiple of the 2 slices \(only data"):
        mesh_lib.make_mesh(config.mesh, devices)

    w = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    x = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
    grad = jax.jit(jax.grad(lambda w, x: jnp.tanh(x @ w).sum()), out_shardings=w.sharding)
    sent = dcn_bytes(grad.lower(w, x).compile().as_text(), 2)
    shard = 1024 * 1024 * 4 / 4
    assert sent == {"all-reduce": {"count": 1, "bytes": 2 * shard * (2 - 1) / 2}}
    seconds, bound = roofline(1e9, 1e6, CHIPS["v5e"], 8, 1e6, sent["all-reduce"]["bytes"])
    assert bound == "data-center network" and seconds == pytest.approx(shard / 3.125e9)
    assert roofline(1e9, 1e6, CHIPS["v4"], 8, 1e6, sent["all-reduce"]["bytes"])[1] != "data-center network"


def test_one_and_two_chip_slices_have_their_devices():
    """A slice smaller than a host (v5p-2: one chip, what one device holding a whole cascade needs) is described
    with host bounds of its own size."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    from imagen_jax.train.plan import slice_devices

    assert len(slice_devices(parse_slice("v5p-2"))) == 1
    assert len(slice_devices(parse_slice("v5e-2"))) == 2


def test_a_mesh_whose_tensor_groups_span_hosts_is_refused():
    """v4-16 is two hosts of 4 chips: a tensor axis of 8 puts chips of both hosts in every batch shard."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    from imagen_jax.train.plan import slice_devices

    devices = slice_devices(parse_slice("v4-16"))
    config = config_lib.load_config_file("configs/demo.py")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 4
    check_batch_split(config, mesh_lib.make_mesh(config.mesh, devices))
    config.mesh.fsdp, config.mesh.tensor = 1, 8
    with pytest.raises(ConfigError, match=r"span processes \[0, 1\].*within one process's 4 devices"):
        check_batch_split(config, mesh_lib.make_mesh(config.mesh, devices))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/if_i_xl.py", "--config", "configs/if_ii_l.py"],
         "--config given more than once: a train plan is of one stage; --sample plans a cascade"),
        (["--config", "configs/if_i_xl.py", "--batch_size", "2"],
         "--batch_size is the prompts of a --sample plan; a train plan's is --config.train.batch_size"),
        (["--sample", "--config", "configs/if_i_xl.py", "--batch_size", "0"],
         "--batch_size '0': expected a number of prompts >= 1"),
        (["--sample", "--config", "configs/if_ii_l.py"],
         "--config configs/if_ii_l.py: a 64->256 super-resolution stage cannot start the cascade; give the base "
         "stage's --config first, then the SR stages' in order"),
        (["--sample", "--config", "configs/if_i_xl.py", "--config", "configs/if_i_xl.py"],
         "--config configs/if_i_xl.py: a base stage (64x64) after the first stage; only one starts"),
    ],
)  # fmt: skip
def test_sampling_plan_cli_errors_are_one_line(capsys, args, message):
    from imagen_jax.tools import plan as plan_tool

    assert plan_tool.main([*args, "--topology", "v5e-8"]) == 2
    assert capsys.readouterr().err.strip() == f"plan: error: {message}"


def _tiny_if_cascade() -> tuple:
    """IF's stage I and stage II as the tiny diffusers pipelines in the fixtures describe them, and their T5."""
    from imagen_jax.stage import if_folder

    base = if_folder.if_config("tests/fixtures/if/pipeline/stage1")
    sr = if_folder.if_config("tests/fixtures/if/pipeline/stage2")
    sr.model.lowres_size = base.data.image_size  # as the cascade sets an IF SR stage's input: the stage before's
    base.train.sample_steps, sr.train.sample_steps = 4, 3
    base.mesh.replicate_below = sr.mesh.replicate_below = 0  # tiny weights, split as the real ones are
    return base, sr, "tests/fixtures/if/pipeline/stage1/text_encoder"


@pytest.mark.slow  # eight TPU compiles, ~3 min on 2 cores
def test_sampling_plan_compiles_the_cascade_with_every_weight_resident():
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    import jax
    import jax.numpy as jnp

    from imagen_jax.diffusion import sampler as sampler_lib
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.model import stage_model
    from imagen_jax.tools.plan import format_sampling_report
    from imagen_jax.train.plan import matmul_flops, plan_sampling

    base, sr, t5 = _tiny_if_cascade()
    r = plan_sampling([base, sr], ["base", "sr"], "v5e-8", t5, batch_size=3)
    assert (r["devices"], r["mesh"], r["rows"]) == (8, {"data": 1, "fsdp": 8, "tensor": 1}, 8)  # 3 prompts padded
    assert [s["model_batch"] for s in r["stages"]] == [16, 16]  # guidance doubles the rows
    assert [s["steps"] for s in r["stages"]] == [4, 3] and r["compiled"] and r["fits"]
    held = r["resident_bytes_per_device"]
    assert set(held) == {"t5", "text", "base", "sr"}
    programs = {p["name"]: p for p in r["programs"]}
    assert list(programs) == [
        "T5 encode", "base text conditioning", "base sampler step", "sr text conditioning", "sr sampler step"
    ]  # fmt: skip
    # beside a program, the weights it does not take: a step takes its own stage's, the encode T5's (it makes the text)
    step = programs["sr sampler step"]
    assert step["peak"] >= step["total"] + held["t5"] + held["text"] + held["base"]
    assert programs["T5 encode"]["peak"] >= programs["T5 encode"]["total"] + held["base"] + held["sr"]
    # the conditioning uses a stage's text layers only (jit drops the rest from its inputs), all of them resident
    condition = programs["sr text conditioning"]
    assert condition["arguments"] < held["sr"]
    assert condition["peak"] >= condition["temporaries"] + held["t5"] + held["base"] + held["sr"]
    assert r["peak_bytes_per_device"] == max(p["peak"] for p in programs.values())
    assert r["peak_program"] in programs
    for stage in r["stages"]:
        assert stage["roofline_stage_s"] > stage["steps"] * stage["roofline_step_s"] > 0

    # the step loop's FLOPs are one step's: one model call on the doubled batch (the update has no matmuls)
    mesh = mesh_lib.make_mesh(sr.mesh, jax.devices()[:1])
    model = stage_model(sr, 32, mesh)
    text = jax.ShapeDtypeStruct((16, 77, 32), jnp.bfloat16)
    context = jax.eval_shape(
        lambda p, t, m: sampler_lib._condition(p, t, m, denoiser=model.denoiser, guided=False),
        model.abstract_params, text, jax.ShapeDtypeStruct((16, 77), jnp.bool_),
    )  # fmt: skip
    x, t = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.float32)
    lowres = {"lowres": x, "lowres_t": t}
    call = jax.make_jaxpr(lambda p, x, t, c, k: model.denoiser.denoise(p, x, t, c, **k))
    assert r["stages"][1]["step_flops_counted"] == matmul_flops(call(model.abstract_params, x, t, context, lowres))
    report = format_sampling_report(r)
    assert "peak per device" in report and "one device holding everything" not in report

    # one chip holding everything: each weight whole, and the report says what the figure stands for
    one = plan_sampling([base], ["base"], "v5p-2", t5, batch_size=3)
    assert one["devices"] == 1 and one["rows"] == 3 and one["resident_bytes_per_device"]["base"] > held["base"]
    assert one["resident_bytes_per_device"]["base"] == one["stages"][0]["unet_params"] * 4  # float32, whole
    assert "one device holding everything" in format_sampling_report(one)


@pytest.mark.slow  # one TPU compile, ~2 min on 2 cores
def test_plan_compiles_the_train_step_of_an_if_super_resolution_stage():
    """An IF SR stage's train step (the image downsampled, upscaled as IF's pipeline does and noise-augmented
    inside the step) plans like the project's own stages."""
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[plan]"')
    from imagen_jax.train.plan import plan

    _, sr, t5 = _tiny_if_cascade()
    sr.train.batch_size, sr.mesh.fsdp, sr.mesh.data = 8, -1, 1
    r = plan(sr, "v4-8", t5)
    assert r["compiled"] and r["fits"] and r["mesh"]["fsdp"] == 4
    assert r["per_device_bytes"]["batch"] > 0 and r["flops_per_step_counted"] > 0
