"""Train-step throughput of a config on this machine's devices: images/s, FLOPs per step and MFU.

    python -m imagen_jax.tools.bench --config configs/demo.py [--steps 20] [--peak_tflops 989] [--config.a.b=...]
    python -m imagen_jax.tools.bench --config configs/base64.py --steps 0 --text_dim 4096   # FLOPs only

Runs the real jitted train step (frozen T5 + U-Net + optimizer + EMA, sharded over all devices), built by the
same `train.setup.setup` call as training, on random images and captions, after one compile step. FLOPs come
from XLA's cost analysis of the compiled step; MFU = achieved FLOP/s / (peak_tflops per device x devices).
Without `config.text.encoder` a random one-layer T5 of width --text_dim stands in (its cost is small next to the
U-Net's, its width sets the text projections).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import ml_collections
import numpy as np

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage.model import train_size
from imagen_jax.text import make_tiny_t5
from imagen_jax.train import setup as setup_lib

CAPTIONS = ["a red circle on the left", "a photograph of a corgi wearing sunglasses on the beach"]


def benchmark(config: ml_collections.ConfigDict, *, steps: int, text_dim: int, peak_tflops: float | None) -> dict:
    """Compiles and times `steps` train steps (0: FLOPs only, nothing allocated); returns the figures."""
    mesh = mesh_lib.make_mesh(config.mesh)
    with tempfile.TemporaryDirectory() as tmp:
        if not config.text.encoder:
            config.text.encoder = make_tiny_t5(
                os.path.join(tmp, "t5"),
                CAPTIONS,
                d_model=text_dim,
                num_layers=1,
                num_heads=max(1, text_dim // 64),
                d_kv=min(64, text_dim),
                d_ff=2 * text_dim,
            )
        config.data.precomputed_text = False
        text = setup_lib.load_text(config, mesh)
    trainer = setup_lib.setup(config, mesh, text)
    batch_size, size = config.train.batch_size, train_size(config)  # SR: trained on crops
    ids, mask = text.encoder.tokenizer([CAPTIONS[i % 2] for i in range(batch_size)], config.text.max_length)
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
    batch = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, mesh)
    num_params = trainer.model.num_params
    if steps == 0:  # FLOPs only: lowered on abstract shapes, so not even base64's state is allocated.
        cost = trainer.train_step.lower(trainer.abstract_state(), text.params, batch).cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
        return {
            "unet_params_M": round(num_params / 1e6, 2),
            "image_size": size,
            "global_batch": batch_size,
            "gflop_per_step": round(flops / 1e9, 1),
            "gflop_per_image": round(flops / 1e9 / batch_size, 1),
        }
    state = trainer.init_state()

    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, text.params, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = compiled(state, text.params, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, text.params, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
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
        "gflop_per_image": round(flops / 1e9 / batch_size, 1),
        "achieved_tflops": round(flops / step_s / 1e12, 3),
    }
    if peak_tflops:
        result["mfu"] = round(flops / step_s / (peak_tflops * 1e12 * jax.device_count()), 4)
    return result
