"""The cascade for sampling: prompts -> frozen T5 (once) -> base stage -> SR stage(s) -> images.

Each stage is loaded from its training workdir (the config saved with the latest checkpoint and its EMA
weights; no optimizer state is read) or from a folder written by `imagen_jax.tools.export`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from imagen_jax import export as export_lib
from imagen_jax.diffusion import augment
from imagen_jax.diffusion import sample as diffusion_sample
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder
from imagen_jax.train import state as state_lib
from imagen_jax.train.checkpoint import Checkpointer, checkpoint_dir
from imagen_jax.train.step import make_apply_fn

# Sampling noise and low-res augmentation noise of image i both derive from seeds[i], kept apart by this.
_AUGMENT_STREAM = 0x5EED


@dataclasses.dataclass
class Stage:
    """One trained diffusion U-Net with its config and EMA weights."""

    config: ml_collections.ConfigDict
    params: Any
    apply_fn: Callable
    step: int
    workdir: str

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def lowres_size(self) -> int | None:
        """The input resolution of an SR stage; None for the base stage."""
        return int(self.config.model.lowres_size) if state_lib.is_super_resolution(self.config) else None

    @classmethod
    def load(cls, workdir: str, *, text_dim: int) -> "Stage":
        """A workdir's latest checkpoint, or an export folder; `text_dim`: the stage's T5 width."""
        mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices())
        replicated = mesh_lib.replicated(mesh)
        if export_lib.is_export(workdir):
            config, params, metadata = export_lib.read_export(workdir)
            if metadata["text_dim"] != text_dim:
                raise ValueError(f"{workdir}: exported for a T5 of width {metadata['text_dim']}, the encoder has {text_dim}")
            graphdef, abstract = _abstract_params(config, text_dim)
            _check_shapes(workdir, abstract, params)
            return cls(config, jax.device_put(params, replicated), make_apply_fn(graphdef), int(metadata["step"]), workdir)
        checkpointer, step = _open(workdir)
        config = checkpointer.restore_config(step)
        graphdef, abstract = _abstract_params(config, text_dim)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
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
        sampler: str = "ddpm",
        lowres: np.ndarray | None = None,
        sr_noise_level: float = 0.2,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Images in [-1,1], [B,S,S,3]; image i depends only on seeds[i], its text (and its low-res input)."""
        seeds = jnp.asarray(seeds, dtype=jnp.uint32)
        keys = jax.vmap(jax.random.key)(seeds)
        model_kwargs = None
        if self.lowres_size is not None:
            expected = (len(seeds), self.lowres_size, self.lowres_size, 3)
            if lowres is None or tuple(lowres.shape) != expected:
                got = None if lowres is None else tuple(lowres.shape)
                raise ValueError(f"stage {self.workdir} needs low-res input of shape {expected}, got {got}")
            augment_keys = jax.vmap(lambda k: jax.random.fold_in(k, _AUGMENT_STREAM))(keys)
            z, aug_t = augment.sampling_augmentation(
                jnp.asarray(lowres), sr_noise_level, augment_keys, self.config.diffusion.schedule
            )
            model_kwargs = {"lowres": z, "lowres_t": aug_t}
        x = diffusion_sample(
            self.apply_fn, self.params, text, text_mask, keys,
            shape=(len(seeds), self.image_size, self.image_size, 3), steps=steps, guidance_scale=guidance_scale,
            sampler=sampler, schedule=self.config.diffusion.schedule, objective=self.config.diffusion.objective,
            thresholding=self.config.diffusion.thresholding,
            percentile=self.config.diffusion.dynamic_threshold_percentile, progress=progress,
            chunk_size=None if progress is None else max(1, steps // 10), model_kwargs=model_kwargs,
        )
        return np.asarray(jax.device_get(x))


def _abstract_params(config: ml_collections.ConfigDict, text_dim: int) -> tuple[nnx.GraphDef, dict]:
    abstract_model = nnx.eval_shape(lambda: state_lib.build_model(config, text_dim))
    graphdef, abstract = nnx.split(abstract_model, nnx.Param)
    return graphdef, nnx.to_pure_dict(abstract)


def _check_shapes(source: str, abstract: dict, params: dict) -> None:
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != have:
        bad = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise ValueError(f"{source}: weights do not fit the model its config describes (first: {bad[0]})")


def _open(workdir: str) -> tuple[Checkpointer, int]:
    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False, read_only=True)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)} (train the stage first, or check --workdir)")
    return checkpointer, step


def stage_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a workdir's latest checkpoint, or of an export folder."""
    if export_lib.is_export(workdir):
        return export_lib.read_config(workdir)
    checkpointer, step = _open(workdir)
    config = checkpointer.restore_config(step)
    checkpointer.close()
    return config


def check_cascade(stages: Sequence[Stage]) -> None:
    """The first stage is a base model; each later one is an SR stage whose input size is the previous output."""
    if not stages:
        raise ValueError("a cascade needs at least the base stage")
    if stages[0].lowres_size is not None:
        raise ValueError(f"the first stage ({stages[0].workdir}) is a super-resolution stage; pass the base stage first")
    for previous, stage in zip(stages, stages[1:]):
        if stage.lowres_size is None:
            raise ValueError(f"stage {stage.workdir} is a base stage, not a super-resolution stage")
        if stage.lowres_size != previous.image_size:
            raise ValueError(
                f"stage {stage.workdir} takes {stage.lowres_size}x{stage.lowres_size} input, but the stage before it "
                f"({previous.workdir}) makes {previous.image_size}x{previous.image_size} images"
            )


class Imagen:
    """Text encoder + stages. `Imagen.load([base, sr1, ...])` then `imagen(prompts, seeds, ...)`."""

    def __init__(self, encoder: T5Encoder, stages: list[Stage]):
        check_cascade(stages)
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
        samplers: Sequence[str] | None = None,
        sr_noise_level: float = 0.2,
        progress: Callable[[int, int, int], None] | None = None,
    ) -> list[np.ndarray]:
        """One entry per stage: its images at its resolution, in [-1,1]. Prompts are encoded once."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        samplers = samplers or ["ddpm"] * len(self.stages)
        for name, values in (("steps", steps), ("guidance_scales", guidance_scales), ("samplers", samplers)):
            if len(values) != len(self.stages):
                raise ValueError(f"{len(values)} {name} for {len(self.stages)} stages")
        text, mask = self.encode(prompts)
        outputs: list[np.ndarray] = []
        for index, stage in enumerate(self.stages):
            report = None if progress is None else (lambda done, total, i=index: progress(i, done, total))
            outputs.append(stage.sample(
                text, mask, seeds, steps=steps[index], guidance_scale=guidance_scales[index], sampler=samplers[index],
                lowres=outputs[-1] if outputs else None, sr_noise_level=sr_noise_level, progress=report,
            ))
        return outputs
