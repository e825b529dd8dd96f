"""Checkpoints and exports written before the stage layer (commit 9581baf; tests/fixtures/make_legacy_stages.py)
still load, sample the very images they sampled then, and resume training."""

import json
import os
import shutil

import numpy as np
import pytest

from imagen_jax.stage.model import local_mesh
from imagen_jax.stage.stage import Stage, stage_config

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
MADE = json.load(open(os.path.join(LEGACY, "README.json")))


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(LEGACY, "reference.npz")))


@pytest.mark.parametrize("name", ["base", "base_export", "sr", "sr_export"])
def test_legacy_stage_samples_the_same_images(name, reference):
    stage = Stage.load(os.path.join(LEGACY, name), text_dim=MADE["text_dim"], mesh=local_mesh())
    assert stage.step == 2
    kind = name.split("_")[0]
    x = stage.sample(
        reference["text"],
        reference["mask"],
        MADE["seeds"],
        steps=MADE["steps"],
        guidance_scale=MADE["guidance_scale"],
        lowres=reference["lowres"] if kind == "sr" else None,
    )
    np.testing.assert_allclose(x, reference[kind], rtol=0, atol=1e-5)
    if kind == "sr":  # the noise level is no longer a constant: an old config reads as the 0.2 it sampled with
        assert stage.config.diffusion.sr_noise_level == MADE["sr_noise_level"]
        assert stage.config.model.full_res_first_level is True


@pytest.mark.slow
def test_legacy_checkpoint_resumes_training(tmp_path, capsys):
    from imagen_jax.data import demo
    from imagen_jax.text.tiny import make_tiny_t5
    from imagen_jax.train.loop import run

    workdir = tmp_path / "base"
    shutil.copytree(os.path.join(LEGACY, "base"), workdir)
    demo.write_demo_shards(str(tmp_path / "data"), num_examples=16, image_size=8, num_shards=1, seed=0)
    make_tiny_t5(
        str(tmp_path / "t5"), demo.all_captions(), d_model=MADE["text_dim"], num_layers=1, num_heads=2, d_kv=8, d_ff=32
    )
    config = stage_config(str(workdir))  # as saved then, completed with today's defaults
    config.text.encoder, config.data.train_shards = str(tmp_path / "t5"), str(tmp_path / "data" / "*.tfrecord")
    config.train.num_steps = 3
    metrics = run(config, str(workdir))
    out = capsys.readouterr().out
    assert "resumed from checkpoint at step 2" in out and "step 3:" in out
    assert np.isfinite(metrics["loss"])
