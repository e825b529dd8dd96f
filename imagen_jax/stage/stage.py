"""A trained stage, loaded for sampling: its config and EMA weights from a training workdir's latest checkpoint
(no optimizer state is read) or from an export folder (`imagen_jax.stage.export`).

`StageSpec` is the config alone, enough to check a cascade's wiring before any weights load; `Stage` adds the
weights, placed on a mesh (`model.local_mesh`: split over this host's devices by the config's mesh.rules), and
samples through `stage.sampling.sample` with the batch split over the same devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from imagen_jax.diffusion import Denoiser
from imagen_jax.errors import MissingError, StageError, first_line
from imagen_jax.stage import export as export_lib
from imagen_jax.stage import if_folder, lora, sampling
from imagen_jax.stage.checkpoint import Checkpointer, checkpoint_dir
from imagen_jax.stage.config import complete
from imagen_jax.stage.model import MODEL_KINDS, StageModel, lowres_size, shape_differences, stage_model
from imagen_jax.text import T5Encoder


@dataclasses.dataclass
class StageSpec:
    """A stage as its config describes it."""

    workdir: str
    config: ml_collections.ConfigDict

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def lowres_size(self) -> int | None:
        """The input resolution of an SR stage; None for the base stage."""
        return lowres_size(self.config)

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
    denoiser: Denoiser
    step: int
    mesh: Mesh  # where params live; sampling splits the batch over it

    @classmethod
    def load(
        cls,
        workdir: str,
        *,
        text_dim: int,
        mesh: Mesh,
        step: int | None = None,
        encoder: T5Encoder | None = None,
        config: ml_collections.ConfigDict | None = None,
        adapters: Sequence[tuple[str, float]] = (),
    ) -> Stage:
        """A workdir's checkpoint at `step` (default: the latest), an export folder, or a DeepFloyd IF pipeline
        folder (stage/if_folder.py; `encoder` encodes its unconditional input, the empty prompt), its weights read
        straight into their shardings on `mesh`; `text_dim`: the stage's T5 width. `config`: the folder's config as the
        caller adjusted it (`stage_config`, then e.g. another compute dtype, or an IF SR stage's low-res size);
        default: the folder's own. `adapters`: LoRA adapters files (tools.export --lora_only) with a scale each,
        merged into the weights (each checked to be made for this stage's parameters)."""
        if adapters:
            stage = cls.load(workdir, text_dim=text_dim, mesh=mesh, step=step, encoder=encoder, config=config)
            model = stage_model(stage.config, text_dim, mesh)
            stage.params = lora.apply_adapters(stage.params, list(adapters), model.param_shardings, workdir)
            return stage
        if if_folder.is_if_folder(workdir):
            if step is not None:
                raise StageError(f"{workdir} is a DeepFloyd IF folder (one set of weights); a step cannot be chosen")
            config = if_folder.if_config(workdir) if config is None else config
            model = stage_model(config, text_dim, mesh)
            params = if_folder.load_params(workdir, config, model.abstract_params, encoder)
            return cls(workdir=workdir, config=config, params=params, denoiser=model.denoiser, step=0, mesh=mesh)
        if export_lib.is_export(workdir):
            if step is not None:
                raise StageError(f"{workdir} is an export folder (one step); a checkpoint step cannot be chosen")
            saved, params, metadata = export_lib.read_export(workdir)
            config = checked_stage_config(f"{workdir}/{export_lib.CONFIG_FILE}", saved) if config is None else config
            if metadata["text_dim"] != text_dim:
                raise StageError(
                    f"{workdir}: exported for a T5 of width {metadata['text_dim']}, the encoder has {text_dim}"
                )
            model = stage_model(config, text_dim, mesh)
            differences = shape_differences(params, model.abstract_params, "export")
            if differences:
                raise StageError(
                    f"{workdir}: weights do not fit the model its config describes (first: {differences[0]})"
                )
            params = jax.device_put(params, model.param_shardings)
            step = int(metadata["step"])
            return cls(workdir=workdir, config=config, params=params, denoiser=model.denoiser, step=step, mesh=mesh)
        checkpointer, step = open_checkpoint(workdir, step)
        try:
            config = checkpoint_config(checkpointer, workdir, step) if config is None else config
            model = stage_model(config, text_dim, mesh)
            params = restore_weights(checkpointer, workdir, step, config, model, text_dim)
        finally:
            checkpointer.close()
        return cls(workdir=workdir, config=config, params=params, denoiser=model.denoiser, step=step, mesh=mesh)

    def sample(
        self,
        text: jax.Array,
        text_mask: jax.Array,
        seeds: Sequence[int],
        *,
        steps: int | str,
        guidance_scale: float,
        sampler: str = "ddpm",
        lowres: np.ndarray | None = None,
        sr_noise_level: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        noise: np.ndarray | None = None,
        lowres_noise: np.ndarray | None = None,
        **editing: Any,
    ) -> np.ndarray:
        """Images in [-1,1], [B,S,S,3] (see `stage.sampling.sample`; the SR noise level defaults to the config's;
        `noise` and `lowres_noise` replace the seeds' draws; `editing`: its inpainting, image-to-image and
        guidance options)."""
        return sampling.sample(
            self.config,
            self.denoiser,
            self.params,
            text,
            text_mask,
            seeds,
            mesh=self.mesh,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            lowres=lowres,
            sr_noise_level=sr_noise_level,
            progress=progress,
            noise=noise,
            lowres_noise=lowres_noise,
            **editing,
        )


def restore_ema(checkpointer: Checkpointer, workdir: str, step: int, abstract_params: Any, text_dim: int) -> Any:
    """The EMA weights of checkpoint `step`, into the shardings `abstract_params` carries; a StageError that
    names the step when they do not fit (e.g. a T5 of another width)."""
    try:
        return checkpointer.restore_ema(step, abstract_params)
    except (KeyError, ValueError, OSError) as e:  # orbax: a missing item, shapes, unreadable files
        raise StageError(
            f"{checkpoint_dir(workdir)}/{step}: cannot restore the EMA weights of the model "
            f"its config describes (text width {text_dim}): {first_line(e)}"
        ) from e


def restore_weights(
    checkpointer: Checkpointer,
    workdir: str,
    step: int,
    config: ml_collections.ConfigDict,
    model: StageModel,
    text_dim: int,
    *,
    merge: bool = True,
) -> Any:
    """The EMA weights of checkpoint `step` in `model`'s shardings; a LoRA run's (train.lora_rank) with its adapters
    merged into their kernels, or beside them with `merge=False` (what tools.export --lora_only writes)."""
    abstract, _ = lora.with_adapters(config, model.abstract_params, model.param_shardings)
    params = restore_ema(checkpointer, workdir, step, abstract, text_dim)
    if not merge or not lora.rank(config):
        return params
    return jax.jit(lambda p: lora.merged(config, p), out_shardings=model.param_shardings)(params)


def open_checkpoint(workdir: str, step: int | None = None) -> tuple[Checkpointer, int]:
    """A read-only Checkpointer of `workdir` and the step to read: `step`, or the newest. A MissingError names
    the folder when there is no checkpoint, or no checkpoint at `step` (listing the steps there are)."""
    checkpointer = Checkpointer(workdir, every=1, keep=1, async_save=False, read_only=True)
    steps = sorted(checkpointer.manager.all_steps())
    if not steps or (step is not None and step not in steps):
        checkpointer.close()
        if not steps:
            raise MissingError(
                f"no checkpoint in {checkpoint_dir(workdir)} (train the stage first, or check --workdir)"
            )
        raise MissingError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)} (steps: {steps})")
    return checkpointer, steps[-1] if step is None else step


