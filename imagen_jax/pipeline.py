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
class StageSpec:
    """A stage as its config describes it: enough to check a cascade's wiring before any weights load."""

    workdir: str
    config: ml_collections.ConfigDict

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def lowres_size(self) -> int | None:
        """The input resolution of an SR stage; None for the base stage."""
        return int(self.config.model.lowres_size) if state_lib.is_super_resolution(self.config) else None

    def describe(self) -> str:
        """'unet, 64x64' for a base stage, 'efficient_unet, 64->256' for an SR stage."""
        kind = self.config.model.get("kind", "unet")
        if self.lowres_size is None:
            return f"{kind}, {self.image_size}x{self.image_size}"
        return f"{kind}, {self.lowres_size}->{self.image_size}"


@dataclasses.dataclass
class Stage(StageSpec):
    """One trained diffusion U-Net with its config and EMA weights."""

    params: Any
    apply_fn: Callable
    step: int

    @classmethod
    def load(cls, workdir: str, *, text_dim: int) -> "Stage":
        """A workdir's latest checkpoint, or an export folder; `text_dim`: the stage's T5 width."""
        mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices())
        replicated = mesh_lib.replicated(mesh)
        if export_lib.is_export(workdir):
            config, params, metadata = export_lib.read_export(workdir)
            check_stage_config(f"{workdir}/{export_lib.CONFIG_FILE}", config)
            if metadata["text_dim"] != text_dim:
                raise ValueError(f"{workdir}: exported for a T5 of width {metadata['text_dim']}, the encoder has {text_dim}")
            graphdef, abstract = _abstract_params(config, text_dim)
            _check_shapes(workdir, abstract, params)
            return cls(workdir=workdir, config=config, params=jax.device_put(params, replicated),
                       apply_fn=make_apply_fn(graphdef), step=int(metadata["step"]))
        checkpointer, step = _open(workdir)
        try:
            config = checkpoint_config(checkpointer, workdir, step)
            graphdef, abstract = _abstract_params(config, text_dim)
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
            try:
                params = checkpointer.restore_ema(step, target)
            except (KeyError, ValueError, OSError) as e:  # orbax: a missing item, shapes, unreadable files
                raise ValueError(f"{checkpoint_dir(workdir)}/{step}: cannot restore the EMA weights of the model "
                                 f"its config describes (text width {text_dim}): {_first_line(e)}") from e
        finally:
            checkpointer.close()
        return cls(workdir=workdir, config=config, params=params, apply_fn=make_apply_fn(graphdef), step=step)

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


def _first_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def checkpoint_config(checkpointer: Checkpointer, workdir: str, step: int) -> ml_collections.ConfigDict:
    """The stage config saved with checkpoint `step`; a missing or unreadable one is a ValueError naming it."""
    where = f"{checkpoint_dir(workdir)}/{step}/config"
    try:
        config = checkpointer.restore_config(step)
    except (KeyError, ValueError, OSError) as e:  # orbax: item not saved; JSON that does not parse
        raise ValueError(f"{where}: cannot read the stage config: {_first_line(e)}") from e
    check_stage_config(where, config)
    return config


def check_stage_config(source: str, config: Any) -> None:
    """Raises ValueError (naming `source`) unless `config` has what sampling a stage reads."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{source}: not a stage config (a JSON object), got {type(config).__name__}")
    for key in ("data.image_size", "model", "text.encoder", "text.max_length", "diffusion.schedule"):
        _require(source, config, key)
    kind = config.model.get("kind", "unet")
    if kind not in state_lib.MODEL_KINDS:
        raise ValueError(f"{source}: model.kind {kind!r} is not one of {sorted(state_lib.MODEL_KINDS)}")
    if state_lib.is_super_resolution(config):
        _require(source, config, "model.lowres_size")


def _require(source: str, config: ml_collections.ConfigDict, key: str) -> None:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"{source}: not a stage config (no {key})")
        node = node[part]


def stage_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a workdir's latest checkpoint, or of an export folder (checked to describe a stage)."""
    if export_lib.is_export(workdir):
        config = export_lib.read_config(workdir)
        check_stage_config(f"{workdir}/{export_lib.CONFIG_FILE}", config)
        return config
    checkpointer, step = _open(workdir)
    try:
        return checkpoint_config(checkpointer, workdir, step)
    finally:
        checkpointer.close()


def check_cascade(stages: Sequence[StageSpec]) -> None:
    """The first stage is a base model; each later one is an SR stage whose input size is the previous output.

    Called on the configs alone (`StageSpec`s) before any weights load, so a wrongly ordered command fails fast.
    """
    if not stages:
        raise ValueError("a cascade needs at least the base stage")
    first = stages[0]
    if first.lowres_size is not None:
        raise ValueError(
            f"the first stage ({first.workdir}) is a super-resolution stage ({first.describe()}), not a base stage: "
            f"pass the base stage (making the {first.lowres_size}x{first.lowres_size} images it takes) first "
            "(sample.py --workdir), then the SR stages (--sr_workdir)"
        )
    chain = " -> ".join(f"{s.workdir} ({s.describe()})" for s in stages)
    for previous, stage in zip(stages, stages[1:]):
        if stage.lowres_size is None:
            raise ValueError(
                f"stage {stage.workdir} is a base stage ({stage.describe()}), not a super-resolution stage: only the "
                f"first stage (sample.py --workdir) is a base stage; the cascade given: {chain}"
            )
        if stage.lowres_size != previous.image_size:
            raise ValueError(
                f"stage {stage.workdir} takes {stage.lowres_size}x{stage.lowres_size} input, but the stage before it "
                f"({previous.workdir}) makes {previous.image_size}x{previous.image_size} images; the cascade given: "
                f"{chain}"
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
        specs = [StageSpec(workdir=w, config=stage_config(w)) for w in workdirs]
        check_cascade(specs)  # before the encoder and any weights load
        config = specs[0].config
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
