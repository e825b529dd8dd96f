"""Exports: a trained stage's EMA weights + config as safetensors/JSON, read back bit for bit, written atomically."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from imagen_jax import config as config_lib
from imagen_jax.data import demo
from imagen_jax.errors import OutputError
from imagen_jax.stage import export as export_lib
from imagen_jax.text.tiny import make_tiny_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(root):
    c = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    c.data.train_shards = str(root / "data" / "*.tfrecord")
    c.data.shuffle_buffer = 32
    c.data.image_size = 8
    c.text.encoder = str(root / "t5")
    c.text.max_length = 8
    c.model.dim = 8
    c.model.channel_mults = (1, 2)
    c.model.attn_resolutions = (4,)
    c.model.head_dim = 8
    c.train.sample_prompts = ()
    c.train.batch_size = 4
    c.train.num_steps = 2
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 2
    c.train.log_every = 1
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with checkpoints at steps 1 and 2 written as the trainer writes them (Checkpointer.save of
    the full train state), holding random weights: compiling a real train step takes a minute on this CPU,
    so real training is in the slow end-to-end test below. Returns (workdir, config)."""
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.train import optimizer as optimizer_lib
    from imagen_jax.train import state as state_lib

    root = tmp_path_factory.mktemp("export")
    (root / "t5").mkdir()  # the exporter reads only the T5 width from config.json
    t5 = {"vocab_size": 32, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    (root / "t5" / "config.json").write_text(json.dumps(t5))
    config = tiny_config(root)
    tx = optimizer_lib.make_optimizer(config.train)
    abstract = jax.eval_shape(lambda: state_lib.fresh_state(config, 16, tx))
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else np.zeros(x.shape, x.dtype),
        abstract,
    )
    workdir = str(root / "run")
    checkpointer = Checkpointer(workdir, every=1, keep=2, async_save=False)
    for step in (1, 2):
        ema = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), state["params"])
        checkpointer.save(step, {**state, "step": np.int32(step), "ema": ema}, config, {"batches_consumed": step})
    checkpointer.close()
    return workdir, config


def _checkpoint(workdir, step):
    """(config, EMA params, graphdef) straight from orbax, independently of the exporter."""
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.stage.model import build_model

    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False, read_only=True)
    config = checkpointer.restore_config(step)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, 16)), nnx.Param)
    ema = checkpointer.restore_ema(step, nnx.to_pure_dict(abstract))
    checkpointer.close()
    return config, jax.device_get(ema), graphdef


def _outputs(graphdef, config, *trees):
    """The U-Net's prediction on fixed inputs with each params tree merged into `graphdef`."""
    rng = np.random.default_rng(0)
    size, length = config.data.image_size, config.text.max_length
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    text = rng.normal(size=(2, length, 16)).astype(np.float32)
    mask = np.arange(length)[None, :] < np.array([[3], [length]])
    t = np.array([0.3, 0.8], np.float32)
    apply = jax.jit(lambda params: nnx.merge(graphdef, params)(x, t, text, mask))
    return [np.asarray(apply(tree)) for tree in trees]


def test_export_reads_back_bit_for_bit(trained, tmp_path):
    from imagen_jax.tools.export import export_workdir

    workdir, _ = trained
    out = str(tmp_path / "base")
    written = export_workdir(workdir, out)
    assert export_lib.is_export(out) and not [n for n in os.listdir(tmp_path) if n != "base"]  # no temp left
    config, params, metadata = export_lib.read_export(out)
    saved_config, ema, graphdef = _checkpoint(workdir, 2)

    assert config.to_dict() == saved_config.to_dict()
    assert json.load(open(os.path.join(out, "config.json"))) == config_lib.to_json(saved_config)
    # Same tree, key types included (ints for nnx.List indices): what nnx.merge needs.
    assert jax.tree.structure(params) == jax.tree.structure(ema)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ema)):
        assert got.dtype == np.float32 and got.shape == want.shape, path
        assert got.tobytes() == np.asarray(want).tobytes(), jax.tree_util.keystr(path)
    num_params = sum(x.size for x in jax.tree.leaves(ema))
    assert metadata == written
    assert metadata["step"] == 2 and metadata["text_dim"] == 16 and metadata["num_params"] == num_params
    assert metadata["source"] == os.path.abspath(workdir) and metadata["format_version"] == export_lib.FORMAT_VERSION

    with safe_open(os.path.join(out, "ema.safetensors"), framework="np") as f:
        names = set(f.keys())
    assert "down/0/0/res/conv1/kernel" in names and "input_conv/kernel" in names
    assert len(names) == len(jax.tree.leaves(ema))

    got, want = _outputs(graphdef, config, params, ema)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


