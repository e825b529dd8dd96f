"""DeepFloyd IF's cascade end to end against diffusers' own pipelines (tests/fixtures/make_if_pipeline_fixtures.py):
the folders as diffusers saves them (fp16 variant weights, a text_encoder/ beside its tokenizer/), the prompts'
T5 states, and both stages' images from the same noise."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from imagen_jax.text import T5Encoder
from tests.if_helpers import PIPELINE, if_pipeline_folders

GOLDEN = dict(np.load(os.path.join(PIPELINE, "golden.npz")))
for _name in ("stage1_noise", "stage2_noise"):  # torch's NCHW draws, as this project's NHWC
    GOLDEN[_name] = np.moveaxis(GOLDEN[_name], -3, -1)
PROMPTS = ["  A Red Circle on the LEFT ", "a blue square at the bottom"]  # as the fixture script encodes them


@pytest.fixture(scope="module")
def if_folders(tmp_path_factory):
    """(stage1, stage2) pipeline folders, stage I's tokenizer completed with the shared spiece.model."""
    return if_pipeline_folders(tmp_path_factory.mktemp("if"))


def test_text_encoder_of_the_pipeline_folder_matches_diffusers(if_folders):
    """text_encoder/ holds fp16-variant weights only and no tokenizer: the encoder reads the variant and takes its
    tokenizer from the sibling tokenizer/; prompts are lower-cased and stripped as diffusers' pipeline does, so
    the states (all 77 positions, padding included) are diffusers' prompt_embeds."""
    encoder = T5Encoder.from_pretrained(os.path.join(if_folders[0], "text_encoder"), lowercase=True)
    text, _ = encoder.encode(PROMPTS, 77)
    np.testing.assert_allclose(np.asarray(text), GOLDEN["prompt_embeds"], atol=2e-5)
    empty, mask = encoder.encode(["", ""], 77)
    np.testing.assert_allclose(np.asarray(empty), GOLDEN["negative_embeds"], atol=2e-5)
    assert mask.sum() == 2  # "" is EOS alone; the other 76 positions still count for IF
    plain = T5Encoder.from_pretrained(os.path.join(if_folders[0], "text_encoder"))
    assert not np.allclose(np.asarray(plain.encode(PROMPTS, 77)[0]), GOLDEN["prompt_embeds"], atol=1e-3)


@pytest.fixture(scope="module")
def cascade(if_folders):
    from imagen_jax.cascade import Imagen

    return Imagen.load(list(if_folders), dtype="float32")


def _step_noise(draws: np.ndarray) -> np.ndarray:
    """diffusers' draws [start, each step but the last] as `sample`'s [steps + 1, ...] (the last one unused)."""
    return np.concatenate([draws, np.zeros_like(draws[:1])])


def test_if_stages_load_with_diffusers_defaults(cascade):
    base, sr = cascade.stages
    assert base.describe() == "if_unet, 16x16" and sr.describe() == "if_unet, 16->32"
    assert (base.config.train.sample_steps, base.config.train.sample_guidance_scale) == (100, 7.0)
    assert (sr.config.train.sample_steps, sr.config.train.sample_guidance_scale) == (50, 4.0)
    assert base.config.diffusion.threshold_max == 1.5 and sr.config.diffusion.threshold_max == 1.0
    assert sr.config.diffusion.sr_noise_level == 0.25


def test_cascade_matches_diffusers_pipelines(cascade):
    """Stage I (3 leading steps, guidance 7, learned variance, thresholding at 1.5) and stage II (16 -> 32: the
    align_corners upscale, noise level 250, 4 steps at guidance 4) from diffusers' own noise give its images."""
    text, mask = cascade.encode(PROMPTS)
    base, sr = cascade.stages
    stage1 = base.sample(text, mask, [0, 1], steps=3, guidance_scale=7.0, noise=_step_noise(GOLDEN["stage1_noise"]))
    np.testing.assert_allclose(stage1, GOLDEN["stage1_images"], atol=1e-4)
    draws = GOLDEN["stage2_noise"]  # start, the upscaled image's augmentation, then the steps'
    stage2 = sr.sample(
        text,
        mask,
        [0, 1],
        steps=4,
        guidance_scale=4.0,
        lowres=stage1,
        noise=_step_noise(np.concatenate([draws[:1], draws[2:]])),
        lowres_noise=draws[1],
    )
    # This random tiny stage II amplifies float32 rounding: a 1e-5 change of its input moves its output by 1.6e-3
    # (and its images from diffusers' own stage I images are within 2e-4), so most pixels agree to 1e-5 and the
    # bound on the worst is the amplified one.
    difference = np.abs(stage2 - GOLDEN["stage2_images"])
    assert np.median(difference) < 1e-5 and difference.max() < 2e-3, (np.median(difference), difference.max())
    assert (np.abs(stage2) < 0.999).mean() > 0.5  # mostly inside the clip range: the comparison has power


