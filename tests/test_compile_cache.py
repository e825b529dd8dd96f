"""A restart loads its compiled programs from the run's persistent compilation cache (issue 29, point 4): the
second start of the same run on the same devices compiles nothing."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from imagen_jax.config import load_config_file
from imagen_jax.errors import ConfigError
from imagen_jax.train import compile_cache
from tests.test_faults import ENV, REPO, _command
from tests.test_train import assets  # noqa: F401  (the module's shards and tiny T5)


def test_the_cache_is_the_workdirs_unless_set():
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


def _train(assets, workdir, num_steps: int) -> tuple[int, int]:
    command = _command(assets, workdir, num_steps=num_steps, checkpoint_every=2)
    command += ["--config.train.sample_every=2", "--config.train.sample_steps=2"]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = re.findall(r"compilation cache: (\d+) programs loaded, (\d+) compiled", done.stdout)
    return int(line[0]), int(line[1])


@pytest.mark.slow  # two short train.py runs: ~1.5 min
def test_a_second_start_compiles_nothing(assets, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    loaded, compiled = _train(assets, workdir, num_steps=2)
    assert loaded == 0 and compiled > 5  # the train step, the sampler, the state's set-up, ...
    assert os.listdir(workdir / "compilation_cache")
    # preempted at step 2, restarted: resumes, trains, samples and saves with the programs of the first start
    loaded, again = _train(assets, workdir, num_steps=4)
    assert again == 0 and 5 < loaded < compiled  # (16 then 15 here: a resumed run does not make a fresh state)
