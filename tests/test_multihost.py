"""Two real JAX processes on localhost (jax.distributed, CPU collectives over gloo): each reads its own shard
files, checkpoints carry both stream positions, and a resumed two-process run equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import demo
from imagen_jax.text.tiny import make_tiny_t5
from tests.checkpoint_helpers import latest_checkpoint
from tests.processes import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    process_id, num_processes, port, assets, workdir, num_steps, kind, sample_every = sys.argv[1:9]
    if int(num_processes) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                                   process_id=int(process_id))
    from imagen_jax import config as config_lib
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.stage import sampling
    from imagen_jax.train.loop import run

    c = config_lib.load_config_file("configs/demo.py" if kind == "base" else "configs/demo_sr.py")
    c.data.train_shards, c.text.encoder = assets + "/data/*.tfrecord", assets + "/t5"
    c.data.shuffle_buffer, c.model.dim, c.model.head_dim = 16, 16, 8
    if kind == "base":
        c.data.image_size, c.model.channel_mults, c.model.attn_resolutions = 8, (1, 2), (4,)
    else:
        c.data.image_size, c.data.crop_size, c.model.lowres_size = 16, 8, 8
    c.train.batch_size, c.train.num_steps, c.train.log_every = 8, int(num_steps), 1
    c.train.sample_every, c.train.sample_steps = int(sample_every), 3
    c.train.checkpoint_every, c.train.warmup_steps, c.train.end_lr_fraction = 2, 0, 1.0

    sample = sampling.sample

    def recorded(config, denoiser, params, text, text_mask, seeds, **kwargs):
        # What each grid sampled from and made, as process 0 saw it: the test samples the same in one process.
        images = sample(config, denoiser, params, text, text_mask, seeds, **kwargs)
        mesh = kwargs["mesh"]
        whole = lambda x: mesh_lib.gather_rows(x, len(x), mesh) if isinstance(x, jax.Array) else x
        if jax.process_index() == 0:
            lowres = kwargs.get("lowres")
            np.savez(f"{workdir}/grid_inputs.npz", text=whole(text), mask=whole(text_mask), seeds=np.asarray(seeds),
                     images=images, **({} if lowres is None else {"lowres": np.asarray(lowres)}))
        return images

    sampling.sample = recorded
    run(c, workdir)
""")


def _run(
    assets, workdir, processes: int, num_steps: int, kind: str = "base", sample_every: int = 0
) -> tuple[dict, str]:
    """Trains in `processes` processes; returns the last checkpoint's data item and a parameter checksum
    (read here, in one process: orbax restores are collectives), and process 0's stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SCRIPT,
                str(i),
                str(processes),
                str(port),
                str(assets),
                str(workdir),
                str(num_steps),
                kind,
                str(sample_every),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    _, state, data = latest_checkpoint(workdir)
    checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(state["params"])))
    return {"data": data, "checksum": checksum}, outputs[0][0]


@pytest.mark.slow
def test_two_processes_checkpoint_both_positions_and_resume_exactly(tmp_path):
    demo.write_demo_shards(str(tmp_path / "data"), num_examples=64, image_size=8, num_shards=4, seed=0)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)

    straight, log = _run(tmp_path, tmp_path / "straight", processes=2, num_steps=6)
    assert "processes: 2" in log
    # The straight run's step-4 checkpoint is what a run of 4 steps leaves (a constant learning rate): resume a copy
    # of the workdir without step 6.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    step, _, data = latest_checkpoint(tmp_path / "resumed")
    positions = data["positions"]
    assert step == 4 and data["process_count"] == 2 and len(positions) == 2
    assert all(index > 0 for _, index in positions)  # Both processes' streams advanced and were saved.
    resumed, log = _run(tmp_path, tmp_path / "resumed", processes=2, num_steps=6)
    assert f"data: resuming at epoch {positions[0][0]}, record {positions[0][1]} (process 0)" in log
    np.testing.assert_equal(resumed["checksum"], straight["checksum"])  # Bit-identical parameters.
    assert resumed["data"] == straight["data"]

    # One process resuming the two-process run: files are reassigned, a fresh epoch starts, the log says so.
    _, log = _run(tmp_path, tmp_path / "resumed", processes=1, num_steps=8)
    next_epoch = max(e for e, _ in resumed["data"]["positions"]) + 1
    assert (
        f"written by 2 processes and this run has 1; shard files are reassigned, so every process starts "
        f"epoch {next_epoch}" in log
    )


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """JAX's preemption sync point (through orbax) turns a SIGTERM on any host into one agreed stop step."""
    demo.write_demo_shards(str(tmp_path / "data"), num_examples=64, image_size=8, num_shards=4, seed=0)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
    port, workdir = free_port(), tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(i), "2", str(port), str(tmp_path), str(workdir), "100000", "base", "0"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for line in procs[0].stdout:  # Process 0 logs; wait until both are stepping.
        if line.startswith("step 3:"):
            break
    procs[1].send_signal(signal.SIGTERM)  # The other host is preempted.
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][1][-2000:]
    stopped = int(outputs[0][0].split("preempted: stopped after step ")[1].split()[0])
    step, _, data = latest_checkpoint(workdir)
    assert step == stopped > 3 and data["process_count"] == 2