def test_if_stages_inpaint_and_edit(cascade):
    """IF stages I and II (learned variance, discrete schedule, the upscaled low-res input) edit like the
    project's own: kept pixels exact at both sizes with RePaint, strength 0 the input, guidance options on."""
    from imagen_jax import images as images_lib

    image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, 8:24, 8:24] = 1.0
    stage1, stage2 = cascade(
        ["a red circle"], [0], steps=[3, 2], guidance_scales=[7.0, 4.0], init_images=image, masks=mask,
        inpaint_resample=2, guidance_intervals=[(-5.0, 5.0), (-np.inf, np.inf)], guidance_rescales=[0.7, 0.0],
    )  # fmt: skip
    kept = mask[0, ..., 0] < 0.5
    np.testing.assert_array_equal(stage2[0][kept], image[0][kept])
    assert np.abs(stage2[0][~kept] - image[0][~kept]).mean() > 0.1
    small, small_mask = images_lib.resize(image, 16), images_lib.resize_mask(mask, 16)
    np.testing.assert_array_equal(stage1[0][small_mask[0, ..., 0] < 0.5], small[0][small_mask[0, ..., 0] < 0.5])
    same = cascade(["a red circle"], [0], steps=[3, 2], guidance_scales=[7.0, 4.0], init_images=image, strengths=[0, 0])
    np.testing.assert_array_equal(same[1], image)


def test_sample_to_folder_takes_if_folders_and_named_steps(if_folders, tmp_path):
    """sample.py's path: the two folders as --workdir/--sr_workdir, IF's fast27 list for stage I, 2 leading steps
    for stage II; the T5 folder given explicitly (a user's own T5, here the same one)."""
    from imagen_jax.sample_args import steps_value
    from imagen_jax.sample_files import sample_to_folder

    steps = [steps_value(v) for v in "fast27, 2".split(",")]
    assert steps == ["fast27", 2]
    written = sample_to_folder(
        list(if_folders),
        ["a red circle"],
        out=str(tmp_path / "out"),
        num_images=1,
        seed=3,
        steps=steps,
        text_encoder=os.path.join(if_folders[0], "text_encoder"),
        dtype="float32",
    )
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(written) == 1 and os.path.exists(tmp_path / "out" / written[0])
    assert [stage["steps"] for stage in record["images"][written[0]]["stages"]] == ["fast27", 2]


def test_init_from_an_if_folder_fine_tunes_its_weights(if_folders):
    """train.init_from = the IF stage II folder (an SR stage, so the low-res path is trained too): the folder's
    model and recipe replace the config's, the state starts at exactly the folder's weights (as sampling loads
    them), and one step of the hybrid loss moves every parameter group but null_text (frozen, weight decay too)."""
    import jax

    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.config import base_config
    from imagen_jax.stage.model import local_mesh
    from imagen_jax.stage.stage import Stage
    from imagen_jax.train import init_from
    from imagen_jax.train import setup as setup_lib

    config = base_config("unet")
    config.text.encoder = os.path.join(if_folders[0], "text_encoder")
    config.train.init_from = if_folders[1]
    config.train.batch_size, config.train.learning_rate, config.train.warmup_steps = 4, 1e-3, 0
    config.train.weight_decay = 0.1  # decoupled decay would shrink null_text too, were it not frozen
    config.train.compute_dtype = config.text.dtype = "float32"
    config.diffusion.variance_loss = "vlb"
    config = init_from.adopt_source(config)
    assert config.model.kind == "if_unet" and config.data.image_size == 32 and config.diffusion.threshold_max == 1.0
    mesh = mesh_lib.make_mesh(config.mesh)
    text = setup_lib.load_text(config, mesh)
    trainer = setup_lib.setup(config, mesh, text)
    state = trainer.init_state(init_from.load_params(config, trainer.model, text.dim, text.encoder))
    loaded = Stage.load(if_folders[1], text_dim=text.dim, mesh=local_mesh(), encoder=text.encoder).params
    before = jax.device_get(state["params"])
    for ours, theirs in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(loaded))):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(jax.device_get(state["ema"]["out_conv"]["kernel"]), before["out_conv"]["kernel"])

    ids, mask = text.encoder.tokenizer(PROMPTS * 2, config.text.max_length)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    batch = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, mesh)
    state, metrics = trainer.train_step(state, text.params, batch, trainer.no_streak())
    assert np.isfinite(float(metrics["loss"])) and float(metrics["vlb"]) > 0
    after = jax.device_get(state["params"])
    for name in ("conv_in", "class_embed", "text_time", "out_conv", "mid"):
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))]
        assert all(moved), name
    np.testing.assert_array_equal(after["null_text"], before["null_text"])  # T5 of "": never trained


