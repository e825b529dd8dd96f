"""The cascade for sampling: prompts -> frozen T5 (once) -> base stage -> images.

Each stage is loaded from its training workdir: the config saved with the checkpoint and the EMA weights
of the latest checkpoint (no optimizer state is read).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from imagen_jax.diffusion import sample as diffusion_sample
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder
from imagen_jax.train import state as state_lib
from imagen_jax.train.checkpoint import Checkpointer, checkpoint_dir
from imagen_jax.train.step import make_apply_fn


@dataclasses.dataclass
class Stage:
    """One trained diffusion U-Net with its config and EMA weights."""

    config: ml_collections.ConfigDict
    params: Any
    apply_fn: Callable
    step: int
    workdir: str

    @classmethod
    def load(cls, workdir: str, *, text_dim: int) -> "Stage":
        """Latest checkpoint of `workdir`; `text_dim` is the width of the T5 the stage was trained with."""
        checkpointer, step = _open(workdir)
        config = checkpointer.restore_config(step)
        mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices())
        abstract_model = nnx.eval_shape(lambda: state_lib.build_model(config, text_dim))
        graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        replicated = mesh_lib.replicated(mesh)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), nnx.to_pure_dict(abstract_params)
        )
        params = checkpointer.restore_ema(step, target)
        checkpointer.close()
        return cls(config=config, params=params, apply_fn=make_apply_fn(graphdef), step=step, workdir=workdir)

    def sample(
        self,
        text: jax.Array,
        text_mask: jax.Array,
        seeds: Sequence[int],
        *,
        steps: int,
        guidance_scale: float,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Images in [-1,1], [B,S,S,3]; image i depends only on seeds[i] and its own text."""
        size = self.config.data.image_size
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, dtype=jnp.uint32))
        x = diffusion_sample(
            self.apply_fn, self.params, text, text_mask, keys,
            shape=(len(seeds), size, size, 3), steps=steps, guidance_scale=guidance_scale,
            schedule=self.config.diffusion.schedule, objective=self.config.diffusion.objective,
            thresholding=self.config.diffusion.thresholding,
            percentile=self.config.diffusion.dynamic_threshold_percentile, progress=progress,
            chunk_size=None if progress is None else max(1, steps // 10),
        )
        return np.asarray(jax.device_get(x))


def _open(workdir: str) -> tuple[Checkpointer, int]:
    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False, read_only=True)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)} (train the stage first, or check --workdir)")
    return checkpointer, step


def stage_config(workdir: str) -> ml_collections.ConfigDict:
    """The config saved with the latest checkpoint of `workdir`."""
    checkpointer, step = _open(workdir)
    config = checkpointer.restore_config(step)
    checkpointer.close()
    return config


class Imagen:
    """Text encoder + stages. `Imagen.load([base_workdir])` then `imagen(prompts, seeds, ...)`."""

    def __init__(self, encoder: T5Encoder, stages: list[Stage]):
        self.encoder = encoder
        self.stages = stages

    @classmethod
    def load(cls, workdirs: Sequence[str]) -> "Imagen":
        if not workdirs:
            raise ValueError("Imagen.load needs at least the base stage's workdir")
        config = stage_config(workdirs[0])
        encoder = T5Encoder.from_pretrained(config.text.encoder, dtype=state_lib.compute_dtype(config.text.dtype))
        return cls(encoder, [Stage.load(w, text_dim=encoder.dim) for w in workdirs])

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        return self.encoder.encode(list(prompts), max_length=self.stages[0].config.text.max_length)

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: Sequence[int],
        guidance_scales: Sequence[float],
        progress: Callable[[int, int, int], None] | None = None,
    ) -> list[np.ndarray]:
        """One entry per stage: the images at that stage's resolution, [-1,1]. Prompts are encoded once."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        text, mask = self.encode(prompts)
        outputs = []
        for index, stage in enumerate(self.stages):
            report = None if progress is None else (lambda done, total, i=index: progress(i, done, total))
            outputs.append(stage.sample(text, mask, seeds, steps=steps[index], guidance_scale=guidance_scales[index], progress=report))
        return outputs
