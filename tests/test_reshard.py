"""A checkpoint written on one mesh restores on another: saved with 8 devices (fsdp=8), restored with 2 devices
(fsdp=2) and with 1, every array equal to what was saved (orbax reshards into the target's shardings)."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
import jax
import numpy as np
from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage.checkpoint import Checkpointer
from imagen_jax.train import setup as setup_lib

workdir, fsdp, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = config_lib.load_config_file("configs/demo.py")
c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
c.model.attn_resolutions, c.model.head_dim = (4,), 8
c.mesh.data, c.mesh.fsdp, c.train.optimizer = 1, fsdp, "adafactor"
mesh = mesh_lib.make_mesh(c.mesh)
trainer = setup_lib.setup(c, mesh, setup_lib.Text(None, {}, {}, 16, "precomputed"))
checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False)
if mode == "save":
    state = trainer.init_state()
    state["params"] = jax.tree.map(lambda p: p + 0.5, state["params"])  # not the init: a restore must read it
    checkpointer.save(3, state, c, {"positions": []}, force=True)
    arrays = jax.device_get(state)
else:
    step, arrays, _ = checkpointer.restore_latest(trainer.abstract_state(), c, log=lambda m: None)
    shards = {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(arrays["params"])}
    assert step == 3 and max(shards) == jax.device_count(), (step, shards)
    arrays = jax.device_get(arrays)
checkpointer.close()
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(arrays)}
np.savez(f"{workdir}/{mode}_{jax.device_count()}.npz", **flat)
print("devices", jax.device_count(), "arrays", len(flat))
"""


def _run(workdir, devices, fsdp, mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), str(fsdp), mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(os.path.join(workdir, f"{mode}_{devices}.npz")))


@pytest.mark.slow  # three processes (8, 2 and 1 devices): ~40 s
def test_a_checkpoint_from_8_devices_restores_on_2_and_on_1(tmp_path):
    saved = _run(tmp_path, 8, 8, "save")
    for devices in (2, 1):
        restored = _run(tmp_path, devices, devices, "restore")
        assert restored.keys() == saved.keys() and len(saved) > 20
        for name, array in saved.items():
            np.testing.assert_array_equal(restored[name], array, err_msg=name)
