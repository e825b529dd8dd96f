"""The imagen-jax side of side_by_side.py, in the project's own venv: the stage config of a matched layout, its
real jitted train step (`train.setup`, as training and tools.bench build it) and the stage's sampler.

Text is random T5-shaped embeddings (`data.precomputed_text`: no encoder in the step, as on the peer's side,
which is given `text_embeds`); everything computes in float32, as the peer's CPU torch does.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from matmul_flops import function_flops

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import config as config_lib
from imagen_jax.stage import sampling
from imagen_jax.tools.bench_step import random_batch
from imagen_jax.train import setup as setup_lib


def stage_config(layout: dict) -> ml_collections.ConfigDict:
    """A base stage's config for `layout` (layouts.LAYOUTS[name]): its model and train fields, size, batch and
    text."""
    config = config_lib.base_config("unet")
    config.model.update(layout["ours"])
    config.train.update(layout.get("ours_train", {}))
    config.data.image_size = layout["image_size"]
    config.data.precomputed_text = True
    config.text.max_length = layout["text_len"]
    config.train.batch_size = layout["batch"]
    config.train.compute_dtype = "float32"
    config.train.sample_steps = layout["sample_steps"]
    config.train.sample_guidance_scale = layout["guidance"]
    config.mesh.data = 1  # one device: the CPU the peer's torch also runs on
    config_lib.validate(config)
    return config


def count(layout: dict) -> dict:
    """Parameters and counted FLOPs (matmul_flops) of one train step, from shapes alone: the model's, with plain
    attention (chunked attention's backward recomputes its forward, which is not the model's work)."""
    config = stage_config(layout)
    config.train.attention = "dot_product"
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    text = setup_lib.Text(None, {}, {}, layout["text_dim"], "random embeddings")
    trainer = setup_lib.setup(config, mesh, text)
    batch = jax.eval_shape(lambda: random_batch(config, text, mesh))
    flops = function_flops(trainer.train_step, trainer.abstract_state(), text.params, batch, trainer.no_streak(True))
    return {"params": trainer.model.num_params, "flops": flops}


class Ours:
    """One stage built once (state, compiled step, a fixed random batch), timed in rounds like the peer."""

    def __init__(self, layout: dict):
        self.config = config = stage_config(layout)
        self.mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
        self.text = setup_lib.Text(None, {}, {}, layout["text_dim"], "random embeddings")
        self.trainer = trainer = setup_lib.setup(config, self.mesh, self.text)
        self.batch = random_batch(config, self.text, self.mesh)
        self.state, self.streak = trainer.init_state(), trainer.no_streak()
        self.step = trainer.train_step.lower(self.state, self.text.params, self.batch, self.streak).compile()
        self.train(1)  # warm-up

    def train(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.text.params, self.batch, self.streak)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            self.streak = metrics["nonfinite_streak"]
        return times

    def sample(self, images: int, steps: int, guidance: float) -> float:
        """Seconds to sample `images` images (the EMA weights, DDPM, classifier-free guidance); the first call
        includes compiling, so the driver makes one untimed call first."""
        text = np.asarray(self.batch["text"][:images])
        mask = np.asarray(self.batch["mask"][:images])
        start = time.perf_counter()
        x = sampling.sample(
            self.config,
            self.trainer.model.denoiser,
            self.state["ema"],
            text,
            mask,
            list(range(images)),
            mesh=self.mesh,
            steps=steps,
            guidance_scale=guidance,
        )
        elapsed = time.perf_counter() - start
        if x.shape != (images, self.config.data.image_size, self.config.data.image_size, 3):
            raise RuntimeError(f"sampled shape {x.shape}")
        return elapsed
