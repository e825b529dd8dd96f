"""Train-step throughput of a config on this machine's devices: images/s, FLOPs per step, MFU.

    python -m imagen_jax.tools.bench --config configs/demo.py [--steps 20] [--peak_tflops 989] [--config.a.b=...]

Runs the real jitted train step (frozen T5 + U-Net + optimizer + EMA, sharded over all devices) on random
images and captions, after one compile step. FLOPs come from XLA's cost analysis of the compiled step;
MFU = achieved FLOP/s / (peak_tflops per device x devices). Without `config.text.encoder` a random one-layer
T5 of width --text_dim stands in (its cost is small next to the U-Net's, its width sets the text projections).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder, make_tiny_t5
from imagen_jax.train import optimizer as optimizer_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train.step import make_train_step

CAPTIONS = ["a red circle on the left", "a photograph of a corgi wearing sunglasses on the beach"]


def benchmark(config, *, steps: int, text_dim: int, peak_tflops: float | None) -> dict:
    """Compiles and times `steps` train steps; returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        if not config.text.encoder:
            config.text.encoder = make_tiny_t5(os.path.join(tmp, "t5"), CAPTIONS, d_model=text_dim, num_layers=1,
                                               num_heads=max(1, text_dim // 64), d_kv=min(64, text_dim), d_ff=2 * text_dim)
        encoder = T5Encoder.from_pretrained(config.text.encoder, dtype=state_lib.compute_dtype(config.text.dtype))
    mesh = mesh_lib.make_mesh(config.mesh)
    spec = state_lib.model_spec(config, encoder.dim, mesh)
    tx = optimizer_lib.make_optimizer(config.train)
    shardings = state_lib.state_shardings(spec, tx, mesh)
    state = state_lib.init_state(config, encoder.dim, tx, shardings)
    t5_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), encoder.state)
    t5_params = jax.device_put(encoder.state, t5_shardings)
    step = make_train_step(config, spec.graphdef, encoder.apply, tx, optimizer_lib.learning_rate_schedule(config.train),
                           mesh, shardings, t5_shardings)
    batch_size, size = config.train.batch_size, config.data.image_size
    ids, mask = encoder.tokenizer([CAPTIONS[i % 2] for i in range(batch_size)], config.text.max_length)
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
    batch = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, mesh)

    start = time.perf_counter()
    compiled = step.lower(state, t5_params, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = compiled(state, t5_params, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, t5_params, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_params))
    result = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "unet_params_M": round(num_params / 1e6, 2),
        "image_size": size,
        "global_batch": batch_size,
        "compute_dtype": config.train.compute_dtype,
        "compile_s": round(compile_s, 1),
        "step_ms": round(step_s * 1e3, 1),
        "images_per_s": round(batch_size / step_s, 1),
        "images_per_s_per_device": round(batch_size / step_s / jax.device_count(), 1),
        "gflop_per_step": round(flops / 1e9, 1),
        "achieved_tflops": round(flops / step_s / 1e12, 3),
    }
    if peak_tflops:
        result["mfu"] = round(flops / step_s / (peak_tflops * 1e12 * jax.device_count()), 4)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step")
    parser.add_argument("--text_dim", type=int, default=64, help="width of the stand-in T5 (4096 = T5-XXL)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak, for MFU (e.g. 989 H100 bf16)")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    except config_lib.ConfigError as e:
        parser.exit(2, f"bench: error: {e}\n")
    print(json.dumps(benchmark(config, steps=args.steps, text_dim=args.text_dim, peak_tflops=args.peak_tflops), indent=2))


if __name__ == "__main__":
    main()
