"""Train-step throughput of a config on this machine's devices: images/s, FLOPs per step and MFU.

    python -m imagen_jax.tools.bench --config configs/demo.py [--steps 20] [--peak_tflops 989] [--config.a.b=...]
    python -m imagen_jax.tools.bench --config configs/base64.py --steps 0 --t5 xxl   # FLOPs only, T5-XXL in the step

Runs the real jitted train step (frozen T5 + U-Net + optimizer + EMA, sharded over all devices), built by the
same `train.setup.setup` call as training, on random images and captions, after one compile step.

Two FLOP counts per step. `gflop_per_step` is XLA's cost analysis of the compiled step: everything it executes,
element-wise work, the optimizer and a remat policy's recomputed forward included, but a compiled loop's body
only once (micro-batches) and nothing inside a library call such as cuDNN's fused attention. `model_gflop_per_step`
is the model's work counted from shapes (`plan.matmul_flops`: 2 x the multiply-adds of every matrix product and
convolution of the step, attention's included) with remat off and plain attention, so it is the same for every
remat policy, attention kind and backend. MFU = model FLOPs per second / (peak_tflops per device x devices),
the usual definition (PaLM's). On a GPU or TPU, `peak_device_memory_gib` is the first device's peak allocation
(the state, the step's activations and XLA's scratch): how close the batch is to filling it.
The T5 in the step is `config.text.encoder` (a T5 folder) if set; else, with --t5 xxl|xl|large|CONFIG_JSON, a T5
of that real shape with random weights, born sharded (T5-XXL costs ~1.2 TFLOP per caption: its real share of the
step); else a random one-layer T5 of width --text_dim (its cost is small next to the U-Net's, its width sets the
text projections). With --config.data.precomputed_text=True the step has no T5 at all (embeddings are inputs),
which is what training on `tools.encode_text` shards costs: the two runs side by side say what precomputing saves.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from imagen_jax.flax_settings import init_rngs
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage.model import train_size
from imagen_jax.text import make_tiny_t5
from imagen_jax.text.t5 import T5EncoderModule
from imagen_jax.train import plan as plan_lib
from imagen_jax.train import setup as setup_lib

CAPTIONS = ["a red circle on the left", "a photograph of a corgi wearing sunglasses on the beach"]


def progress(message: str) -> None:
    """A line on stderr for each long phase (a 2B-parameter step takes minutes to trace and compile), so a run
    stopped early shows how far it got; the figures alone go to stdout."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def random_text(config: ml_collections.ConfigDict, t5: str, mesh: jax.sharding.Mesh, abstract: bool) -> setup_lib.Text:
    """A T5 of the shape `t5` names (xxl | xl | large | a config.json) with random weights created directly in
    their shardings (or, `abstract`, only their shapes); precomputed text: no encoder, only its width."""
    text = plan_lib.abstract_text(config, t5, mesh)
    if abstract or text.encoder is None:
        return text
    module = text.encoder.module
    params = jax.jit(
        lambda: nnx.state(T5EncoderModule(module.cfg, dtype=module.dtype, rngs=init_rngs(0))),
        out_shardings=text.shardings,
    )()
    description = text.description.replace("(shapes only)", "(random weights)")
    return setup_lib.Text(text.encoder.with_state(params), params, text.shardings, text.dim, description)


def random_batch(config: ml_collections.ConfigDict, text: setup_lib.Text, mesh: jax.sharding.Mesh) -> dict:
    """Random images and captions (tokenised, or random ids for a T5 without a tokenizer, or random embeddings)."""
    rng = np.random.default_rng(0)
    batch_size, size, length = config.train.batch_size, train_size(config), config.text.max_length
    local = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)}  # as the data pipeline
    if text.encoder is None:
        local["text"] = rng.normal(size=(batch_size, length, text.dim)).astype(jnp.bfloat16)
        local["mask"] = np.ones((batch_size, length), bool)
    elif text.encoder.tokenizer is None:
        local["ids"] = rng.integers(1, text.encoder.module.cfg.vocab_size, (batch_size, length)).astype(np.int32)
        local["mask"] = np.ones((batch_size, length), bool)  # T5 costs the same whatever the mask
    else:
        local["ids"], local["mask"] = text.encoder.tokenizer([CAPTIONS[i % 2] for i in range(batch_size)], length)
    return mesh_lib.global_batch(local, mesh)


