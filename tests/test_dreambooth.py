"""DreamBooth (tools/dreambooth.py): per-example loss weights, the instance folder's checks, the class-image cache,
and the whole command on a tiny base stage, a tiny SR cascade and a tiny DeepFloyd IF stage."""

import contextlib
import io
import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import demo
from imagen_jax.diffusion import diffusion_loss
from imagen_jax.errors import DataError
from imagen_jax.text.tiny import make_tiny_t5
from imagen_jax.tools import dreambooth

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
BASE, SR = os.path.join(LEGACY, "base_export"), os.path.join(LEGACY, "sr_export")  # 8px base, 8->16 SR, T5 width 16


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("t5") / "t5")
    return make_tiny_t5(folder, demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)


def _export_copy(source: str, root) -> str:
    """A copy of a legacy fixture export (written before today's config fields: init_from completes its config)."""
    folder = os.path.join(root, os.path.basename(source))
    shutil.copytree(source, folder)
    return folder


def _instance_folder(root, count: int = 4) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        Image.fromarray(demo.render("red", "square", "middle", 20, rng)).save(os.path.join(root, f"{i}.png"))
    return str(root)


def test_example_weights_of_one_are_the_plain_loss_and_zero_weights_drop_examples():
    """weights=1 gives the unweighted mean (to float rounding); weights (2, 2, 0, 0) give exactly the gradient of
    the plain loss on the first half alone (per-example keys: each example draws the same noise in both)."""
    x0 = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    text, mask = jnp.ones((4, 2, 5)), jnp.ones((4, 2), bool)
    keys = jax.random.split(jax.random.key(1), 4)

    def apply_fn(w, x_t, t, text, text_mask, drop_text):
        return x_t * w[0] + t[:, None, None, None] * w[1]

    def loss(w, n, weights=None):
        return diffusion_loss(apply_fn, w, x0[:n], text[:n], mask[:n], keys[:n], weights=weights)[0]

    w = jnp.array([0.3, -0.7])
    np.testing.assert_allclose(loss(w, 4, jnp.ones(4)), loss(w, 4), rtol=1e-6)
    weighted = jax.grad(loss)(w, 4, jnp.array([2.0, 2.0, 0.0, 0.0]))
    np.testing.assert_allclose(weighted, jax.grad(loss)(w, 2), rtol=1e-6)
    assert not np.allclose(jax.grad(loss)(w, 4), weighted)  # the class half does move the plain loss


def test_a_bad_instance_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        dreambooth.instance_images(str(tmp_path / "none"), 8)
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")  # hidden files are skipped
    with pytest.raises(DataError, match="holds 0 files; DreamBooth takes 1 to 100 images"):
        dreambooth.instance_images(str(tmp_path / "empty"), 8)
    folder = _instance_folder(tmp_path / "images", 2)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"instance image '.*notes.txt' is not an image PIL can read"):
        dreambooth.instance_images(folder, 8)
    os.remove(tmp_path / "images" / "notes.txt")
    Image.new("RGBA", (30, 10), (0, 0, 0, 0)).save(tmp_path / "images" / "wide.png")  # transparent, 3:1
    warnings = []
    images = dreambooth.instance_images(folder, 8, warn=warnings.append)
    assert [i.shape for i in images] == [(8, 8, 3)] * 3 and (images[-1] == 255).all() and not warnings  # on white
    os.remove(tmp_path / "images" / "wide.png")
    dreambooth.instance_images(folder, 8, warn=warnings.append)
    assert warnings == ["warning: 2 instance images; DreamBooth's paper fine-tunes on 3 to 20"]


def test_the_class_stream_resumes_at_its_own_position_and_rings_read_back_as_rings():
    """A checkpoint's data item keeps both streams' positions; one saved without a class stream starts it afresh.
    The demo's new shape (a ring) reads back as a ring among all shapes, and the old shapes as themselves."""
    from imagen_jax.data.pipeline import Position
    from imagen_jax.data.resume import gather_positions, prior_start_position, start_position

    item = gather_positions(Position(1, 5), Position(3, 2))
    assert start_position(item, 0, 1)[0] == Position(1, 5) and prior_start_position(item, 0, 1)[0] == Position(3, 2)
    assert prior_start_position(gather_positions(Position(1, 5)), 0, 1) == (
        Position(0, 0),
        "prior data: the checkpoint holds no class-image position; starting at epoch 0",
    )
    rng, every = np.random.default_rng(0), demo.SHAPES + demo.NEW_SHAPES
    for shape in every:
        for position in ("left", "middle"):
            assert demo.classify_shape(demo.render("green", shape, position, 16, rng), every) == shape


class _Cascade:
    """Stands in for a loaded `Imagen`: image i of a batch is flat grey at seed i / 10 - 0.5; records the seeds."""

    def __init__(self, seeds: list):
        from imagen_jax.stage.config import base_config

        self.stages, self.seeds = [SimpleNamespace(config=base_config())], seeds

    def __call__(self, prompts, seeds, **settings):
        self.seeds.append(list(seeds))
        return [np.stack([np.full((8, 8, 3), s / 10 - 0.5, np.float32) for s in seeds])]


