"""Workdirs on object stores (gs://): everything a run writes goes through URL-aware I/O.

No bucket is reachable here, so TensorFlow's in-memory `ram://` filesystem stands in for gs:// where the code
path is tf.io.gfile (event files, config.json, sample grids). Orbax reaches gs:// through etils.epath, whose
gs backend is tf.io.gfile when TensorFlow is installed; only its directory naming is checked here.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imagen_jax import images as images_lib
from imagen_jax.stage.checkpoint import checkpoint_dir
from imagen_jax.train.metrics import MetricWriter
from tests.test_train import assets, tiny_config  # noqa: F401  (the module's shards and tiny T5)


def test_event_files_go_to_a_url_workdir():
    writer = MetricWriter("ram://bucket/run")
    writer.scalars(3, {"loss": 0.5})
    writer.image(3, "samples", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    (events,) = tf.io.gfile.glob("ram://bucket/run/tensorboard/events.out.tfevents.*")
    tags = {
        (e.step, v.tag)
        for r in tf.data.TFRecordDataset(events).as_numpy_iterator()
        for e in [tf.compat.v1.Event.FromString(r)]
        for v in e.summary.value
    }
    assert tags == {(3, "loss"), (3, "samples")}


def test_sample_grids_and_config_write_to_a_url():
    images_lib.save_png(np.full((4, 6, 3), 200, np.uint8), "ram://bucket/run/samples/step_0000001.png")
    with tf.io.gfile.GFile("ram://bucket/run/samples/step_0000001.png", "rb") as f:
        assert Image.open(f).size == (6, 4)
    assert not tf.io.gfile.glob("ram://bucket/run/samples/*.tmp-*")  # Written under a temporary name, renamed.
    with tf.io.gfile.GFile("ram://bucket/run/config.json", "w") as f:
        json.dump({"seed": 0}, f)
    assert tf.io.gfile.exists("ram://bucket/run/config.json")


def test_checkpoint_directory_of_a_bucket_stays_a_url(tmp_path):
    assert checkpoint_dir("gs://bucket/runs/base64") == "gs://bucket/runs/base64/checkpoints"
    assert checkpoint_dir("gs://bucket/runs/base64/") == "gs://bucket/runs/base64/checkpoints"
    assert checkpoint_dir(str(tmp_path)) == str(tmp_path / "checkpoints")


@pytest.mark.slow
def test_a_url_workdir_trains_resumes_and_samples(assets, tmp_path, monkeypatch, capsys):
    """train -> resume -> sample with `--workdir` a URL: config.json, event files and sample grids live in the
    stand-in bucket (ram://); the orbax checkpoints, which reach gs:// through tensorstore, go to a local
    folder that stands in for `<workdir>/checkpoints`, so the loop's own handling of a URL workdir is what runs."""
    from imagen_jax.sample_files import sample_to_folder
    from imagen_jax.stage import checkpoint as checkpoint_lib
    from imagen_jax.stage import stage as stage_lib
    from imagen_jax.train.loop import run

    workdir = f"ram://bucket/{tmp_path.name}/run"
    real = checkpoint_lib.checkpoint_dir

    def stand_in(path: str) -> str:
        return str(tmp_path / "bucket_checkpoints") if path == workdir else real(path)

    monkeypatch.setattr(checkpoint_lib, "checkpoint_dir", stand_in)
    monkeypatch.setattr(stage_lib, "checkpoint_dir", stand_in)

    config = tiny_config(assets, num_steps=2, checkpoint_every=2, log_every=1, sample_every=2)
    run(config, workdir)
    config.train.num_steps = 3
    run(config, workdir)
    assert "resumed from checkpoint at step 2" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "bucket_checkpoints")) == ["2", "3"]
    with tf.io.gfile.GFile(f"{workdir}/config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 3
    assert tf.io.gfile.exists(f"{workdir}/samples/step_0000002.png") and tf.io.gfile.exists(
        f"{workdir}/samples/step_0000003.png"
    )
    assert len(tf.io.gfile.glob(f"{workdir}/tensorboard/events.out.tfevents.*")) == 2  # one per run

    names = sample_to_folder(
        [workdir],
        ["a red circle on the left"],
        out=str(tmp_path / "samples"),
        num_images=1,
        seed=0,
        steps=[2],
        guidance_scales=[1.0],
        batch_size=1,
    )
    with open(tmp_path / "samples" / "samples.json") as f:
        assert json.load(f)["images"][names[0]]["stages"][0]["checkpoint_step"] == 3
