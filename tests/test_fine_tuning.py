"""Fine-tuning (issue 28, points 1-2): train.init_from, train.trainable and LoRA, for every model kind.

Fast tests build train states and files without compiling a train step; the slow ones train a tiny model for two
steps (a train step compiles for ~40 s on this CPU)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax.errors import ConfigError, StageError
from imagen_jax.stage import export as export_lib
from imagen_jax.stage import lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IF_PIPELINE = os.path.join(os.path.dirname(__file__), "fixtures", "if", "pipeline")


def tiny_config(t5: str, **train):
    c = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    c.text.encoder, c.text.max_length, c.data.image_size = t5, 8, 8
    c.model.dim, c.model.channel_mults, c.model.attn_resolutions, c.model.head_dim = 16, (1, 2), (4,), 8
    c.train.batch_size, c.train.learning_rate, c.train.warmup_steps, c.train.weight_decay = 4, 1e-3, 0, 0.1
    c.train.sample_prompts = ()
    for key, value in train.items():
        c.train[key] = value
    return c


@pytest.fixture(scope="module")
def t5_width(tmp_path_factory):
    """A T5 folder with only config.json (width 16): enough for everything that runs no T5."""
    folder = tmp_path_factory.mktemp("t5")
    t5 = {"vocab_size": 32, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    (folder / "config.json").write_text(json.dumps(t5))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from imagen_jax.data import demo
    from imagen_jax.text.tiny import make_tiny_t5

    folder = str(tmp_path_factory.mktemp("tiny_t5") / "t5")
    make_tiny_t5(folder, demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    return folder


def _layout(config, text_dim: int = 16):
    """(model, tx, abstract train state) of `config` on this host's devices."""
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.model import stage_model
    from imagen_jax.train import optimizer as optimizer_lib
    from imagen_jax.train import state as state_lib

    mesh = mesh_lib.make_mesh(config.mesh)
    model = stage_model(config, text_dim, mesh)
    tx = optimizer_lib.make_optimizer(config.train)
    shardings = state_lib.state_shardings(config, model, tx, mesh)
    return model, tx, state_lib.abstract_state(config, text_dim, tx, shardings)


