"""The cascade: stage wiring checks, and a tiny base + SR cascade sampled end to end through sample.py's code."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax import images as images_lib
from imagen_jax.cascade import check_cascade
from imagen_jax.data import demo
from imagen_jax.sample_args import per_stage
from imagen_jax.stage.stage import Stage
from imagen_jax.text.tiny import make_tiny_t5
from tests.processes import run_without_tensorflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_stage(name, image_size, lowres_size=None):
    model = {"kind": "efficient_unet", "lowres_size": lowres_size} if lowres_size else {"kind": "unet"}
    config = ml_collections.ConfigDict({"data": {"image_size": image_size}, "model": model})
    return Stage(config=config, params=None, denoiser=None, step=0, workdir=name, mesh=None)


def test_check_cascade_names_both_stages_on_a_size_mismatch():
    check_cascade([fake_stage("base", 64), fake_stage("sr256", 256, 64), fake_stage("sr1024", 1024, 256)])
    with pytest.raises(ValueError, match=r"stage sr takes 32x32 input, but the stage before it \(base\) makes 64x64"):
        check_cascade([fake_stage("base", 64), fake_stage("sr", 128, 32)])
    with pytest.raises(ValueError, match="first stage \\(sr\\) is a super-resolution stage"):
        check_cascade([fake_stage("sr", 256, 64)])
    with pytest.raises(ValueError, match="stage base2 is a base stage"):
        check_cascade([fake_stage("base", 64), fake_stage("base2", 64)])


def test_per_stage_values():
    assert per_stage("256,64,32", 3, int, "steps") == [256, 64, 32]
    assert per_stage("5", 3, float, "guidance_scale") == [5.0, 5.0, 5.0]
    assert per_stage(None, 2, str, "sampler") is None  # the stages' configs decide
    with pytest.raises(ValueError, match="--steps has 2 values for 3 stages"):
        per_stage("1,2", 3, int, "steps")
    with pytest.raises(ValueError, match="--guidance_scale 'x': each value must be a float"):
        per_stage("x", 1, float, "guidance_scale")


@pytest.mark.slow
def test_tiny_cascade_end_to_end(tmp_path):
    from imagen_jax.sample_files import sample_to_folder
    from imagen_jax.train.loop import run

    demo.write_demo_shards(str(tmp_path / "data"), num_examples=64, image_size=16, num_shards=2, seed=0)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    base = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    base.data.image_size, base.model.dim, base.model.channel_mults = 8, 16, (1, 2)
    base.model.attn_resolutions, base.model.head_dim = (4,), 8
    sr = config_lib.load_config_file(os.path.join(REPO, "configs/demo_sr.py"))
    sr.model.dim, sr.model.head_dim, sr.model.lowres_size = 16, 8, 8
    sr.data.image_size, sr.data.crop_size = 16, 8  # trained on crops, sampled at full size
    for config, name in ((base, "base"), (sr, "sr")):
        config.data.train_shards, config.text.encoder = str(tmp_path / "data" / "*.tfrecord"), str(tmp_path / "t5")
        config.train.batch_size, config.train.num_steps, config.train.checkpoint_every = 4, 2, 2
        config.train.sample_every, config.train.sample_steps = 2, 2
        run(config, str(tmp_path / name))
    assert os.path.exists(tmp_path / "sr" / "samples" / "step_0000002.png")  # low-res | sample | target grid

    out = tmp_path / "out"
    names = sample_to_folder(
        [str(tmp_path / "base"), str(tmp_path / "sr")],
        ["a red circle on the left"],
        out=str(out),
        num_images=2,
        seed=3,
        steps=[3, 2],
        guidance_scales=[2.0, 1.0],
        samplers=["ddim", "dpmpp_2m"],
    )
    index = json.load(open(out / "samples.json"))["images"]
    entry = index[names[0]]
    assert [s["image_size"] for s in entry["stages"]] == [8, 16]
    assert [s["sampler"] for s in entry["stages"]] == ["ddim", "dpmpp_2m"]
    assert entry["stages"][1]["sr_noise_level"] == 0.1  # the SR config's (configs/demo_sr.py)
    assert np.asarray(Image.open(out / names[0])).shape == (16, 16, 3)
    assert np.asarray(Image.open(out / entry["stages"][0]["file"])).shape == (8, 8, 3)

    # Editing through both stages: the right half regenerated, the left kept bit for bit at 16 px (the input's
    # size) and at 8 px (the input resized), with RePaint; then image-to-image at strength 0 returns the input.
    from imagen_jax.sample_files import Edit

    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    edit = Edit(init_image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"), inpaint_resample=2)
    edited = tmp_path / "edited"
    names = sample_to_folder(
        [str(tmp_path / "base"), str(tmp_path / "sr")], ["a blue square"], out=str(edited), num_images=2, seed=1,
        steps=[3, 2], guidance_scales=[2.0, 1.0], samplers=["ddpm", "ddim"], edit=edit,
    )  # fmt: skip
    entry = json.load(open(edited / "samples.json"))["images"][names[0]]
    assert entry["mask"] == str(tmp_path / "mask.png") and entry["inpaint_resample"] == 2
    final = np.asarray(Image.open(edited / names[0]))
    np.testing.assert_array_equal(final[:, :8], image[:, :8])
    assert np.abs(final[:, 8:].astype(int) - image[:, 8:]).mean() > 20  # regenerated, not the random input
    small = images_lib.to_uint8(images_lib.resize(images_lib.from_uint8(image)[None], 8))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(edited / entry["stages"][0]["file"]))[:, :4], small[:, :4])
    names = sample_to_folder(
        [str(tmp_path / "base"), str(tmp_path / "sr")], ["a blue square"], out=str(edited), num_images=1, seed=1,
        steps=[3, 2], guidance_scales=[2.0, 1.0], overwrite=True,
        edit=Edit(init_image=str(tmp_path / "in.png"), strengths=[0.0, 0.0]),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(edited / names[0])), image)
    assert json.load(open(edited / "samples.json"))["images"][names[0]]["stages"][1]["strength"] == 0.0


def test_sample_py_runs_without_tensorflow_on_local_folders(tmp_path):
    """An inference host with JAX only: sample.py from a local export into a local folder, with any import of
    TensorFlow failing, writes its images; a gs:// --out then needs TensorFlow and says so in one line."""
    import shutil

    legacy = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
    export = tmp_path / "base_export"
    shutil.copytree(os.path.join(legacy, "base_export"), export)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    config = json.loads((export / "config.json").read_text())
    config["text"]["encoder"] = str(tmp_path / "t5")
    (export / "config.json").write_text(json.dumps(config))

    def sample(out):
        args = ["sample.py", "--workdir", str(export), "--prompt", "a red circle", "--num_images", "2", "--steps", "2"]
        return run_without_tensorflow([*args, "--out", out])

    proc = sample(str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(index["images"]) == 2 and all((tmp_path / "out" / name).is_file() for name in index["images"])
    proc = sample("gs://bucket/out")
    assert proc.returncode == 2 and "tf.io.gfile, which is not installed" in proc.stderr.strip().splitlines()[-1]
