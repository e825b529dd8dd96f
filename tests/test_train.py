"""Training end to end on a tiny model: loss goes down, checkpoints resume, sample.py writes what it says."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from imagen_jax import config as config_lib
from imagen_jax.data import demo
from imagen_jax.text.tiny import make_tiny_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Demo shards at 8x8 and a tiny T5, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("assets")
    demo.write_demo_shards(str(root / "data"), num_examples=96, image_size=8, num_shards=2, seed=0)
    make_tiny_t5(str(root / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    return root


def tiny_config(assets, **train):
    c = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    c.data.train_shards = str(assets / "data" / "*.tfrecord")
    c.text.encoder = str(assets / "t5")
    c.data.image_size = 8
    c.data.shuffle_buffer = 64
    c.model.dim = 16
    c.model.channel_mults = (1, 2)
    c.model.attn_resolutions = (4,)
    c.model.head_dim = 8
    c.train.batch_size = 8
    c.train.sample_steps = 3
    c.train.sample_prompts = ("a red circle on the left", "a blue square at the top")
    for key, value in train.items():
        c.train[key] = value
    return c


@pytest.mark.slow  # train, resume, sample end to end: ~75 s
def test_train_resume_and_sample(assets, tmp_path, capsys):
    from imagen_jax.sample_files import sample_to_folder
    from imagen_jax.train.loop import run

    workdir = str(tmp_path / "run")
    config = tiny_config(assets, num_steps=4, checkpoint_every=2, log_every=2, sample_every=4, learning_rate=3e-3)
    first = run(config, workdir)
    assert np.isfinite(first["loss"]) and first["images_per_sec"] > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["train"]["num_steps"] == 4 and saved["model"]["channel_mults"] == [1, 2]

    config.train.num_steps = 6
    run(config, workdir)
    out = capsys.readouterr().out
    assert "resumed from checkpoint at step 4" in out and "step 6:" in out and "step 2:" not in out.split("resumed")[1]

    changed = tiny_config(assets, num_steps=8)
    changed.model.dim = 32
    with pytest.raises(config_lib.ConfigError, match=r"model.dim: checkpoint 16, config 32; resume with the config"):
        run(changed, workdir)  # A mismatch lists the fields instead of failing deep inside orbax...
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["dim"] == 16  # ...and keeps config.json.

    sample_dir = str(tmp_path / "samples")
    names = sample_to_folder(
        [workdir],
        ["a red circle on the left", "a green square at the top"],
        out=sample_dir,
        num_images=2,
        seed=7,
        steps=[3],
        guidance_scales=[2.0],
        batch_size=3,
    )
    index = json.load(open(os.path.join(sample_dir, "samples.json")))
    assert sorted(index["images"]) == sorted(names) and len(names) == 4
    seeds = sorted(v["seed"] for v in index["images"].values())
    assert seeds == [7, 8, 9, 10]
    entry = index["images"][names[0]]
    assert entry["prompt"] == "a red circle on the left" and entry["stages"][0]["checkpoint_step"] == 6
    assert entry["stages"][0]["steps"] == 3 and entry["stages"][0]["sampler"] == "ddpm"
    grid = np.asarray(Image.open(os.path.join(sample_dir, "grid.png")))
    assert grid.shape[0] > 16 and grid.shape[1] > 16

    # Same seed, same images, whatever the batch split; the per-image seed is what matters.
    again = str(tmp_path / "again")
    sample_to_folder(
        [workdir],
        ["a red circle on the left", "a green square at the top"],
        out=again,
        num_images=2,
        seed=7,
        steps=[3],
        guidance_scales=[2.0],
        batch_size=4,
    )
    for name in names:
        a = np.asarray(Image.open(os.path.join(sample_dir, name)))
        b = np.asarray(Image.open(os.path.join(again, name)))
        assert a.shape == (8, 8, 3)
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resumed_run_sees_the_same_data_and_reaches_the_same_parameters(assets, tmp_path, capsys):
    """4 steps + resume to 6 == 6 steps in one go, bit for bit on CPU: same examples, same RNG, same state."""
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.train.loop import run

    def config(num_steps):  # Constant learning rate, so stopping at 4 does not change the schedule.
        c = tiny_config(
            assets,
            num_steps=num_steps,
            checkpoint_every=2,
            log_every=1,
            sample_every=0,
            warmup_steps=0,
            end_lr_fraction=1.0,
        )
        c.data.crop_size = 6  # Random crops must replay too.
        return c

    run(config(6), str(tmp_path / "straight"))
    straight_log = capsys.readouterr().out
    run(config(4), str(tmp_path / "resumed"))
    run(config(6), str(tmp_path / "resumed"))
    resumed_log = capsys.readouterr().out
    assert "data: resuming at epoch 0, record 3" in resumed_log  # 4 batches of 8 from 2 shards of 48 + markers.
    for step in (5, 6):
        line = next(out for out in straight_log.splitlines() if out.startswith(f"step {step}:"))
        assert (
            line.split("images_per_sec")[0]
            == next(out for out in resumed_log.splitlines() if out.startswith(f"step {step}:")).split("images_per_sec")[
                0
            ]
        )
    params = []
    for name in ("straight", "resumed"):
        checkpointer = Checkpointer(str(tmp_path / name), every=1, keep=1, read_only=True)
        restored = checkpointer.manager.restore(6, args=ocp.args.Composite(train=ocp.args.StandardRestore()))
        params.append(restored["train"]["params"])
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(a, b)


def _cli(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_sample_cli_errors(tmp_path):
    proc = _cli("sample.py", "--workdir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no prompts" in proc.stderr.strip().splitlines()[-1]
    proc = _cli("sample.py", "--workdir", str(tmp_path / "missing"), "--prompt", "a cat", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "no checkpoint in" in proc.stderr.strip().splitlines()[-1] and "missing" in proc.stderr
    proc = _cli("sample.py", "--workdir", str(tmp_path), "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
    proc = _cli("sample.py", "--workdir", str(tmp_path), "--prompts_file", str(tmp_path / "nope.txt"), "--out", "o")
    assert proc.returncode == 2 and "cannot read --prompts_file" in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(assets, tmp_path):
    """SIGKILL mid-run, then the same command: training continues from the newest checkpoint."""
    workdir = tmp_path / "killed"
    args = [
        "train.py",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.data.train_shards={assets / 'data' / '*.tfrecord'}",
        f"--config.text.encoder={assets / 't5'}",
        "--config.data.image_size=8",
        "--config.model.dim=16",
        "--config.model.channel_mults=(1,2)",
        "--config.model.attn_resolutions=(4,)",
        "--config.model.head_dim=8",
        "--config.train.batch_size=8",
        "--config.train.checkpoint_every=3",
        "--config.train.log_every=1",
        "--config.train.sample_every=0",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, *args, "--config.train.num_steps=100000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 6 for p in checkpoints.iterdir())
    ):
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert done >= 6
    resumed = _cli(*args, f"--config.train.num_steps={done + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint at step {done}" in resumed.stdout
    assert f"step {done + 1}:" in resumed.stdout and "step 1:" not in resumed.stdout


@pytest.mark.slow  # several train.py processes: ~40 s
def test_train_cli_bad_paths_are_one_line_errors(assets, tmp_path):
    base = ["train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w")]
    proc = _cli(*base, f"--config.text.encoder={tmp_path / 'no_t5'}", f"--config.data.train_shards={tmp_path}/*.rec")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"train.py: error: {tmp_path / 'no_t5' / 'config.json'}: T5 config.json not found"
    )
    proc = _cli(*base, f"--config.text.encoder={assets / 't5'}", f"--config.data.train_shards={tmp_path}/*.rec")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"train.py: error: no shard files match '{tmp_path}/*.rec'"
    proc = _cli(*base, "--config.train.num_steps=0")
    assert proc.stderr.strip().splitlines()[-1] == "train.py: error: config.train.num_steps must be >= 1, got 0"
    # Filters that reject every record: one line naming the counters, instead of waiting forever for a batch.
    proc = _cli(
        *base,
        f"--config.text.encoder={assets / 't5'}",
        f"--config.data.train_shards={assets / 'data' / '*.tfrecord'}",
        "--config.data.image_size=8",
        "--config.model.dim=16",
        "--config.model.channel_mults=(1,2)",
        "--config.model.attn_resolutions=(4,)",
        "--config.model.head_dim=8",
        "--config.train.batch_size=8",
        "--config.data.min_caption_chars=1000",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(
            "train.py: error: data: epoch 0 of this process (2 shard files) delivered no example (counters: records="
        )
        and "skipped_caption_length=" in last
    ), proc.stderr[-2000:]


def test_a_non_finite_step_changes_nothing_but_the_counters(assets):
    """NaN in the batch -> NaN loss and gradients: params, EMA and optimizer moments stay bit for bit."""
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.train import setup as setup_lib

    config = tiny_config(assets)
    mesh = mesh_lib.make_mesh(config.mesh)
    trainer = setup_lib.setup(config, mesh, setup_lib.load_text(config, mesh))
    encoder, step = trainer.text.encoder, trainer.train_step
    ids, mask = encoder.tokenizer(["a red circle on the left"] * 8, config.text.max_length)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    good = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, mesh)
    nan_images = images.copy()  # A copy: on CPU the batch above may share the numpy buffer.
    nan_images[3, 2, 2, 1] = np.nan
    poisoned = mesh_lib.global_batch({"image": nan_images, "ids": ids, "mask": mask}, mesh)

    state, metrics = step(trainer.init_state(), encoder.state, good, trainer.no_streak())
    assert int(metrics["nonfinite"]) == 0 and int(metrics["nonfinite_streak"]) == 0
    before = jax.device_get(state)
    state, metrics = step(state, encoder.state, poisoned, metrics["nonfinite_streak"])
    after = jax.device_get(state)
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(metrics["nonfinite_streak"]) == 1  # counted on the device
    assert int(after["step"]) == int(before["step"]) + 1  # The step (and with it the data position) advances.
    for name in ("params", "ema", "opt_state"):
        for old, new in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            if np.issubdtype(np.asarray(old).dtype, np.integer):
                assert int(new) == int(old) + 1  # The schedule's count advances with the step.
            else:
                np.testing.assert_array_equal(new, old)

    # A streak of max_consecutive_nonfinite tells the next step (dispatched before the loop reads the streak) to
    # change nothing, its counter included, even on good data; a finite step with a shorter streak resets it.
    full = jax.device_put(np.int32(config.train.max_consecutive_nonfinite), mesh_lib.replicated(mesh))
    halted, metrics = step(state, encoder.state, good, full)
    assert int(metrics["nonfinite_streak"]) == config.train.max_consecutive_nonfinite
    for old, new in zip(jax.tree.leaves(after), jax.tree.leaves(jax.device_get(halted))):
        np.testing.assert_array_equal(new, old)
    _, metrics = step(halted, encoder.state, good, metrics["nonfinite_streak"] - 1)
    assert int(metrics["nonfinite_streak"]) == 0


@pytest.mark.slow  # 50 training steps end to end: ~55 s
def test_a_diverging_run_stops_with_a_checkpoint_of_the_last_good_state(assets, tmp_path):
    """A learning rate of 1e30 overflows every update: each is skipped; the third in a row stops the run."""
    from imagen_jax.stage.checkpoint import Checkpointer
    from imagen_jax.train.loop import TrainingDiverged, run

    config = tiny_config(
        assets,
        num_steps=50,
        learning_rate=1e30,
        warmup_steps=0,
        end_lr_fraction=1.0,
        max_consecutive_nonfinite=3,
        checkpoint_every=100,
        sample_every=0,
        log_every=1,
    )
    with pytest.raises(TrainingDiverged, match="stopped at step 3: 3 consecutive steps .* parameters of step 0"):
        run(config, str(tmp_path / "run"))
    checkpointer = Checkpointer(str(tmp_path / "run"), every=1, keep=1, read_only=True)
    assert checkpointer.latest_step() == 3
    restored = checkpointer.manager.restore(
        3, args=ocp.args.Composite(train=ocp.args.StandardRestore(), ema=ocp.args.StandardRestore())
    )
    for params, ema in zip(jax.tree.leaves(restored["train"]["params"]), jax.tree.leaves(restored["ema"])):
        np.testing.assert_array_equal(params, ema)  # Never updated: EMA and params are still the init.


@pytest.mark.slow  # trains the tiny model: ~35 s
def test_the_loop_dispatches_each_step_before_reading_the_last_and_feeds_from_a_thread(assets, tmp_path, monkeypatch):
    """Step n's results are read only after step n+1 is on the device queue (so the device never idles while the
    host reads, logs or counts); batches are put on the devices by the feed thread, not between two steps."""
    import dataclasses
    import threading

    from imagen_jax.train import loop

    events, steps_of, feeders = [], {}, set()
    setup, global_batch = loop.setup_lib.setup, loop.mesh_lib.global_batch

    def spy_setup(*args, **kwargs):
        trainer = setup(*args, **kwargs)

        def train_step(state, t5_params, batch, streak):
            state, metrics = trainer.train_step(state, t5_params, batch, streak)
            done = len(steps_of) + 1
            steps_of[id(metrics["nonfinite"])] = done
            events.append(("dispatch", done))
            return state, metrics

        return dataclasses.replace(trainer, train_step=train_step)

    def spy_read(values):
        events.append(("read", steps_of[id(values["nonfinite"])]))
        return jax.device_get(values)

    def spy_global_batch(local, mesh):
        feeders.add(threading.current_thread().name)
        return global_batch(local, mesh)

    monkeypatch.setattr(loop.setup_lib, "setup", spy_setup)
    monkeypatch.setattr(loop, "read", spy_read)
    monkeypatch.setattr(loop.mesh_lib, "global_batch", spy_global_batch)
    config = tiny_config(assets, num_steps=5, log_every=2, checkpoint_every=100, sample_every=0)
    loop.run(config, str(tmp_path / "run"))
    # Step 5, the last, is read at once: no step follows it.
    assert events == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2),
                      ("dispatch", 4), ("read", 3), ("dispatch", 5), ("read", 4), ("read", 5)]  # fmt: skip
    assert feeders == {"train-feed"}