def _nbytes(tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _random_params(model, seed: int = 0) -> dict:
    """Random weights everywhere (a trained model's are not zero: the U-Net's zero-initialised output convolution
    would hide every gradient behind it)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), model.abstract_params)


def test_frozen_parameters_have_no_optimizer_state(t5_width):
    """AdamW keeps two float32 moments per trained parameter: a subset's optimizer state is exactly the frozen
    parameters' 8 bytes each smaller (jax.eval_shape, nothing allocated); LoRA's holds the adapters' alone. A pattern
    that matches nothing is a one-line error naming it."""
    full = _layout(tiny_config(t5_width))[2]
    subset = tiny_config(t5_width, trainable=("cross_attn", "^text_proj/"))
    model, _, state = _layout(subset)
    from imagen_jax.train import trainable

    trained = trainable.trained_paths(subset, model.abstract_params)
    assert trained and all("cross_attn" in p or p.startswith("text_proj/") for p in trained)
    # a full run: every parameter, null_text too (its moments kept as runs saved before subsets existed have them)
    everything = trainable.trained_paths(tiny_config(t5_width), model.abstract_params)
    assert len(everything) == len(lora.named(model.abstract_params))
    sizes = {p: _nbytes(s) for p, s in lora.named(model.abstract_params).items()}
    frozen_bytes = sum(sizes[p] for p in everything - trained)
    assert _nbytes(state["opt_state"]) == _nbytes(full["opt_state"]) - 2 * frozen_bytes
    counters = _nbytes(full["opt_state"]) - 2 * sum(sizes[p] for p in everything)  # Adam's step count, the schedule's
    assert _nbytes(state["opt_state"]) == 2 * sum(sizes[p] for p in trained) + counters
    assert _nbytes(state["params"]) == _nbytes(state["ema"]) == _nbytes(full["params"])

    low_rank = tiny_config(t5_width, lora_rank=2, init_from="base")
    model, _, state = _layout(low_rank)
    adapters = {p: s for p, s in lora.named(state["params"]).items() if p.endswith((lora.DOWN, lora.UP))}
    assert len(adapters) == 2 * len(lora.target_kernels(low_rank, model.abstract_params)) > 0
    assert _nbytes(state["opt_state"]) == 2 * _nbytes(list(adapters.values())) + counters

    for key, value in (("trainable", ("cross_attn", "no_such_layer")), ("lora_targets", ("no_such_kernel",))):
        bad = tiny_config(t5_width, **{key: value, "lora_rank": 2 if key == "lora_targets" else 0})
        with pytest.raises(ConfigError) as error:
            _layout(bad)
        assert str(error.value).startswith(f"config.train.{key}: 'no_such_") and "\n" not in str(error.value)


def test_lora_merges_as_the_layers_it_stands_for():
    """A merged dense kernel W + s A B is x W + s (x A) B; a merged 3x3 convolution kernel is the convolution by W
    plus s times a 3x3 convolution by A followed by a 1x1 convolution by B (the LoRA-conv form). B = 0 merges to W
    bit for bit."""
    rng = np.random.default_rng(0)
    dense = {"kernel": rng.normal(size=(6, 5)), lora.DOWN: rng.normal(size=(6, 2)), lora.UP: rng.normal(size=(2, 5))}
    conv = {"kernel": rng.normal(size=(3, 3, 4, 5)), lora.DOWN: rng.normal(size=(3, 3, 4, 2))}
    conv[lora.UP] = rng.normal(size=(2, 5))
    tree = jax.tree.map(lambda a: a.astype(np.float32), {"q": dense, "conv": conv, "bias": np.ones(3)})
    merged = lora.merge(tree, 0.5)
    assert set(merged["q"]) == {"kernel"} and np.array_equal(merged["bias"], tree["bias"])
    x = rng.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(
        x @ merged["q"]["kernel"], x @ dense["kernel"] + 0.5 * (x @ dense[lora.DOWN]) @ dense[lora.UP], rtol=1e-4
    )

    def conv2d(image, kernel):
        return jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    image = rng.normal(size=(1, 7, 7, 4)).astype(np.float32)
    two_convs = conv2d(conv2d(image, tree["conv"][lora.DOWN]), tree["conv"][lora.UP][None, None])
    np.testing.assert_allclose(
        conv2d(image, merged["conv"]["kernel"]), conv2d(image, tree["conv"]["kernel"]) + 0.5 * two_convs, atol=1e-4
    )
    fresh = {**tree, "q": {**tree["q"], lora.UP: np.zeros((2, 5), np.float32)}}
    assert np.array_equal(lora.merge(fresh, 0.5)["q"]["kernel"], tree["q"]["kernel"])


def _source_workdir(root, config, tx, steps=(1, 2)):
    """A workdir with checkpoints at `steps` as the trainer writes them (random params, EMA and Adam moments), and
    the states it saved."""
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.train import state as state_lib

    abstract = jax.eval_shape(lambda: state_lib.fresh_state(config, 16, tx))
    rng = np.random.default_rng(0)
    workdir = str(root / "source")
    checkpointer = Checkpointer(workdir, every=1, keep=len(steps), async_save=False)
    saved = {}
    for step in steps:
        state = jax.tree.map(
            lambda x: rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else np.zeros(x.shape, x.dtype),
            abstract,
        )
        saved[step] = {**state, "step": np.int32(step)}
        checkpointer.save(step, saved[step], config, {"batches_consumed": step})
    checkpointer.close()
    return workdir, saved


def test_init_from_a_workdir_step_its_ema_or_raw_params(t5_width, tmp_path):
    """train.init_from=WORKDIR:STEP: params and EMA both start at that step's EMA (or, init_from_ema=False, at the
    params a resumed run of the source restores), with a fresh optimizer at step 0. Exports hold one set of EMA
    weights: a step or raw params of one is a one-line error, as is a config whose model differs (naming fields)."""
    from imagen_jax.train import init_from
    from imagen_jax.train import state as state_lib

    config = tiny_config(t5_width)
    model, tx, _ = _layout(config)
    workdir, saved = _source_workdir(tmp_path, config, tx)
    ema_1 = saved[1]["ema"]
    resumed = saved[2]  # what a resumed run of the source restores (tests/test_checkpoint.py: bit for bit)

    shardings = state_lib.state_shardings(config, model, tx, jax.tree.leaves(model.param_shardings)[0].mesh)
    for source, ema, want in ((f"{workdir}:1", True, ema_1), (workdir, False, resumed["params"])):
        config.train.init_from, config.train.init_from_ema = source, ema
        log = []
        params = init_from.load_params(config, model, 16, None, log.append)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), want)
        what = "EMA weights" if ema else "raw training params"
        assert log == [f"init_from: {what} of {workdir} at step {1 if ema else 2}"]
    state = jax.device_get(state_lib.init_state(config, 16, tx, shardings, params))  # one compile: ~10 s here
    assert int(state["step"]) == 0
    for name in ("params", "ema"):
        jax.tree.map(np.testing.assert_array_equal, state[name], resumed["params"])
    assert not any(np.any(x) for x in jax.tree.leaves(state["opt_state"]))  # fresh: zero moments and counts
    assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(resumed["opt_state"])

    export_lib.write_export(str(tmp_path / "export"), config, ema_1, step=1, text_dim=16, source=workdir)
    for source, ema, message in (
        (f"{tmp_path}/export:3", True, f"{tmp_path}/export is an export folder (one set of weights); no step"),
        (f"{tmp_path}/export", False, "config.train.init_from_ema=False needs a training workdir's raw params"),
    ):
        config.train.init_from, config.train.init_from_ema = source, ema
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            init_from.check(config)
    wider = tiny_config(t5_width, init_from=workdir)
    wider.model.dim = 24
    with pytest.raises(
        ConfigError, match=r"holds another model than this config's: model.dim: init_from 16, config 24"
    ):
        init_from.load_params(wider, _layout(wider)[0], 16, None)


def test_adapters_file_names_its_base_and_is_refused_by_another(t5_width, tmp_path):
    """An adapters file applied to its base at scale s equals merging the run's adapters at s; a base with other
    parameter shapes refuses it in one line naming both."""
    from imagen_jax.stage.model import local_mesh, stage_model

    config = tiny_config(t5_width, lora_rank=2, lora_alpha=4.0, init_from="base")
    model = stage_model(config, 16, local_mesh())
    base = jax.device_put(_random_params(model), model.param_shardings)
    run = jax.device_get(lora.add_adapters(config, base, jax.random.key(0)))

    def bump(tree: dict) -> dict:  # lora_up != 0: the adapters do something
        return {k: bump(v) if isinstance(v, dict) else v + 0.01 if k == lora.UP else v for k, v in tree.items()}

    run = bump(run)
    path = str(tmp_path / "adapters.safetensors")
    metadata = lora.write_adapters(path, config, run, base="base", base_params=model.abstract_params, step=7)
    assert metadata["rank"] == "2" and metadata["base_fingerprint"] == lora.fingerprint(base)
    assert os.path.getsize(path) < _nbytes(base) / 4
    applied = jax.device_get(lora.apply_adapters(base, [(path, 0.5)], model.param_shardings, "base"))
    want = lora.merge(run, 0.5 * 4.0 / 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), applied, want)

    other = tiny_config(t5_width)
    other.model.dim = 24
    other_model = stage_model(other, 16, local_mesh())
    # sample.py --lora [STAGE=]FILE[:SCALE]
    import argparse

    from imagen_jax.sample_args import adapter_values, add_adapter_flags

    parser = argparse.ArgumentParser()
    add_adapter_flags(parser)
    args = parser.parse_args(["--lora", path, "--lora", "2=a=b.safetensors:0.5", "--lora", "c:d.safetensors"])
    assert adapter_values(args, 2, parser) == [(0, path, 1.0), (1, "a=b.safetensors", 0.5), (0, "c:d.safetensors", 1.0)]
    with pytest.raises(SystemExit):
        adapter_values(parser.parse_args(["--lora", "3=x.safetensors"]), 2, parser)
    with pytest.raises(StageError, match=r"adapters.safetensors: LoRA adapters for another base \(base, parameters "):
        lora.apply_adapters(_random_params(other_model), [(path, 1.0)], other_model.param_shardings, "other")
    # damaged files: metadata without its rank, and a tensor of the wrong shape, are one-line errors
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata={"format": lora.FORMAT})
    with pytest.raises(StageError, match=r"bare.safetensors: its metadata needs rank \(>= 1\), alpha"):
        lora.read_adapters(str(tmp_path / "bare.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(tmp_path / "bent.safetensors"), metadata=metadata)
    with pytest.raises(StageError, match=rf"bent.safetensors: {name} has shape \(3, 3\), but base's"):
        lora.apply_adapters(base, [(str(tmp_path / "bent.safetensors"), 1.0)], model.param_shardings, "base")


def _train_two_steps(config, trainer, params):
    """The state at step 0 around `params`, and after two steps on one random batch (numpy)."""
    from imagen_jax.parallel import mesh as mesh_lib

    state = trainer.init_state(jax.device_put(params, trainer.model.param_shardings))
    before = jax.device_get(state)
    encoder = trainer.text.encoder
    prompts = ["a red circle on the left", "a"] * (config.train.batch_size // 2)
    ids, mask = encoder.tokenizer(prompts, config.text.max_length)
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (config.train.batch_size, size, size, 3), dtype=np.uint8)
    batch = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, trainer.mesh)
    state, metrics = trainer.train_step(state, encoder.state, batch, trainer.no_streak())
    state, metrics = trainer.train_step(state, encoder.state, batch, metrics["nonfinite_streak"])
    assert int(metrics["nonfinite"]) == 0
    return before, jax.device_get(state)


def _check_frozen(config, before, after):
    """Frozen params and EMA bit for bit as they were; every trained parameter moved. Returns the trained paths."""
    from imagen_jax.train import trainable

    trained = trainable.trained_paths(config, before["params"])
    for name in ("params", "ema"):
        old, new = lora.named(before[name]), lora.named(after[name])
        moved = {p for p in old if not np.array_equal(old[p], new[p])}
        assert moved == set(trained), (name, sorted(moved ^ set(trained))[:5])
    return trained


@pytest.mark.slow  # two train-step compilations of a tiny U-Net: ~60 s
def test_a_subset_and_lora_train_alone(tiny_t5):
    """lr 1e-3 without warm-up, weight decay 0.1, two steps: frozen parameters (and their EMA) stay bit for bit,
    every trained one moves. LoRA: at step 0 the merged weights are the base's exactly, then only adapters move."""
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.train import setup as setup_lib

    subset = tiny_config(tiny_t5, trainable=("cross_attn", "^text_proj/"))
    mesh = mesh_lib.make_mesh(subset.mesh)
    text = setup_lib.load_text(subset, mesh)
    trainer = setup_lib.setup(subset, mesh, text)
    base = _random_params(trainer.model)
    trained = _check_frozen(subset, *_train_two_steps(subset, trainer, base))
    assert "text_proj/kernel" in trained and "out_conv/kernel" not in trained

    low_rank = tiny_config(tiny_t5, lora_rank=2, lora_alpha=2.0, init_from="base")
    low_rank.train.lora_targets = (*lora.DEFAULT_TARGETS, r"res/conv2/kernel$")
    trainer = setup_lib.setup(low_rank, mesh, text)
    before, after = _train_two_steps(low_rank, trainer, base)
    jax.tree.map(np.testing.assert_array_equal, lora.merged(low_rank, before["params"]), base)
    trained = _check_frozen(low_rank, before, after)
    assert trained and all(p.endswith((lora.DOWN, lora.UP)) for p in trained)
    assert "mid/res/conv2/lora_down" in trained


