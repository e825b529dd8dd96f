"""Gradient accumulation: a step over the batch in k micro-batches (a compiled loop) gives the loss and updated
parameters of one pass over the whole batch, for the base and the SR stage (float32)."""

import jax
import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import setup as setup_lib
from tests.jaxprs import equations

TEXT_DIM = 16


def _step(kind: str, microbatches: int):
    c = config_lib.load_config_file("configs/demo.py" if kind == "base" else "configs/demo_sr.py")
    c.model.dim, c.model.head_dim, c.data.image_size, c.data.precomputed_text = 16, 8, 8, True
    if kind == "base":
        c.model.channel_mults, c.model.attn_resolutions = (1, 2), (4,)
    else:
        c.model.lowres_size = 4
    c.train.batch_size, c.train.microbatches, c.train.warmup_steps, c.train.learning_rate = 8, microbatches, 0, 1e-3
    mesh = mesh_lib.make_mesh(c.mesh)
    trainer = setup_lib.setup(c, mesh, setup_lib.Text(None, {}, {}, TEXT_DIM, "precomputed"))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
        "text": rng.normal(size=(8, 6, TEXT_DIM)).astype(np.float32),
        "mask": np.array([[True] * 6, [True] * 2 + [False] * 4] * 4),
    }
    state, metrics = trainer.train_step(
        trainer.init_state(), {}, mesh_lib.global_batch(batch, mesh), trainer.no_streak()
    )
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow  # four train-step compiles: ~1 min each kind
@pytest.mark.parametrize("kind", ["base", "sr"])
def test_four_microbatches_make_the_update_of_one_batch(kind):
    whole, whole_metrics = _step(kind, 1)
    parts, parts_metrics = _step(kind, 4)
    np.testing.assert_allclose(parts_metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(parts_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), parts["params"], whole["params"])
    assert float(whole_metrics["loss"]) > 0 and float(whole_metrics["grad_norm"]) > 0


def _avals(jaxpr) -> list:
    """(primitive name, input avals) of every equation, nested ones included."""
    return [(eqn.primitive.name, [v.aval for v in eqn.invars if hasattr(v, "aval")]) for eqn in equations(jaxpr)]


@pytest.mark.slow  # traces a train step with a tiny T5: ~15 s
def test_t5_encodes_the_batch_once_before_the_microbatch_loop(tmp_path):
    """The frozen T5 runs once per step on the whole batch (its weights gathered once), not once per micro-batch
    (issue 29, point 1): the loop takes the embeddings [k, B/k, L, D], never the token ids [k, B/k, L]."""
    from imagen_jax.data import demo
    from imagen_jax.text.tiny import make_tiny_t5

    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    c = config_lib.load_config_file("configs/demo.py")
    c.model.dim, c.model.head_dim, c.data.image_size = 16, 8, 8
    c.model.channel_mults, c.model.attn_resolutions = (1, 2), (4,)
    c.text.encoder, c.text.max_length = str(tmp_path / "t5"), 6
    c.train.batch_size, c.train.microbatches = 8, 4
    mesh = mesh_lib.make_mesh(c.mesh)
    text = setup_lib.load_text(c, mesh)
    trainer = setup_lib.setup(c, mesh, text)
    batch = {
        "image": np.zeros((8, 8, 8, 3), np.uint8),
        "ids": np.zeros((8, 6), np.int32),
        "mask": np.ones((8, 6), bool),
    }
    traced = trainer.train_step.trace(
        trainer.abstract_state(), text.params, mesh_lib.global_batch(batch, mesh), trainer.no_streak()
    )
    (scan,) = [avals for name, avals in _avals(traced.jaxpr.jaxpr) if name == "scan"]
    shapes = {(a.shape, str(a.dtype)) for a in scan}
    assert ((4, 2, 6, 16), "float32") in shapes or ((4, 2, 6, 16), "bfloat16") in shapes, shapes
    assert ((4, 2, 6), "int32") not in shapes, shapes