@pytest.mark.slow
def test_two_processes_write_the_sample_grids_one_process_samples(tmp_path):
    """A base and an SR stage train on two processes with sample grids on: every process samples (weights and
    batch span both; the SR grid gathers its images instead of device_get on a cross-process batch), process 0
    writes, and each grid holds the images one process samples from the same EMA weights and inputs."""
    from imagen_jax import images as images_lib
    from imagen_jax.stage import sampling
    from imagen_jax.stage.model import local_mesh
    from imagen_jax.stage.stage import Stage

    demo.write_demo_shards(str(tmp_path / "data"), num_examples=32, image_size=16, num_shards=4, seed=0)
    make_tiny_t5(str(tmp_path / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    for kind in ("base", "sr"):
        workdir = tmp_path / kind
        _run(tmp_path, workdir, processes=2, num_steps=2, kind=kind, sample_every=2)
        grid = np.asarray(Image.open(workdir / "samples" / "step_0000002.png"))
        made = dict(np.load(workdir / "grid_inputs.npz"))
        stage = Stage.load(str(workdir), text_dim=16, mesh=local_mesh())  # the EMA weights of step 2
        one = sampling.sample(
            stage.config, stage.denoiser, stage.params, made["text"], made["mask"], list(made["seeds"]),
            mesh=stage.mesh, steps=3, guidance_scale=stage.config.train.sample_guidance_scale,
            lowres=made.get("lowres"), size=made["images"].shape[1],
        )  # fmt: skip
        np.testing.assert_allclose(made["images"], one, rtol=0, atol=1e-6)
        expected = images_lib.make_grid(images_lib.to_uint8(one), columns=None if kind == "base" else len(one))
        if kind == "sr":  # the middle row of low-res | sample | target
            size, pad = one.shape[1], 2
            grid = grid[size + pad : 2 * (size + pad) + pad]
        np.testing.assert_array_equal(grid, expected)


@pytest.mark.slow  # two JAX processes joining: ~10 s
def test_process_0s_listing_reaches_every_process():
    """The shard list is made once, by process 0, and every process splits the files by that one list, even where
    a host's own listing would differ (issue 29, point 4)."""
    script = textwrap.dedent("""
        import json, sys
        import jax
        index, port = int(sys.argv[1]), sys.argv[2]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=index)
        from imagen_jax.parallel import distributed
        calls = []
        mine = ["gs://b/0.tfrecord", "gs://b/ü.tfrecord"] if index == 0 else ["gs://b/other.tfrecord"]
        print(json.dumps([distributed.process_0s(lambda: calls.append(1) or mine), len(calls)]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i), str(port)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results == [[["gs://b/0.tfrecord", "gs://b/ü.tfrecord"], 1], [["gs://b/0.tfrecord", "gs://b/ü.tfrecord"], 0]]
