"""Fault injection on real train.py processes: SIGTERM ends a run cleanly with a checkpoint; SIGKILL at random
moments (during steps and during checkpoint writes) followed by the same command gives bit-identical results."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.checkpoint_helpers import latest_checkpoint
from tests.test_train import assets  # noqa: F401  (the module's shards and tiny T5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")


def _command(assets, workdir, num_steps: int, checkpoint_every: int) -> list[str]:
    """A tiny run with a constant learning rate (so stopping early does not change the schedule) and crops."""
    return [
        sys.executable,
        "train.py",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.data.train_shards={assets / 'data' / '*.tfrecord'}",
        f"--config.text.encoder={assets / 't5'}",
        "--config.data.image_size=8",
        "--config.data.crop_size=6",
        "--config.data.shuffle_buffer=16",
        "--config.model.dim=16",
        "--config.model.channel_mults=(1,2)",
        "--config.model.attn_resolutions=(4,)",
        "--config.model.head_dim=8",
        "--config.train.batch_size=8",
        "--config.train.warmup_steps=0",
        "--config.train.end_lr_fraction=1.0",
        "--config.train.log_every=1",
        "--config.train.sample_every=0",
        f"--config.train.checkpoint_every={checkpoint_every}",
        f"--config.train.num_steps={num_steps}",
    ]


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s; got: {''.join(lines)[-2000:]}")


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(assets, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _command(assets, workdir, 100_000, 1000),
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_line(proc, "step 3:")
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.time() - sent < 60
    stopped = int(out.split("preempted: stopped after step ")[1].split()[0])
    step, _, data = latest_checkpoint(workdir)
    assert step == stopped >= 3 and data["process_count"] == 1  # Off-schedule checkpoint (every 1000).
    resumed = subprocess.run(
        _command(assets, workdir, stopped + 1, 1000), cwd=REPO, env=ENV, text=True, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0 and f"resumed from checkpoint at step {stopped}" in resumed.stdout


@pytest.mark.slow
def test_sigterm_during_startup_is_answered_after_the_first_step(assets, tmp_path):
    """A SIGTERM while the model is built and the step compiles (minutes on a pod) is not the default kill."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _command(assets, workdir, 100_000, 1000),
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_line(proc, "text encoder:")  # T5 is loaded; init, restore and compilation are still to come.
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-2000:]
    assert "preempted: stopped after step 1 " in out
    step, _, data = latest_checkpoint(workdir)
    ((epoch, index),) = data["positions"]
    assert step == 1 and epoch == 0 and index > 0  # One batch consumed, its position saved.


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_same_command_is_bit_identical(assets, tmp_path):
    num_steps = 10
    straight = subprocess.run(
        _command(assets, tmp_path / "straight", num_steps, 1),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    rng = random.Random(int(os.environ.get("FAULT_SEED", time.time())))
    seed_note = f"(FAULT_SEED to reproduce: {rng.getstate()[1][0]})"
    workdir, kills = tmp_path / "killed", 0
    for _ in range(6):
        proc = subprocess.Popen(
            _command(assets, workdir, num_steps, 1),
            cwd=REPO,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_line(proc, "step ")  # Compiled and stepping; checkpoints are written after every step.
            time.sleep(rng.uniform(0.0, 1.5))  # Lands inside a step or inside a checkpoint write.
        except AssertionError:
            pass  # The run finished before the kill: fine, it is then complete.
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        if kills >= 3 or proc.returncode == 0:
            break
    final = subprocess.run(
        _command(assets, workdir, num_steps, 1), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 1, f"no kill landed before the run finished {seed_note}"

    step_a, state_a, data_a = latest_checkpoint(tmp_path / "straight")
    step_b, state_b, data_b = latest_checkpoint(workdir)
    assert step_a == step_b == num_steps and data_a == data_b, seed_note
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b, err_msg=seed_note)
    losses = {line.split(",")[0] for line in straight.stdout.splitlines() if line.startswith(f"step {num_steps}:")}
    assert losses == {line.split(",")[0] for line in final.stdout.splitlines() if line.startswith(f"step {num_steps}:")}
