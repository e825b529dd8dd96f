"""Sharding: logical names -> mesh axes, and training on 8 (fake CPU) devices equals training on one."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagen_jax.data import demo
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text.tiny import make_tiny_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMesh:
    shape = {"data": 2, "fsdp": 4, "tensor": 1}


def _rules(table, replicate_below=0):
    import ml_collections

    return mesh_lib.param_rules(ml_collections.ConfigDict({"rules": table, "replicate_below": replicate_below}))


def test_spec_for_maps_names_and_replicates_what_does_not_divide():
    rules = _rules((("channels_out", "fsdp"), ("channels_in", "fsdp"), ("conv_h", None)))
    assert mesh_lib.spec_for(
        ("conv_h", "conv_w", "channels_in", "channels_out"), (3, 3, 64, 128), FakeMesh, rules
    ) == P(None, None, "fsdp", None)
    assert mesh_lib.spec_for(("channels_in", "channels_out"), (6, 128), FakeMesh, rules) == P(None, "fsdp")
    assert mesh_lib.spec_for(("channels_out",), (6,), FakeMesh, rules) == P(None)
    assert mesh_lib.spec_for(None, (6,), FakeMesh, rules) == P()


class TensorMesh:
    shape = {"data": 1, "fsdp": 4, "tensor": 2}


def test_the_default_rules_give_megatron_pairs_and_keep_small_parameters_whole():
    """Stored: every kernel over fsdp x tensor, the inner width always on tensor (column-parallel kernels take fsdp
    on their input instead); parameters under mesh.replicate_below elements whole."""
    from imagen_jax.stage.config import base_config

    rules = mesh_lib.param_rules(base_config().mesh)
    spec = lambda names, shape: mesh_lib.spec_for(names, shape, TensorMesh, rules)  # noqa: E731
    plain = ("conv_h", "conv_w", "channels_in", "channels_out")
    assert spec(plain, (3, 3, 256, 512)) == P(None, None, "tensor", "fsdp")
    assert spec(("conv_h", "conv_w", "channels_in", "inner"), (3, 3, 256, 512)) == P(None, None, "fsdp", "tensor")
    assert spec(("conv_h", "conv_w", "inner", "channels_out"), (3, 3, 512, 512)) == P(None, None, "tensor", "fsdp")
    assert spec(("inner", "channels_out"), (1024, 256)) == P("tensor", "fsdp")
    assert spec(("channels_in", "channels_out"), (32_768, 3)) == P("tensor", None)  # 3 does not split over fsdp
    assert spec(("channels_out",), (512,)) == P()  # 512 < 65,536 elements: not 128 per chip
    assert spec(plain, (3, 3, 64, 64)) == P()  # 36,864
    assert rules.replicate_below == 65_536
    small = _rules(base_config().mesh.rules, replicate_below=0)
    assert mesh_lib.spec_for(("channels_out",), (512,), TensorMesh, small) == P("fsdp")
    assert mesh_lib.spec_for(("inner",), (512,), TensorMesh, small) == P("tensor")


def test_bad_rules_and_mesh_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        _rules((("channels_out", "model"),))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        _rules((("channels_in", ("tensor", "model")),))
    with pytest.raises(ValueError, match=r"^mesh.replicate_below must be an integer >= 0 \(elements\), got -1$"):
        _rules((), replicate_below=-1)
    import ml_collections

    cfg = ml_collections.ConfigDict({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.make_mesh(cfg)
    cfg = ml_collections.ConfigDict({"data": 3, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="need 3 devices, have 1"):
        mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])


def _mesh_of_processes(processes: list[list[list[int]]]):
    """A mesh stand-in whose devices [data, fsdp, tensor] belong to the given processes."""
    devices = np.vectorize(lambda p: types.SimpleNamespace(process_index=p), otypes=[object])(np.array(processes))
    return types.SimpleNamespace(devices=devices, shape=dict(zip(mesh_lib.AXES, devices.shape)))


def test_a_tensor_group_spanning_processes_is_refused():
    """Each process loads its own examples into its devices' batch shards: a shard whose tensor group spans two
    processes would be fed two batches, which jax assembles without an error (issue 29, point 4)."""
    from imagen_jax.errors import ConfigError
    from imagen_jax.train.setup import check_batch_split

    config = ml_collections.ConfigDict({"train": {"batch_size": 8, "microbatches": 1}})
    check_batch_split(config, _mesh_of_processes([[[0, 0], [1, 1]]]))  # fsdp over processes, tensor within
    with pytest.raises(ConfigError) as e:
        check_batch_split(config, _mesh_of_processes([[[0, 1], [0, 1]]]))
    assert str(e.value) == (
        "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}: the 2 devices of a batch shard (its tensor group) span processes "
        "[0, 1], which each load their own examples; keep config.mesh.tensor within one process's 2 devices"
    )


def test_adafactor_state_gets_shardings_that_fit_its_factored_moments():
    """Adafactor keeps rank-reduced row/column statistics: their shardings cannot be their parameters'."""
    from imagen_jax import config as config_lib
    from imagen_jax.stage.model import stage_model
    from imagen_jax.train import optimizer as optimizer_lib
    from imagen_jax.train import state as state_lib

    c = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    c.model.dim, c.model.channel_mults, c.model.attn_resolutions, c.model.head_dim = 16, (1, 2), (4,), 8
    c.data.image_size, c.train.optimizer = 8, "adafactor"
    mesh = mesh_lib.make_mesh(c.mesh)
    tx = optimizer_lib.make_optimizer(c.train)
    shardings = state_lib.state_shardings(c, stage_model(c, 16, mesh), tx, mesh)
    abstract = state_lib.abstract_state(c, 16, tx, shardings)  # Raised for every factored moment before.
    state = state_lib.init_state(c, 16, tx, shardings)
    ranks = {len(leaf.shape) for leaf in jax.tree.leaves(state["opt_state"])}
    assert {1, 2, 4} <= ranks  # Factored statistics (rank-reduced) next to full-shape ones (kernels).
    for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert leaf.shape == target.shape and len(leaf.sharding.spec) <= leaf.ndim


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from imagen_jax import config as config_lib
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.model import stage_model
    from imagen_jax.train import state as state_lib
    from imagen_jax.train.loop import run

    assets, workdir, data, fsdp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    c = config_lib.load_config_file("configs/demo.py")
    c.data.train_shards, c.text.encoder = assets + "/data/*.tfrecord", assets + "/t5"
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
    c.model.attn_resolutions, c.model.head_dim = (4,), 8
    c.train.batch_size, c.train.num_steps, c.train.log_every, c.train.sample_every = 8, 3, 1, 0
    c.train.warmup_steps = 0  # the demo's warm-up starts at learning rate 0: steps that move the weights
    c.mesh.data, c.mesh.fsdp = data, fsdp
    losses = []
    import imagen_jax.train.metrics as metrics
    original = metrics.MetricWriter.scalars
    def record(self, step, values, suffix=""):
        losses.append(values["loss"])
        return original(self, step, values, suffix)
    metrics.MetricWriter.scalars = record
    run(c, workdir)
    spec = stage_model(c, 16, mesh_lib.make_mesh(c.mesh))
    specs = sorted({str(s.spec) for s in jax.tree.leaves(spec.param_shardings)})
    print("RESULT" + json.dumps({"devices": jax.device_count(), "losses": losses, "specs": specs}))
""")


def _train(assets, workdir, devices, data, fsdp):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(assets), str(workdir), str(data), str(fsdp)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.slow  # two training processes (1 and 8 devices): ~90 s
def test_eight_devices_fsdp_train_like_one(tmp_path):
    demo.write_demo_shards(str(tmp_path / "data"), num_examples=64, image_size=8, num_shards=2, seed=0)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    one = _train(tmp_path, tmp_path / "one", devices=1, data=1, fsdp=1)
    eight = _train(tmp_path, tmp_path / "eight", devices=8, data=2, fsdp=4)
    assert one["devices"] == 1 and eight["devices"] == 8
    assert not any("fsdp" in s for s in one["specs"])  # one device: everything replicated
    assert "P(None, None, None, 'fsdp')" in eight["specs"]  # conv kernels split over output channels
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-4)