def test_a_folder_of_another_architecture_is_a_one_line_error(if_folders, tmp_path):
    from imagen_jax.errors import StageError
    from imagen_jax.stage.stage import stage_config

    folder = tmp_path / "sd"
    shutil.copytree(if_folders[0], folder)
    unet_config = folder / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "act_fn": "silu"}))
    with pytest.raises(StageError) as error:
        stage_config(str(folder))
    assert str(error.value) == f"{unet_config}: act_fn 'silu' is not supported (IF uses 'gelu')"
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(StageError, match="_class_name 'StableDiffusionPipeline' is not a DeepFloyd IF pipeline"):
        stage_config(str(folder))


@pytest.mark.slow  # fine-tunes IF stage I for 4 steps end to end, then samples the workdir: ~60 s
def test_train_from_an_if_folder_then_sample_the_workdir(if_folders, tmp_path):
    """train.py's loop with train.init_from = IF stage I: it starts from the folder's weights (the loop says so),
    trains, checkpoints the IF model (null_text included), and the workdir samples as a stage like any other."""
    from imagen_jax.cascade import Imagen
    from imagen_jax.data import demo
    from imagen_jax.stage.config import base_config
    from imagen_jax.train.loop import run

    demo.write_demo_shards(str(tmp_path / "data"), num_examples=16, image_size=16, num_shards=1, seed=0)
    config = base_config("unet")
    config.data.train_shards = str(tmp_path / "data" / "*.tfrecord")
    config.data.shuffle_buffer = 16
    config.train.init_from = if_folders[0]
    config.train.batch_size, config.train.num_steps, config.train.warmup_steps = 4, 4, 0
    config.train.learning_rate, config.train.checkpoint_every, config.train.log_every = 1e-4, 4, 2
    config.train.sample_every, config.train.compute_dtype, config.text.dtype = 0, "float32", "float32"
    config.diffusion.variance_loss = "vlb"
    workdir = str(tmp_path / "run")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        metrics = run(config, workdir)
    assert f"initialised a new train state from {if_folders[0]}" in log.getvalue()
    assert np.isfinite(metrics["loss"]) and "4" in os.listdir(os.path.join(workdir, "checkpoints"))
    imagen = Imagen.load([workdir], dtype="float32")
    stage = imagen.stages[0]
    assert stage.config.model.kind == "if_unet" and stage.step == 4
    text, mask = imagen.encode(PROMPTS)
    images = stage.sample(text, mask, [0, 1], steps=3, guidance_scale=7.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.slow  # samples the IF stage I folder three times (compare: 2 sides, evaluate: 1): ~100 s
def test_compare_and_evaluate_take_if_folders(if_folders, tmp_path, capsys):
    """tools.compare and tools.evaluate sample IF folders as sample.py does (IF step lists, --text_encoder,
    --dtype): the same folder on both sides gives identical pairs; evaluate scores it against a 16px reference."""
    from PIL import Image

    from imagen_jax.eval.inception_weights import make_random_inception
    from imagen_jax.tools import compare, evaluate, fid_reference

    stage1 = if_folders[0]
    model = ["--steps", "fast27", "--text_encoder", os.path.join(stage1, "text_encoder"), "--dtype", "float32"]
    argv = ["--a", stage1, "--b", stage1, "--prompt", PROMPTS[0], "--num_images", "2", *model]
    assert compare.main([*argv, "--out", str(tmp_path / "page")]) == 0
    a = json.loads((tmp_path / "page" / "a" / "samples.json").read_text())["images"]
    assert len(a) == 2 and all(entry["stages"][0]["steps"] == "fast27" for entry in a.values())
    for name in a:
        pair = [np.asarray(Image.open(tmp_path / "page" / side / name)) for side in "ab"]
        np.testing.assert_array_equal(*pair)
    inception, stats = str(tmp_path / "inception.safetensors"), str(tmp_path / "stats.npz")
    make_random_inception(inception, seed=0)
    real = tmp_path / "real"
    real.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)).save(real / f"{i}.png")
    argv = ["--images", str(real), "--image_size", "16", "--inception", inception, "--out", stats]
    assert fid_reference.main(argv) == 0
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(PROMPTS + ["a green triangle", "a red square"]))
    argv = ["--workdir", stage1, "--captions", str(captions), "--num_images", "4", "--reference", stats]
    argv += ["--inception", inception, "--guidance_scale", "7", "--out", str(tmp_path / "eval"), *model]
    capsys.readouterr()
    assert evaluate.main(argv) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["image_size"] == 16 and results["settings"]["steps"] == ["fast27"]
    assert results["settings"]["text_encoder"].endswith("text_encoder") and results["guidance"]["7"]["fid"] > 0