def test_class_images_resume_and_refuse_another_prompt(tmp_path, monkeypatch):
    """A run killed after its first batch (2 images): the next samples only the third (its seed) and leaves the
    first two untouched; with every image there no model loads; a cache of another prompt is refused in one line."""
    from imagen_jax.cascade import Imagen

    seeds = []
    monkeypatch.setattr(Imagen, "load", classmethod(lambda cls, stages, **kwargs: _Cascade(seeds)))

    def killed(line: str) -> None:
        if line.startswith("class images: 2 of 3"):
            raise KeyboardInterrupt

    folder, settings = str(tmp_path / "class"), dict(steps=[2], guidance_scales=[1.0], seed=3, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        dreambooth.class_images(folder, [BASE], "a shape", 3, log=killed, **settings)
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "manifest.json"] and seeds == [[3, 4]]
    before = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in ("00000.png", "00001.png")}
    images = dreambooth.class_images(folder, [BASE], "a shape", 3, log=lambda line: None, **settings)
    assert seeds == [[3, 4], [5]]
    assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in before} == before
    assert [int(i[0, 0, 0]) for i in images] == [np.round((s / 10 + 0.5) * 127.5) for s in (3, 4, 5)]
    monkeypatch.setattr(Imagen, "load", None)  # all cached: nothing may load
    assert len(dreambooth.class_images(folder, [BASE], "a shape", 3, **settings)) == 3
    with pytest.raises(DataError, match=r"manifest.json holds class images made with class_prompt='a shape', not 'a'"):
        dreambooth.class_images(folder, [BASE], "a", 3, **settings)
    with pytest.raises(DataError, match=r"made with seed=3, not 0"):
        dreambooth.class_images(folder, [BASE], "a shape", 3, **{**settings, "seed": 0})


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert dreambooth.main(argv) == 0
    return out.getvalue()


TINY_TRAIN = [
    "--config.train.compute_dtype=float32",
    "--config.text.dtype=float32",
    "--config.train.learning_rate=1e-3",
    "--config.train.log_every=1",
    "--config.train.sample_every=0",
]


@pytest.mark.slow  # the base stage trained 2 steps then resumed to 3, the SR stage 1 step: ~60 s
def test_dreambooth_trains_base_and_sr_stages_and_resumes(tmp_path, t5):
    """The command end to end on the tiny base export: class images sampled once, the batches mixed from both
    streams (each resumed at its saved position on a rerun), weights moved from the first step. The tiny
    Efficient U-Net SR export trains on its instance images alone (--num_class_images 0), its low-res input made by
    downsampling them."""
    from imagen_jax.stage.model import local_mesh
    from imagen_jax.stage.stage import Stage

    instance = _instance_folder(tmp_path / "instance")
    base, sr = _export_copy(BASE, tmp_path), _export_copy(SR, tmp_path)
    argv = [
        *("--instance_images", instance, "--instance_prompt", "a sks shape", "--class_prompt", "a shape"),
        *("--text_encoder", t5, "--class_steps", "2", "--dtype", "float32", *TINY_TRAIN),
    ]
    out = str(tmp_path / "base")
    log = _run([*argv, "--init_from", base, "--workdir", out, "--num_class_images", "4", "--config.train.num_steps=2"])
    assert "sampling 4 of 4 class images" in log and "prior data: starting at epoch 0" in log
    assert f"initialised a new train state from {base}" in log
    assert np.asarray(Image.open(os.path.join(out, "class_images", "00003.png"))).shape == (8, 8, 3)
    config = json.load(open(os.path.join(out, "train", "config.json")))
    assert config["data"]["prior_shards"].endswith("class_data/00000.tfrecord")
    assert config["train"]["sample_prompts"] == ["a sks shape", "a shape"]
    log = _run([*argv, "--init_from", base, "--workdir", out, "--num_class_images", "4", "--config.train.num_steps=3"])
    assert "sampling" not in log and "resumed from checkpoint at step 2" in log
    assert "prior data: resuming at epoch" in log  # the class stream's own saved position
    mesh = local_mesh()
    tuned = Stage.load(os.path.join(out, "train"), text_dim=16, mesh=mesh)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), Stage.load(base, text_dim=16, mesh=mesh).params,
                         tuned.params)  # fmt: skip
    assert tuned.step == 3 and max(jax.tree.leaves(moved)) > 0

    out = str(tmp_path / "sr")
    log = _run([*argv, "--init_from", sr, "--workdir", out, "--num_class_images", "0", "--config.train.num_steps=1"])
    assert "prior data" not in log and "finished at step 1" in log
    assert json.load(open(os.path.join(out, "train", "config.json")))["model"]["kind"] == "efficient_unet"


@pytest.mark.slow  # samples 2 class images through the tiny IF cascade, trains stage II 2 steps: ~60 s
def test_dreambooth_fine_tunes_an_if_sr_stage(tmp_path):
    """init_from = a DeepFloyd IF stage II folder after --base_stages IF stage I: the class images are the IF
    cascade's output at stage II's size, and the run adopts stage II's model (if_unet, an SR stage) and trains it."""
    from tests.if_helpers import if_pipeline_folders

    stage1, stage2 = if_pipeline_folders(tmp_path / "if")
    out = str(tmp_path / "out")
    argv = [
        *("--instance_images", _instance_folder(tmp_path / "instance"), "--workdir", out, "--init_from", stage2),
        *("--base_stages", stage1, "--instance_prompt", "a sks shape", "--class_prompt", "a shape"),
        *("--num_class_images", "2", "--class_steps", "3", "3", "--dtype", "float32", "--config.train.num_steps=2"),
        *TINY_TRAIN,
    ]
    log = _run(argv)
    assert "sampling 2 of 2 class images" in log and f"initialised a new train state from {stage2}" in log
    config = json.load(open(os.path.join(out, "train", "config.json")))
    size = config["data"]["image_size"]
    assert np.asarray(Image.open(os.path.join(out, "class_images", "00001.png"))).shape == (size, size, 3)
    assert config["model"]["kind"] == "if_unet" and config["model"]["lowres_size"]
    assert os.path.isdir(os.path.join(out, "train", "checkpoints", "2"))