def benchmark(
    config: ml_collections.ConfigDict, *, steps: int, text_dim: int, peak_tflops: float | None, t5: str | None = None
) -> dict:
    """Compiles and times `steps` train steps (0: FLOPs only, nothing allocated); returns the figures."""
    mesh = mesh_lib.make_mesh(config.mesh)
    if t5 is not None or config.data.precomputed_text:
        text = random_text(config, t5 or "xxl", mesh, abstract=steps == 0)
    else:
        text = _real_or_tiny_text(config, mesh, text_dim)
    trainer = setup_lib.setup(config, mesh, text)
    batch_size, size = config.train.batch_size, train_size(config)  # SR: trained on crops
    batch = random_batch(config, text, mesh)
    num_params = trainer.model.num_params
    t5_params = sum(math.prod(x.shape) for x in jax.tree.leaves(text.params))
    progress(f"U-Net {num_params / 1e6:.1f}M params, batch {batch_size}; tracing the train step")
    start = time.perf_counter()
    traced = trainer.train_step.trace(trainer.abstract_state(), text.params, batch, trainer.no_streak(abstract=True))
    progress(f"traced in {time.perf_counter() - start:.1f} s; counting the model's FLOPs")
    start = time.perf_counter()
    counted = model_flops(config, mesh, text, traced.jaxpr)
    progress(f"{counted / 1e9:.4g} GFLOP per step, counted in {time.perf_counter() - start:.1f} s")
    if steps == 0:  # FLOPs only: lowered on abstract shapes, so not even base64's state is allocated.
        cost = traced.lower().cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
        return {
            "unet_params_M": round(num_params / 1e6, 2),
            "t5_params_M": round(t5_params / 1e6, 2),
            "text": text.description,
            "image_size": size,
            "global_batch": batch_size,
            "gflop_per_step": round(flops / 1e9, 4),
            "gflop_per_image": round(flops / 1e9 / batch_size, 1),
            "model_gflop_per_step": round(counted / 1e9, 4),
        }
    return _time(trainer, traced, text, batch, steps, peak_tflops, t5_params, counted)


def model_flops(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, text: setup_lib.Text, step_jaxpr: Any
) -> float:
    """FLOPs of the model's matrix products and convolutions in one train step, counted from the shapes of the
    step's jaxpr traced with `train.remat` 'none' and plain `dot_product` attention (a recomputed forward is not
    the model's work, and a Pallas kernel hides its matmuls from the jaxpr): `step_jaxpr`, the benchmarked step's
    own, when the config is already so (one trace of a 2B-parameter step saved), else a second trace; nothing is
    allocated or compiled."""
    if config.train.remat == "none" and config.train.attention == "dot_product":
        return plan_lib.matmul_flops(step_jaxpr)
    config = config.copy_and_resolve_references()
    config.train.remat, config.train.attention = "none", "dot_product"
    trainer = setup_lib.setup(config, mesh, text)
    batch = jax.eval_shape(lambda: random_batch(config, text, mesh))
    jaxpr = jax.make_jaxpr(trainer.train_step)(
        trainer.abstract_state(), text.params, batch, trainer.no_streak(abstract=True)
    )
    return plan_lib.matmul_flops(jaxpr)


def _real_or_tiny_text(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, text_dim: int) -> setup_lib.Text:
    """config.text.encoder's T5, or a random one-layer stand-in of width `text_dim` when it is not set."""
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
        return setup_lib.load_text(config, mesh)


def _time(trainer: setup_lib.TrainSetup, traced: Any, text: setup_lib.Text, batch: dict, steps: int,
          peak_tflops: float | None, t5_params: int, counted: float) -> dict:  # fmt: skip
    config = trainer.config
    batch_size, size, num_params = config.train.batch_size, train_size(config), trainer.model.num_params
    progress("lowering and compiling the train step")
    start = time.perf_counter()
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    progress(f"compiled in {compile_s:.1f} s; initialising the train state")
    start = time.perf_counter()
    state, streak = trainer.init_state(), trainer.no_streak()
    jax.block_until_ready(state)
    progress(f"initialised in {time.perf_counter() - start:.1f} s; one warm-up step, then {steps} timed")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = compiled(state, text.params, batch, streak)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, text.params, batch, metrics["nonfinite_streak"])
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    result = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "unet_params_M": round(num_params / 1e6, 2),
        "t5_params_M": round(t5_params / 1e6, 2),
        "text": text.description,
        "image_size": size,
        "global_batch": batch_size,
        "compute_dtype": config.train.compute_dtype,
        "compile_s": round(compile_s, 1),
        "step_ms": round(step_s * 1e3, 1),
        "images_per_s": round(batch_size / step_s, 1),
        "images_per_s_per_device": round(batch_size / step_s / jax.device_count(), 1),
        "gflop_per_step": round(flops / 1e9, 4),
        "gflop_per_image": round(flops / 1e9 / batch_size, 1),
        "achieved_tflops": round(flops / step_s / 1e12, 3),
        "model_gflop_per_step": round(counted / 1e9, 4),
        "model_tflops": round(counted / step_s / 1e12, 3),
    }
    # What the state holds per device: frozen parameters (train.trainable, LoRA) have no optimizer state.
    held = trainer.abstract_state()
    for part in ("params", "ema", "opt_state"):
        result[f"{part}_mib_per_device"] = round(plan_lib.bytes_per_device(held[part]) / 2**20, 2)
    stats = jax.devices()[0].memory_stats()  # None on CPU
    if stats and "peak_bytes_in_use" in stats:
        result["peak_device_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    if peak_tflops:
        result["mfu"] = round(counted / step_s / (peak_tflops * 1e12 * jax.device_count()), 4)
    return result
