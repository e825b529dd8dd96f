"""Checkpoints: fallback past unreadable steps, interrupted saves, and checkpoints that do not fit the config."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imagen_jax  # noqa: F401  (flax settings)
from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage.checkpoint import Checkpointer, CheckpointError, check_compatible, checkpoint_dir
from imagen_jax.train import optimizer as optimizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
    return config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))


def make_state(config, seed, width=16):
    """A small train state shaped like the real one: nested params with integer keys, optax's own opt_state."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"down": {0: {"w": jax.random.normal(k[0], (8, width))}}, "out": {"b": jax.random.normal(k[1], (width,))}}
    opt_state = optimizer_lib.make_optimizer(config.train).init(params)
    opt_state = jax.tree.map(lambda x: x + seed if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
    return {
        "step": jnp.int32(seed),
        "rng": jax.random.key_data(k[2]),
        "params": params,
        "ema": jax.tree.map(lambda x: 0.5 * x, params),
        "opt_state": opt_state,
    }


def abstract(config, width=16):
    mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    replicated = mesh_lib.replicated(mesh)
    shapes = jax.eval_shape(lambda: make_state(config, 0, width))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def save_steps(workdir, config, steps):
    checkpointer = Checkpointer(workdir, every=1, keep=5, async_save=False)
    states = {}
    for step in steps:
        states[step] = make_state(config, step)
        checkpointer.save(step, states[step], config, {"batches": step})
    checkpointer.close()
    return states


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def truncate_arrays(step_dir):
    files = glob.glob(os.path.join(step_dir, "train", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(10)


def truncate_config(step_dir):
    with open(os.path.join(step_dir, "config", "metadata"), "r+b") as f:
        f.truncate(15)


def delete_ema(step_dir):
    shutil.rmtree(os.path.join(step_dir, "ema"))


FALLBACK_LINE = re.compile(r"checkpoint: step 4 in (\S+) cannot be restored \((\w+): [^\n]+\); falling back to step 2")


@pytest.mark.parametrize("corrupt", [truncate_arrays, truncate_config, delete_ema])
def test_falls_back_past_an_unreadable_step_and_can_save_it_again(tmp_path, corrupt):
    config, workdir = demo_config(), str(tmp_path / "run")
    states = save_steps(workdir, config, [2, 4])
    corrupt(os.path.join(checkpoint_dir(workdir), "4"))

    lines = []
    checkpointer = Checkpointer(workdir, every=1, keep=2, async_save=False)
    step, state, data = checkpointer.restore_latest(abstract(config), config, log=lines.append)
    assert step == 2 and data == {"batches": 2}
    assert_trees_equal(state, states[2])
    match = FALLBACK_LINE.fullmatch(lines[0])
    assert match and match.group(1) == checkpoint_dir(workdir), lines
    # The broken step is kept aside, so step 4 can be saved again and keep=2 keeps step 2, not the broken one.
    assert lines[1:] == [f"checkpoint: moved unrestorable step 4 to {checkpoint_dir(workdir)}/4.unrestorable"]
    assert checkpointer.latest_step() == 2 and checkpointer.due(4)
    assert checkpointer.save(4, states[4], config, {"batches": 4}, force=True)
    checkpointer.close()
    step, state, _ = Checkpointer(workdir, every=1, keep=2).restore_latest(abstract(config), config, log=lines.append)
    assert step == 4 and len(lines) == 2
    assert_trees_equal(state, states[4])


def test_every_step_unreadable_is_one_error_naming_the_directory(tmp_path):
    config, workdir = demo_config(), str(tmp_path / "run")
    save_steps(workdir, config, [2, 4])
    truncate_arrays(os.path.join(checkpoint_dir(workdir), "4"))
    truncate_config(os.path.join(checkpoint_dir(workdir), "2"))
    lines = []
    with pytest.raises(CheckpointError) as error:
        Checkpointer(workdir, every=1, keep=2).restore_latest(abstract(config), config, log=lines.append)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"no checkpoint in {checkpoint_dir(workdir)} can be restored: ")
    assert re.search(r"step 4 \(ValueError: [^;]+\); step 2 \(JSONDecodeError: [^;]+\)$", message), message
    assert len(lines) == 1 and FALLBACK_LINE.fullmatch(lines[0])
    assert sorted(os.listdir(checkpoint_dir(workdir))) == ["2", "4"]  # nothing moved when nothing was restored


def test_no_checkpoint_is_none(tmp_path):
    config = demo_config()
    assert Checkpointer(str(tmp_path / "new"), every=1, keep=2).restore_latest(abstract(config), config) is None


def test_an_unfinished_save_is_not_a_step(tmp_path):
    """orbax writes <step>.orbax-checkpoint-tmp and renames it when complete; a leftover one is ignored."""
    config, workdir = demo_config(), str(tmp_path / "run")
    states = save_steps(workdir, config, [2])
    ckpt = checkpoint_dir(workdir)
    shutil.copytree(os.path.join(ckpt, "2"), os.path.join(ckpt, "4.orbax-checkpoint-tmp"))
    os.remove(os.path.join(ckpt, "4.orbax-checkpoint-tmp", "commit_success.txt"))
    truncate_arrays(os.path.join(ckpt, "4.orbax-checkpoint-tmp"))
    lines = []
    checkpointer = Checkpointer(workdir, every=1, keep=2, async_save=False)
    assert checkpointer.latest_step() == 2 and list(checkpointer.manager.all_steps()) == [2]
    step, state, _ = checkpointer.restore_latest(abstract(config), config, log=lines.append)
    assert step == 2 and lines == []
    assert_trees_equal(state, states[2])
    assert checkpointer.save(4, states[2], config, {"batches": 4}, force=True)  # replaces the leftover
    checkpointer.close()
    assert sorted(os.listdir(ckpt)) == ["2", "4"]


CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp, numpy as np
    from imagen_jax import config as config_lib
    from imagen_jax.stage.checkpoint import Checkpointer
    config = config_lib.load_config_file(sys.argv[2])
    def state(step, rows):
        params = {"w": jnp.asarray(np.full((rows, 1024), float(step), np.float32))}
        rng = jnp.zeros((2,), jnp.uint32)
        return {"step": jnp.int32(step), "rng": rng, "params": params, "ema": params, "opt_state": {}}
    checkpointer = Checkpointer(sys.argv[1], every=1, keep=5, async_save=True)
    checkpointer.save(2, state(2, 4), config, {"batches": 2})
    checkpointer.wait()
    checkpointer.save(4, state(4, 16384), config, {"batches": 4})  # 64 MiB, written in the background
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_process_killed_during_a_save_leaves_the_previous_step(tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE, workdir, os.path.join(REPO, "configs/demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(os.listdir(checkpoint_dir(workdir))) == ["2", "4.orbax-checkpoint-tmp"]  # killed mid-write

    config = demo_config()
    replicated = mesh_lib.replicated(mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1]))
    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        "params": {"w": jax.ShapeDtypeStruct((4, 1024), jnp.float32, sharding=replicated)},
        "ema": {"w": jax.ShapeDtypeStruct((4, 1024), jnp.float32, sharding=replicated)},
        "opt_state": {},
    }
    checkpointer = Checkpointer(workdir, every=1, keep=5, read_only=True)
    assert checkpointer.latest_step() == 2
    step, state, data = checkpointer.restore_latest(target, config)
    assert step == 2 and data == {"batches": 2} and int(state["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 1024), 2.0, np.float32))


def field_names(message):
    return set(re.findall(r"([a-z_]+\.[a-z_.]+): checkpoint ", message))


def test_check_compatible_lists_exactly_the_fields_that_change_the_state():
    saved = demo_config()
    current = demo_config()
    for key, value in [
        ("train.num_steps", 99),
        ("train.learning_rate", 0.5),
        ("train.warmup_steps", 0),
        ("train.checkpoint_every", 7),
        ("train.log_every", 3),
        ("train.sample_every", 0),
        ("train.weight_decay", 0.1),
        ("train.batch_size", 4),
        ("data.train_shards", "/x/*.tfrecord"),
        ("data.shuffle_buffer", 5),
        ("mesh.data", 2),
        ("mesh.fsdp", 4),
        ("text.max_length", 8),
    ]:
        config_lib.apply_override(current, key, str(value))
    check_compatible(saved, current)

    current.model.dim = 16
    current.model.channel_mults = (1, 2)
    current.train.optimizer = "adafactor"
    with pytest.raises(config_lib.ConfigError) as error:
        check_compatible(saved, current, source="checkpoint step 4 in /w/checkpoints", workdir="/w")
    message = str(error.value)
    assert field_names(message) == {"model.dim", "model.channel_mults", "train.optimizer"}
    assert "model.dim: checkpoint 32, config 16" in message
    assert "model.channel_mults: checkpoint (1, 2, 2), config (1, 2)" in message
    assert "train.optimizer: checkpoint 'adamw', config 'adafactor'" in message
    assert message.startswith("checkpoint step 4 in /w/checkpoints ") and "/w/config.json" in message
    assert "\n" not in message


def test_adafactor_momentum_on_or_off_changes_the_state():
    saved, current = demo_config(), demo_config()
    saved.train.optimizer = current.train.optimizer = "adafactor"
    saved.train.adafactor_momentum = 0.0
    with pytest.raises(config_lib.ConfigError) as error:
        check_compatible(saved, current)
    assert field_names(str(error.value)) == {"train.adafactor_momentum"}
    saved.train.adafactor_momentum, saved.train.weight_decay = 0.5, 0.1  # same optimizer state
    check_compatible(saved, current)
    # The rule matches optax: the structures differ exactly when check_compatible says so.
    params = {"w": jnp.zeros((4, 6))}

    def structure(c):
        return jax.tree.structure(jax.eval_shape(optimizer_lib.make_optimizer(c.train).init, params))

    assert structure(saved) == structure(current)
    saved.train.adafactor_momentum = 0.0
    assert structure(saved) != structure(current)


def test_a_config_mismatch_raises_at_once_without_falling_back(tmp_path):
    config, workdir = demo_config(), str(tmp_path / "run")
    save_steps(workdir, config, [2, 4])
    current = demo_config()
    current.model.num_res_blocks = 2
    current.train.num_steps = 10  # allowed
    lines = []
    with pytest.raises(config_lib.ConfigError) as error:
        Checkpointer(workdir, every=1, keep=2).restore_latest(abstract(current), current, log=lines.append)
    assert field_names(str(error.value)) == {"model.num_res_blocks"}
    assert str(error.value).startswith(f"checkpoint step 4 in {checkpoint_dir(workdir)} ") and lines == []
    assert sorted(os.listdir(checkpoint_dir(workdir))) == ["2", "4"]


def test_arrays_that_do_not_fit_are_listed_with_both_shapes(tmp_path):
    """Same config but another text width (not in the config): the shapes differ; no fallback."""
    config, workdir = demo_config(), str(tmp_path / "run")
    save_steps(workdir, config, [2, 4])
    lines = []
    with pytest.raises(CheckpointError) as error:
        Checkpointer(workdir, every=1, keep=2).restore_latest(abstract(config, width=24), config, log=lines.append)
    message = str(error.value)
    assert message.startswith(f"checkpoint step 4 in {checkpoint_dir(workdir)} does not fit") and lines == []
    assert "params.down.0.w: checkpoint (8, 16), expected (8, 24)" in message
    assert "params.out.b: checkpoint (16,), expected (24,)" in message
    assert "(8 arrays differ: " in message and "; and 3 more)" in message  # params, EMA, Adam's mu and nu
    assert "\n" not in message


def test_an_unusable_checkpoint_directory_is_one_line(tmp_path):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    (tmp_path / "file").write_text("not a workdir")
    for workdir, read_only in [(tmp_path / "run", False), (tmp_path / "run", True), (tmp_path / "file", False)]:
        with pytest.raises(CheckpointError) as error:
            Checkpointer(str(workdir), every=1, keep=2, read_only=read_only)
        message = str(error.value)
        assert message.startswith(f"checkpoint directory {checkpoint_dir(str(workdir))} cannot be used (")
        assert "NotADirectoryError" in message or "FileExistsError" in message, message
        assert "\n" not in message


def test_a_model_field_only_one_config_has_is_a_difference():
    saved, current = demo_config(), demo_config()
    with current.model.unlocked():
        current.model.lowres_size = 16
    with pytest.raises(config_lib.ConfigError, match=r"model\.lowres_size: checkpoint <missing>, config 16;"):
        check_compatible(saved, current)
