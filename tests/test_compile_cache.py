"""A restart loads its compiled programs from the run's persistent compilation cache (issue 29, point 4): the
second start of the same run on the same devices compiles nothing. The same run checks that process 0's failing
writes never stop it."""

from __future__ import annotations

import os
import re
import subprocess

import jax
import pytest

from imagen_jax.config import load_config_file
from imagen_jax.errors import ConfigError
from imagen_jax.train import compile_cache
from tests.test_faults import ENV, REPO, _command
from tests.test_train import assets  # noqa: F401  (the module's shards and tiny T5)


@pytest.fixture
def jax_cache(request):
    """JAX's own cache setting (the test session sets one) as the test wants it, restored after."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", request.param)
    yield request.param
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("jax_cache", [None], indirect=True)
def test_the_cache_is_the_workdirs_unless_set(jax_cache):
    config = load_config_file(os.path.join(REPO, "configs/demo.py"))
    assert compile_cache.cache_dir(config, "gs://b/run")[0] == "gs://b/run/compilation_cache"
    assert compile_cache.cache_dir(config, "ram://b/run") == (
        None, "compilation cache: off (JAX's cache cannot open ram://b/run/compilation_cache)"
    )  # fmt: skip
    config.train.compilation_cache = "/shared/xla"
    assert compile_cache.cache_dir(config, "gs://b/run") == ("/shared/xla", "compilation cache: /shared/xla")
    config.train.compilation_cache = "ram://b/xla"
    with pytest.raises(ConfigError, match=r"^config.train.compilation_cache='ram://b/xla': JAX's cache cannot open"):
        compile_cache.cache_dir(config, "gs://b/run")
    config.train.compilation_cache = "off"
    assert compile_cache.cache_dir(config, "gs://b/run")[0] is None


@pytest.mark.parametrize("jax_cache", ["/home/me/xla"], indirect=True)
def test_a_cache_given_to_jax_wins_over_the_workdirs(jax_cache):
    """JAX_COMPILATION_CACHE_DIR (read into jax.config) is the user's cache for every run: the default keeps it."""
    config = load_config_file(os.path.join(REPO, "configs/demo.py"))
    assert compile_cache.cache_dir(config, "gs://b/run")[0] == "/home/me/xla"
    config.train.compilation_cache = "/shared/xla"
    assert compile_cache.cache_dir(config, "gs://b/run")[0] == "/shared/xla"
    config.train.compilation_cache = "off"
    assert compile_cache.cache_dir(config, "gs://b/run")[0] is None


def _train(assets, workdir, num_steps: int) -> tuple[tuple[int, int], str]:
    """((programs loaded, compiled), stdout) of a train.py run that samples and checkpoints every 2 steps."""
    command = _command(assets, workdir, num_steps=num_steps, checkpoint_every=2)
    command += ["--config.train.sample_every=2", "--config.train.sample_steps=2"]
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the test session's: not this run's
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = re.findall(r"compilation cache: (\d+) programs loaded, (\d+) compiled", done.stdout)
    return (int(line[0]), int(line[1])), done.stdout + done.stderr


@pytest.mark.slow  # two short train.py runs: ~2 min
def test_a_restart_compiles_nothing_and_failed_host_writes_never_stop_the_run(assets, tmp_path):  # noqa: F811
    """One run, started twice (the second resumes as after a preemption), serves two checks (one run, for CI's
    time): the restart loads every program from the compilation cache; and process 0's writes, all failing here
    (the samples and TensorBoard 'folders' are files, config.json is a folder), never stop it (host_writes.py)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "samples").write_text("not a folder")
    (workdir / "tensorboard").write_text("not a folder")
    (workdir / "config.json").mkdir()
    (loaded, compiled), out = _train(assets, workdir, num_steps=2)
    assert loaded == 0 and compiled > 5  # the train step, the sampler, the state's set-up, ...
    assert os.listdir(workdir / "compilation_cache")
    assert "config.json: could not write the run's config after 3 tries" in out
    assert f"sample grids: could not write {workdir}/samples/step_0000002.png after 3 tries" in out
    assert "TensorBoard: could not write step 1's scalars after 3 tries" in out
    # restarted: resumes at step 2, trains, samples and saves with the programs of the first start
    (loaded, again), out = _train(assets, workdir, num_steps=4)
    assert again == 0 and 5 < loaded < compiled  # (16 then 15 here: a resumed run does not make a fresh state)
    assert "finished at step 4" in out and sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
