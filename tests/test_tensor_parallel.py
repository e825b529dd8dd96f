"""Tensor parallelism does the same training step as one device, stores a (fsdp x tensor)-th of the parameters per
device, and splits the work: on 8 fake CPU devices, meshes data x fsdp x tensor = 2x2x2 and 1x4x2 give one
device's loss and updated parameters (float32), with T5 and the U-Net both in the step; so does 2x2x2 with
`train.attention=flash`, whose attention runs per device shard (shard_map; on CPU its chunked form)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from imagen_jax import config as config_lib
    from imagen_jax.data import demo
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.text.tiny import make_tiny_t5
    from imagen_jax.train import setup as setup_lib
    from imagen_jax.train.plan import bytes_per_device

    folder = sys.argv[1]
    make_tiny_t5(folder, demo.all_captions(), d_model=16, num_layers=1, num_heads=4, d_kv=4, d_ff=32)
    c = config_lib.load_config_file("configs/demo.py")
    c.text.encoder, c.text.max_length, c.text.dtype = folder, 8, "float32"
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
    c.model.attn_resolutions, c.model.head_dim = (4,), 4
    c.train.batch_size, c.train.compute_dtype = 8, "float32"
    rng = np.random.default_rng(0)
    local = {
        "image": rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
        "ids": rng.integers(1, 100, (8, 8)).astype(np.int32),
        "mask": np.arange(8)[None, :] < rng.integers(2, 9, (8, 1)),
    }
    results, reference = {}, None
    meshes = {"1": (1, 1, 1), "4x1": (1, 4, 1), "2x2x2": (2, 2, 2), "4x2": (1, 4, 2), "2x2x2 flash": (2, 2, 2)}
    for name, (data, fsdp, tensor) in meshes.items():
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        c.train.attention = "flash" if "flash" in name else "dot_product"  # per-shard attention (CPU: chunked)
        mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[: data * fsdp * tensor])
        text = setup_lib.load_text(c, mesh)
        trainer = setup_lib.setup(c, mesh, text)
        if reference is None:  # one initial state, placed on every mesh
            reference = jax.device_get(trainer.init_state())
        state = jax.device_put(reference, trainer.state_shardings)
        batch = mesh_lib.global_batch(local, mesh)
        streak = trainer.no_streak()
        compiled = trainer.train_step.lower(state, text.params, batch, streak).compile()
        cost = compiled.cost_analysis()
        new_state, metrics = compiled(state, text.params, batch, streak)
        abstract = trainer.abstract_state()
        results[name] = {
            "loss": float(metrics["loss"]),
            "params": jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(new_state["params"])),
            "param_bytes": bytes_per_device(abstract["params"]),
            "kernel_bytes": bytes_per_device([p for p in jax.tree.leaves(abstract["params"]) if p.ndim >= 2]),
            "t5_bytes": bytes_per_device(text.params),
            "flops": float((cost[0] if isinstance(cost, list) else cost)["flops"]),
        }
    print("RESULT" + json.dumps(results))
""")


@pytest.mark.slow  # one process, five meshes, five train-step compiles: ~2.5 min
def test_tensor_parallel_meshes_train_like_one_device(tmp_path):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "t5")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    one = results["1"]
    for name, shards in (("2x2x2", 4), ("4x2", 8), ("2x2x2 flash", 4)):
        mesh = results[name]
        np.testing.assert_allclose(mesh["loss"], one["loss"], rtol=1e-5)
        flat_one, flat_mesh = _flatten(one["params"]), _flatten(mesh["params"])
        assert flat_one.keys() == flat_mesh.keys()
        for path, value in flat_one.items():
            np.testing.assert_allclose(flat_mesh[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
        # kernels are stored split over fsdp x tensor (every width of this model divides by 4 but the RGB ones)
        assert one["kernel_bytes"] / mesh["kernel_bytes"] > 0.9 * shards
        assert one["param_bytes"] / mesh["param_bytes"] > 0.75 * shards
        assert one["t5_bytes"] / mesh["t5_bytes"] > 0.75 * shards
    # the tensor axis divides the work of each example instead of repeating it: the same 4-way batch split with
    # tensor = 2 leaves each device well under the FLOPs it has with tensor = 1
    assert results["4x2"]["flops"] < 0.75 * results["4x1"]["flops"]


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}/{key}"))
        return out
    return {prefix: np.asarray(tree)}