@pytest.mark.slow  # an IF stage I train step with LoRA: ~30 s
def test_an_if_stage_trains_with_lora_and_a_subset(tmp_path):
    """DeepFloyd IF's U-Net (the tiny fixture folder as train.init_from): LoRA on its attention (add_k/add_v
    included) plus its text projection trained whole; null_text and every other base weight stay as loaded."""
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage.config import base_config
    from imagen_jax.train import init_from
    from imagen_jax.train import setup as setup_lib

    folder = tmp_path / "stage1"
    shutil.copytree(os.path.join(IF_PIPELINE, "stage1"), folder)
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "t5", "relu", "spiece.model"), folder / "tokenizer")
    config = base_config("unet")
    config.text.encoder = str(folder / "text_encoder")
    config.train.init_from = str(folder)
    config.train.batch_size, config.train.learning_rate, config.train.warmup_steps = 2, 1e-3, 0
    config.train.weight_decay, config.train.compute_dtype, config.text.dtype = 0.1, "float32", "float32"
    config.train.lora_rank, config.train.trainable = 2, ("^text_proj/",)
    config = init_from.adopt_source(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    text = setup_lib.load_text(config, mesh)
    trainer = setup_lib.setup(config, mesh, text)
    params = init_from.load_params(config, trainer.model, text.dim, text.encoder, log=lambda _: None)
    before, after = _train_two_steps(config, trainer, jax.device_get(params))
    trained = _check_frozen(config, before, after)
    assert {"text_proj/kernel", "mid/cross_attn/add_k/lora_up"} <= set(trained)
    assert not any(p.startswith("null_text") for p in trained)


@pytest.mark.slow  # samples a tiny stage three times: ~40 s
def test_lora_export_merged_samples_as_base_plus_adapters(tiny_t5, tmp_path, monkeypatch):
    """A LoRA run's workdir exports merged full weights (a plain export) or its adapters alone; sampling the merged
    export gives the images of its base with the adapters file applied (sample.py --lora), and the base alone
    differs. An adapters file for another base is refused before any model loads."""
    from imagen_jax.cascade import Imagen
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.tools.export import export_workdir
    from imagen_jax.train import state as state_lib

    base_dir = str(tmp_path / "base")
    config = tiny_config(tiny_t5)
    model, tx, _ = _layout(config)
    export_lib.write_export(base_dir, config, _random_params(model), step=5, text_dim=16, source="random")
    run = tiny_config(tiny_t5, lora_rank=2, lora_alpha=4.0, init_from=base_dir)
    model, tx, _ = _layout(run)
    mesh = jax.tree.leaves(model.param_shardings)[0].mesh
    base_params = export_lib.read_export(base_dir)[1]
    state = jax.device_get(
        state_lib.init_state(run, 16, tx, state_lib.state_shardings(run, model, tx, mesh), base_params)
    )
    rng = np.random.default_rng(1)

    def bump(tree: dict) -> dict:  # trained adapters: lora_up != 0
        return {
            k: bump(v) if isinstance(v, dict) else v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
            if k == lora.UP else v
            for k, v in tree.items()
        }  # fmt: skip

    state["ema"] = bump(state["ema"])
    workdir = str(tmp_path / "run")
    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False)
    checkpointer.save(3, state, run, {"batches_consumed": 3})
    checkpointer.close()

    merged_dir, adapters = str(tmp_path / "merged"), str(tmp_path / "sks.safetensors")
    export_workdir(workdir, merged_dir)
    assert export_lib.read_config(merged_dir).train.lora_rank == 0
    metadata = export_workdir(workdir, adapters, lora_only=True)
    assert metadata["base"] == base_dir and metadata["step"] == "3" and metadata["alpha"] == "4.0"

    def images(folder: str, **kwargs) -> np.ndarray:
        imagen = Imagen.load([folder], dtype="float32", **kwargs)
        text, mask = imagen.encode(["a red circle on the left", "a blue square"])
        return imagen.stages[0].sample(text, mask, [0, 1], steps=4, guidance_scale=3.0)

    merged = images(merged_dir)
    np.testing.assert_allclose(images(base_dir, adapters=[(0, adapters, 1.0)]), merged, atol=1e-4)
    assert np.abs(images(base_dir) - merged).max() > 1e-2  # the adapters change the images
    import sample

    argv = ["--workdir", base_dir, "--lora", f"1={adapters}:0.5", "--prompt", "a red circle", "--num_images", "1"]
    assert sample.main([*argv, "--steps", "2", "--dtype", "float32", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [entry["stages"][0]["lora"] for entry in record["images"].values()] == [[[adapters, 0.5]]]

    other = tiny_config(tiny_t5)
    other.model.channel_mults = (1, 1)
    other_dir = str(tmp_path / "other")
    export_lib.write_export(other_dir, other, _random_params(_layout(other)[0]), step=1, text_dim=16, source="x")
    monkeypatch.setattr("imagen_jax.cascade.T5Encoder.from_pretrained", lambda *a, **k: pytest.fail("T5 loaded"))
    with pytest.raises(StageError, match=r"sks.safetensors: LoRA adapters for another base \(.*base, parameters "):
        Imagen.load([other_dir], adapters=[(0, adapters, 1.0)])


CROSS_MESH = r"""
import sys
import jax
import numpy as np
from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage.checkpoint import Checkpointer
from imagen_jax.stage.lora import named
from imagen_jax.train import init_from
from imagen_jax.train import setup as setup_lib

workdir, mode = sys.argv[1], sys.argv[2]
c = config_lib.load_config_file("configs/demo.py")
c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1, 2)
c.model.attn_resolutions, c.model.head_dim, c.mesh.data, c.mesh.fsdp = (4,), 8, 1, jax.device_count()
mesh = mesh_lib.make_mesh(c.mesh)
trainer = setup_lib.setup(c, mesh, setup_lib.Text(None, {}, {}, 16, "precomputed"))
if mode == "save":
    state = trainer.init_state()
    state["params"] = jax.tree.map(lambda p: p + 0.5, state["params"])
    state["ema"] = jax.tree.map(lambda p: p - 0.5, state["ema"])
    checkpointer = Checkpointer(workdir + "/source", every=1, keep=1, async_save=False)
    checkpointer.save(3, state, c, {"positions": []}, force=True)
    checkpointer.close()
    np.savez(workdir + "/saved.npz", **{k: v for name in ("params", "ema")
             for k, v in named({name: jax.device_get(state[name])}).items()})
else:
    saved = np.load(workdir + "/saved.npz")
    for ema in (True, False):
        c.train.init_from, c.train.init_from_ema = workdir + "/source:3", ema
        params = init_from.load_params(c, trainer.model, 16, None, log=lambda m: None)
        assert {len(p.sharding.device_set) for p in jax.tree.leaves(params)} == {jax.device_count()}
        for path, value in named({"ema" if ema else "params": jax.device_get(params)}).items():
            np.testing.assert_array_equal(value, saved[path])
print("ok", mode, jax.device_count())
"""


@pytest.mark.slow  # three processes that each set up a tiny trainer: ~60 s
def test_init_from_reads_a_workdir_written_on_another_mesh(tmp_path):
    """Saved with 2 devices (fsdp 2), loaded by init_from (EMA and raw params) on 1 device and on 2: every array
    equal to what was saved, placed on all of the loading run's devices."""
    import subprocess
    import sys

    for devices, mode in ((2, "save"), (1, "init"), (2, "init")):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run(
            [sys.executable, "-c", CROSS_MESH, str(tmp_path), mode], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0 and f"ok {mode} {devices}" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow  # train.py's loop twice on a tiny model: ~60 s
def test_the_loop_starts_from_init_from_then_resumes_ignoring_it(tiny_t5, tmp_path, capsys):
    """The loop says where its weights come from and how many parameters train; its first checkpoint holds the
    frozen parameters exactly as the export had them; rerun, it resumes from its own checkpoint and says that
    init_from is ignored."""
    from imagen_jax.data import demo
    from imagen_jax.train.loop import run

    demo.write_demo_shards(str(tmp_path / "data"), num_examples=16, image_size=8, num_shards=1, seed=0)
    config = tiny_config(tiny_t5, trainable=("cross_attn",), num_steps=2, checkpoint_every=2, log_every=1)
    config.data.train_shards, config.data.shuffle_buffer = str(tmp_path / "data" / "*.tfrecord"), 16
    config.train.sample_every, config.train.compute_dtype, config.text.dtype = 0, "float32", "float32"
    model = _layout(config)[0]
    base = _random_params(model)
    export_lib.write_export(str(tmp_path / "base"), config, base, step=5, text_dim=16, source="random")
    config.train.init_from = str(tmp_path / "base")
    workdir = str(tmp_path / "run")
    run(config, workdir)
    out = capsys.readouterr().out
    assert f"init_from: EMA weights of {tmp_path / 'base'} at step 5" in out
    assert "trainable: " in out and "parameters (" in out
    from checkpoint_helpers import latest_checkpoint

    step, state, _ = latest_checkpoint(workdir)
    frozen = {p: v for p, v in lora.named(base).items() if "cross_attn" not in p}
    assert step == 2 and frozen
    for name in ("params", "ema"):
        saved = lora.named(state[name])
        assert all(np.array_equal(saved[p], v) for p, v in frozen.items()), name
    config.train.num_steps = 3
    run(config, workdir)
    out = capsys.readouterr().out
    assert "resumed from checkpoint at step 2" in out
    assert f"train.init_from={str(tmp_path / 'base')!r} ignored: the run resumes from its own checkpoints" in out
