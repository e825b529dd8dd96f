"""The training loop's images/s beside the bare train step's, on the same config in one run: how much of the
step's speed the loop keeps once real data is read, decoded, tokenised and transferred, metrics are read and
the non-finite guard runs.

    python -m imagen_jax.tools.bench --config configs/demo.py --loop [--steps 50] [--config.a.b=...]

The bare step is `bench_step`'s figure (one batch, reused, on the devices already; after one warm-up step). The
loop is `train.loop.run` itself in a temporary workdir, 2 x `steps` steps with a log line after each half: the
second line's images/s, over the last `steps` steps (warm, like the bare step's), includes everything a training
step costs the host. A config without data or T5 (configs/demo.py) gets the demo shards and tiny T5 written to a
temporary folder, as `tools.demo` makes them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import ml_collections

from imagen_jax.tools.bench_step import benchmark

DEMO_EXAMPLES = 512


def benchmark_loop(config: ml_collections.ConfigDict, *, steps: int) -> dict:
    """Times `steps` bare train steps, then `steps` steps of the training loop; returns both rates and their ratio."""
    from imagen_jax.train import loop

    with tempfile.TemporaryDirectory() as tmp:
        config = config.copy_and_resolve_references()
        if not config.data.train_shards or not config.text.encoder:
            from imagen_jax.tools import demo

            with contextlib.redirect_stdout(sys.stderr):
                shards, t5 = demo.prepare(
                    tmp, num_examples=DEMO_EXAMPLES, image_size=int(config.data.image_size), seed=0
                )
            config.data.train_shards = config.data.train_shards or shards
            config.text.encoder = config.text.encoder or t5
        step = benchmark(config, steps=steps, text_dim=64, peak_tflops=None)
        config.train.num_steps, config.train.log_every = 2 * steps, steps
        config.train.checkpoint_every, config.train.sample_every = 2 * steps, 0
        with contextlib.redirect_stdout(sys.stderr):  # the loop's own log lines; the figures go to stdout
            metrics = loop.run(config, os.path.join(tmp, "run"))
    loop_rate = metrics["images_per_sec"]
    return {
        "device": step["device"],
        "image_size": step["image_size"],
        "global_batch": step["global_batch"],
        "steps": steps,
        "step_images_per_s": step["images_per_s"],
        "loop_images_per_s": round(loop_rate, 1),
        "loop_vs_step": round(loop_rate / step["images_per_s"], 3),
    }
