"""Sampling speed of a config's U-Net: the split model (text conditioning once per prompt) against the whole
model called at every step (the text projected, pooled and turned into keys and values at each step, the
unconditional half of the guided batch included), measured in the same run.

Both run the real `stage.sampling.sample` (the jitted sampler loop, on this host's mesh) with the config's
U-Net at its initial weights and random T5 embeddings of width `text_dim`. Rounds alternate the two, after one
compiling call of each, so machine drift hits both; the figures are milliseconds per image and step (one model
evaluation, on the doubled batch when guided), as medians with their range, and the median ratio.
"""

from __future__ import annotations

import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from imagen_jax import diffusion
from imagen_jax.stage import sampling
from imagen_jax.stage.model import build_model, local_mesh, lowres_size, make_apply_fn, stage_model

TEXT_VALID = 16  # valid tokens per prompt (the rest masked), as a short caption


def benchmark_speed(
    config: ml_collections.ConfigDict,
    *,
    text_dim: int,
    images: int,
    steps: int,
    guidance_scale: float,
    sampler: str,
    rounds: int,
) -> dict:
    """Times `rounds` sampling calls of `images` images x `steps` steps each way; returns the figures."""
    mesh = local_mesh()
    model = stage_model(config, text_dim, mesh)
    params = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(build_model(config, text_dim), nnx.Param)),
        out_shardings=model.param_shardings,
    )()
    rng = np.random.default_rng(0)
    length = int(config.text.max_length)
    text = rng.normal(size=(images, length, text_dim)).astype(np.float32)
    mask = np.arange(length)[None, :].repeat(images, 0) < TEXT_VALID
    low = lowres_size(config)
    lowres = None if low is None else rng.uniform(-1, 1, (images, low, low, 3)).astype(np.float32)
    ways = {"whole": diffusion.fused(make_apply_fn(model.graphdef)), "split": model.denoiser}

    def run(denoiser: diffusion.Denoiser) -> float:
        start = time.perf_counter()
        sampling.sample(
            config, denoiser, params, text, mask, list(range(images)), mesh=mesh, steps=steps,
            guidance_scale=guidance_scale, sampler=sampler, lowres=lowres,
        )  # fmt: skip
        return (time.perf_counter() - start) * 1e3 / (images * steps)

    for denoiser in ways.values():
        run(denoiser)  # compile outside the timing
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, denoiser in ways.items():
            times[name].append(run(denoiser))
    ratios = [whole / split for whole, split in zip(times["whole"], times["split"])]
    result = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "image_size": int(config.data.image_size),
        "text": f"{length} tokens ({TEXT_VALID} valid) of width {text_dim}",
        "unet_params_M": round(model.num_params / 1e6, 2),
        "sampling": f"{images} images x {steps} {sampler} steps, guidance {guidance_scale:g}, {rounds} rounds",
    }
    for name, values in times.items():
        result[f"{name}_ms_per_image_step"] = _summary(values)
    result["speedup"] = _summary(ratios)
    return result


def _summary(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }
