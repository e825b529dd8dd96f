"""Workdirs on object stores (gs://): everything a run writes goes through URL-aware I/O.

No bucket is reachable here, so TensorFlow's in-memory `ram://` filesystem stands in for gs:// where the code
path is tf.io.gfile (event files, config.json, sample grids). Orbax reaches gs:// through etils.epath, whose
gs backend is tf.io.gfile when TensorFlow is installed; only its directory naming is checked here.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
from PIL import Image

from imagen_jax import images as images_lib
from imagen_jax.train.checkpoint import checkpoint_dir
from imagen_jax.train.metrics import MetricWriter


def test_event_files_go_to_a_url_workdir():
    writer = MetricWriter("ram://bucket/run")
    writer.scalars(3, {"loss": 0.5})
    writer.image(3, "samples", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    (events,) = tf.io.gfile.glob("ram://bucket/run/tensorboard/events.out.tfevents.*")
    tags = {(e.step, v.tag) for r in tf.data.TFRecordDataset(events).as_numpy_iterator()
            for e in [tf.compat.v1.Event.FromString(r)] for v in e.summary.value}
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