def checkpoint_config(checkpointer: Checkpointer, workdir: str, step: int) -> ml_collections.ConfigDict:
    """The stage config saved with checkpoint `step`; a missing or unreadable one is a StageError naming it."""
    where = f"{checkpoint_dir(workdir)}/{step}/config"
    try:
        config = checkpointer.restore_config(step)
    except (KeyError, ValueError, OSError) as e:  # orbax: item not saved; JSON that does not parse
        raise StageError(f"{where}: cannot read the stage config: {first_line(e)}") from e
    return checked_stage_config(where, config)


def checked_stage_config(source: str, config: Any) -> ml_collections.ConfigDict:
    """`config`, completed with the defaults of fields added since it was saved; a StageError naming `source`
    unless it has what sampling a stage reads."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise StageError(f"{source}: not a stage config (a JSON object), got {type(config).__name__}")
    for key in ("data.image_size", "model", "text.encoder", "text.max_length", "diffusion.schedule"):
        _require(source, config, key)
    kind = config.model.get("kind", "unet")
    if kind not in MODEL_KINDS:
        raise StageError(f"{source}: model.kind {kind!r} is not one of {sorted(MODEL_KINDS)}")
    if MODEL_KINDS[kind].super_resolution(config.model):
        _require(source, config, "model.lowres_size")
    return complete(config)


def _require(source: str, config: ml_collections.ConfigDict, key: str) -> None:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise StageError(f"{source}: not a stage config (no {key})")
        node = node[part]


def stage_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config of a workdir's checkpoint at `step` (default: the latest), of an export folder (checked to
    describe a stage), or of a DeepFloyd IF pipeline folder."""
    if if_folder.is_if_folder(workdir):
        return if_folder.if_config(workdir)
    if export_lib.is_export(workdir):
        return checked_stage_config(f"{workdir}/{export_lib.CONFIG_FILE}", export_lib.read_config(workdir))
    checkpointer, step = open_checkpoint(workdir, step)
    try:
        return checkpoint_config(checkpointer, workdir, step)
    finally:
        checkpointer.close()
