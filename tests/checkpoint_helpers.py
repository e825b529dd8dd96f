"""Reading a training workdir's newest checkpoint back in the test process, whatever mesh wrote it."""

from __future__ import annotations

import jax

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage.checkpoint import Checkpointer
from imagen_jax.stage.model import stage_model
from imagen_jax.train import optimizer as optimizer_lib
from imagen_jax.train import state as state_lib


def latest_checkpoint(workdir, text_dim: int = 16) -> tuple[int, dict, dict]:
    """(step, train state as numpy, data item) of the newest checkpoint, restored onto this process's mesh."""
    checkpointer = Checkpointer(str(workdir), every=1, keep=1, read_only=True)
    step = checkpointer.latest_step()
    config = checkpointer.restore_config(step)
    mesh = mesh_lib.make_mesh(config.mesh)
    tx = optimizer_lib.make_optimizer(config.train)
    shardings = state_lib.state_shardings(config, stage_model(config, text_dim, mesh), tx, mesh)
    state, data = checkpointer.restore(step, state_lib.abstract_state(config, text_dim, tx, shardings))
    return step, jax.device_get(state), data