def test_export_of_an_earlier_step(trained, tmp_path):
    from imagen_jax.tools.export import export_workdir

    workdir, _ = trained
    export_workdir(workdir, str(tmp_path / "s1"), step=1)
    _, params, metadata = export_lib.read_export(str(tmp_path / "s1"))
    _, ema1, _ = _checkpoint(workdir, 1)
    _, ema2, _ = _checkpoint(workdir, 2)
    assert metadata["step"] == 1
    jax.tree.map(np.testing.assert_array_equal, params, ema1)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema2)))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7 in .*checkpoints \(steps: \[1, 2\]\)"):
        export_workdir(workdir, str(tmp_path / "s7"), step=7)
    with pytest.raises(ValueError, match=r"checkpoints/2: cannot restore the EMA weights .* \(text width 24\)"):
        export_workdir(workdir, str(tmp_path / "d24"), text_dim=24)
    assert not os.path.exists(tmp_path / "s7") and not os.path.exists(tmp_path / "d24")

    t5 = os.path.join(os.path.dirname(workdir), "t5")  # the saved config's text.encoder, moved away for a moment
    os.rename(t5, tmp_path / "t5")
    try:
        with pytest.raises(FileNotFoundError, match=r"T5 config.json not found \(.*pass --text_dim"):
            export_workdir(workdir, str(tmp_path / "no_t5"))
        assert export_workdir(workdir, str(tmp_path / "no_t5"), text_dim=16)["text_dim"] == 16
    finally:
        os.rename(tmp_path / "t5", t5)


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "imagen_jax.tools.export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_overwrite_and_one_line_errors(trained, tmp_path):
    workdir, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = _cli("--workdir", workdir, "--out", str(out))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"export: error: {out}: already exists and is not empty (--overwrite / overwrite=True replaces it)"
    ]
    assert os.listdir(out) == ["notes.txt"]

    proc = _cli("--workdir", workdir, "--out", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["step"] == 2
    assert sorted(os.listdir(out)) == ["config.json", "ema.safetensors", "export.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the replaced folder and the temporary one are gone

    proc = _cli("--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert proc.returncode == 1
    checkpoints = tmp_path / "missing" / "checkpoints"
    assert proc.stderr.strip().splitlines() == [
        f"export: error: no checkpoint in {checkpoints} (train the stage first, or check --workdir)"
    ]
    assert not (tmp_path / "o2").exists()


def _tiny_params():
    rng = np.random.default_rng(1)
    return {
        "blocks": {0: {"w": rng.normal(size=(2, 3)).astype(np.float32)}, 1: {"w": np.zeros((3,), np.float32)}},
        "out": {"kernel": rng.normal(size=(3, 1, 2)).astype(np.float32)},
    }


def test_killed_export_leaves_no_export(tmp_path):
    """SIGKILL after every file is written but before the rename: the target folder does not exist."""
    out = tmp_path / "stage"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np, ml_collections
        from imagen_jax.stage import export
        export._commit = lambda tmp, folder: os.kill(os.getpid(), signal.SIGKILL)
        export.write_export({str(out)!r}, ml_collections.ConfigDict({{"a": 1}}), {{"w": np.ones(3, np.float32)}},
                            step=1, text_dim=4, source="x")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and not export_lib.is_export(str(out))
    (partial,) = os.listdir(tmp_path)
    assert partial.startswith(".stage.partial-") and sorted(os.listdir(tmp_path / partial)) == [
        "config.json",
        "ema.safetensors",
        "export.json",
    ]

    # A folder an in-place writer would have left (no export.json yet) is not an export either.
    os.remove(tmp_path / partial / "export.json")
    assert not export_lib.is_export(str(tmp_path / partial))
    with pytest.raises(FileNotFoundError, match=r"export\.json: export metadata not found"):
        export_lib.read_export(str(tmp_path / partial))

    # The debris does not block a new export of the same folder.
    export_lib.write_export(str(out), config_lib.from_json({"a": 1}), _tiny_params(), step=3, text_dim=4, source="y")
    assert export_lib.is_export(str(out)) and export_lib.read_export(str(out))[2]["step"] == 3


def test_round_trip_keys_and_read_errors(tmp_path):
    params = _tiny_params()
    folder = str(tmp_path / "e")
    config = config_lib.from_json({"model": {"dim": 8, "channel_mults": [1, 2]}, "seed": 0})
    export_lib.write_export(folder, config, params, step=5, text_dim=4, source="src")
    got_config, got, metadata = export_lib.read_export(folder)
    assert got_config.model.channel_mults == (1, 2)
    assert jax.tree.structure(got) == jax.tree.structure(params)  # int list indices come back as ints
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert metadata["num_params"] == 6 + 3 + 6 and metadata["num_tensors"] == 3
    assert export_lib.read_config(folder).to_dict() == config.to_dict()
    with pytest.raises(OutputError, match="already exists and is not empty"):
        export_lib.write_export(folder, config, params, step=6, text_dim=4, source="src")

    for bad, match in [
        ({"a/b": np.ones(1, np.float32)}, "key 'a/b' under '<root>' cannot round-trip"),
        ({"x": {"0": np.ones(1, np.float32)}}, "key '0' under 'x' cannot round-trip"),
        ({"i": np.ones(2, np.int32)}, "'i' has dtype int32, expected floating point"),
    ]:
        with pytest.raises(ValueError, match=match):
            export_lib.write_export(str(tmp_path / "bad"), config, bad, step=0, text_dim=4, source="src")
        assert not os.path.exists(tmp_path / "bad")

    meta_path = os.path.join(folder, "export.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "format_version": 2}, open(meta_path, "w"))
    with pytest.raises(ValueError, match=rf"^{meta_path}: format_version 2 is not supported \(this reader reads 1\)$"):
        export_lib.read_export(folder)
    json.dump(meta, open(meta_path, "w"))

    weights = os.path.join(folder, "ema.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:-4])
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable safetensors file"):
        export_lib.read_export(folder)
    save_file(
        {
            "blocks/0/w": np.ones(2, np.float16),
            "blocks/1/w": np.ones(2, np.float32),
            "out/kernel": np.ones(1, np.float32),
        },
        weights,
    )
    with pytest.raises(ValueError, match=rf"^{weights}: tensor 'blocks/0/w' is float16, expected float32$"):
        export_lib.read_export(folder)
    save_file(
        {
            "blocks/0": np.ones(2, np.float32),
            "blocks/0/w": np.ones(2, np.float32),
            "out/kernel": np.ones(1, np.float32),
        },
        weights,
    )
    with pytest.raises(ValueError, match=rf"^{weights}: tensor 'blocks/0(/w)?' (lies under|is also a prefix)"):
        export_lib.read_export(folder)

    os.remove(os.path.join(folder, "config.json"))
    assert not export_lib.is_export(folder)
    with pytest.raises(FileNotFoundError, match=r"config\.json: stage config not found"):
        export_lib.read_export(folder)


@pytest.mark.slow
def test_export_of_a_trained_stage(tmp_path):
    """End to end: train 2 steps with the real loop, export with the CLI, read back the EMA bit for bit."""
    from imagen_jax.train.loop import run

    demo.write_demo_shards(str(tmp_path / "data"), num_examples=32, image_size=8, num_shards=1, seed=0)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    workdir = str(tmp_path / "run")
    run(tiny_config(tmp_path), workdir)
    proc = _cli("--workdir", workdir, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config, params, metadata = export_lib.read_export(str(tmp_path / "out"))
    saved_config, ema, graphdef = _checkpoint(workdir, 2)
    assert metadata["step"] == 2 and config.to_dict() == saved_config.to_dict()
    assert jax.tree.structure(params) == jax.tree.structure(ema)
    assert all(a.tobytes() == np.asarray(b).tobytes() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema)))
    got, want = _outputs(graphdef, config, params, ema)
    np.testing.assert_array_equal(got, want)
