"""The cascade for sampling: prompts -> frozen T5 (once) -> base stage -> SR stage(s) -> images.

Each stage (`imagen_jax.stage.Stage`) is loaded from its training workdir (the config saved with the latest
checkpoint and its EMA weights; no optimizer state is read) or from a folder written by
`imagen_jax.tools.export`; the cascade checks their order and sizes, encodes the prompts once and feeds each
stage's images to the next.

T5 and every stage's weights are split over this host's devices (`stage.model.local_mesh`, by each config's
mesh.rules, each tensor read straight into its shards) and each batch of prompts over the same devices; the
images are bit for bit those one device makes from the same seeds at the same per-device batch
(tests/test_sharded_sampling.py; on CPU, XLA picks kernels by shape, so other batch sizes differ in the last bits).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from imagen_jax import images as images_lib
from imagen_jax.diffusion import editing
from imagen_jax.errors import StageError
from imagen_jax.stage import lora, sampling
from imagen_jax.stage.if_folder import is_if_folder
from imagen_jax.stage.model import compute_dtype, local_mesh, stage_model, t5_shardings
from imagen_jax.stage.stage import Stage, StageSpec, stage_config
from imagen_jax.text import T5Config, T5Encoder


def check_cascade(stages: Sequence[StageSpec]) -> None:
    """The first stage is a base model; each later one is an SR stage whose input size is the previous output.

    Called on the configs alone (`StageSpec`s) before any weights load, so a wrongly ordered command fails fast.
    """
    if not stages:
        raise StageError("a cascade needs at least the base stage")
    first = stages[0]
    if first.lowres_size is not None:
        raise StageError(
            f"the first stage ({first.workdir}) is a super-resolution stage ({first.describe()}), not a base stage: "
            f"pass the base stage (making the {first.lowres_size}x{first.lowres_size} images it takes) first "
            "(sample.py --workdir), then the SR stages (--sr_workdir)"
        )
    chain = " -> ".join(f"{s.workdir} ({s.describe()})" for s in stages)
    for previous, stage in zip(stages, stages[1:]):
        if stage.lowres_size is None:
            raise StageError(
                f"stage {stage.workdir} is a base stage ({stage.describe()}), not a super-resolution stage: only the "
                f"first stage (sample.py --workdir) is a base stage; the cascade given: {chain}"
            )
        if stage.lowres_size != previous.image_size:
            raise StageError(
                f"stage {stage.workdir} takes {stage.lowres_size}x{stage.lowres_size} input, but the stage before it "
                f"({previous.workdir}) makes {previous.image_size}x{previous.image_size} images; the cascade given: "
                f"{chain}"
            )


def check_adapters(specs: Sequence[StageSpec], adapters: Sequence[tuple[int, str, float]], encoder: str) -> None:
    """Each (stage index, LoRA adapters file, scale) names a stage of `specs` whose parameters (by its config and the
    width of the T5 folder `encoder`, read from its config.json) are the adapters' base; a StageError if not."""
    if not adapters:
        return
    text_dim = T5Config.from_json(os.path.join(encoder, "config.json")).d_model
    for index, path, _ in adapters:
        if not 0 <= index < len(specs):
            raise StageError(f"LoRA adapters {path} for stage {index + 1}, but the cascade has {len(specs)} stages")
        _, metadata = lora.read_adapters(path)
        spec = specs[index]
        lora.check_base(path, metadata, stage_model(spec.config, text_dim, local_mesh()).abstract_params, spec.workdir)


class Imagen:
    """Text encoder + stages. `Imagen.load([base, sr1, ...])` then `imagen(prompts, seeds, ...)`."""

    def __init__(self, encoder: T5Encoder, stages: list[Stage], mesh: Mesh):
        check_cascade(stages)
        self.encoder = encoder
        self.stages = stages
        self.mesh = mesh  # where the encoder's parameters live (the stages' too)

    @classmethod
    def load(
        cls,
        workdirs: Sequence[str],
        steps: Sequence[int | None] | None = None,
        *,
        text_encoder: str | None = None,
        dtype: str | None = None,
        adapters: Sequence[tuple[int, str, float]] = (),
    ) -> Imagen:
        """The stages of `workdirs` (each its latest checkpoint, or `steps[i]`; an export folder; or a DeepFloyd IF
        pipeline folder) and their T5: the first stage's config.text.encoder, or the T5 folder `text_encoder`.
        `dtype` (float32 | bfloat16): T5's and the U-Nets' compute dtype (default: the configs' text.dtype and
        train.compute_dtype; float32 is the faster one on CPUs). `adapters`: (stage index, LoRA adapters file, scale)
        each, merged into that stage's weights; checked against the stage's parameters before any model loads.

        An IF super-resolution stage takes whatever size the stage before it makes (IF's pipeline upscales its
        input to the output size), so its low-res size follows that stage."""
        if not workdirs:
            raise StageError("Imagen.load needs at least the base stage's workdir")
        steps = list(steps) if steps is not None else [None] * len(workdirs)
        if len(steps) != len(workdirs):
            raise StageError(f"{len(steps)} checkpoint steps for {len(workdirs)} stages")
        specs = [StageSpec(workdir=w, config=stage_config(w, s)) for w, s in zip(workdirs, steps)]
        for previous, spec in zip(specs, specs[1:]):
            if is_if_folder(spec.workdir) and spec.lowres_size is not None:
                spec.config.model.lowres_size = previous.image_size
        for spec in specs:
            if dtype is not None:
                spec.config.text.dtype = spec.config.train.compute_dtype = dtype
        check_cascade(specs)  # before the encoder and any weights load
        config, mesh = specs[0].config, local_mesh()
        encoder_path = text_encoder or config.text.encoder
        if not encoder_path:
            raise StageError(
                f"{specs[0].workdir} names no T5 encoder (text.encoder is empty): pass a T5 folder "
                "(sample.py --text_encoder)"
            )
        check_adapters(specs, adapters, encoder_path)
        encoder = T5Encoder.from_pretrained(
            encoder_path,
            dtype=compute_dtype(config.text.dtype),
            place=lambda abstract: t5_shardings(config, abstract, mesh),
            lowercase=config.text.lowercase,
        )
        stages = [
            Stage.load(
                spec.workdir,
                text_dim=encoder.dim,
                mesh=mesh,
                step=s,
                encoder=encoder,
                config=spec.config,
                adapters=[(path, scale) for index, path, scale in adapters if index == i],
            )
            for i, (spec, s) in enumerate(zip(specs, steps))
        ]
        return cls(encoder, stages, mesh)

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """T5 embeddings and mask of `prompts`, the batch split over the mesh (`stage.sampling.encode`)."""
        ids, mask = self.encoder.tokenizer(list(prompts), self.stages[0].config.text.max_length)
        return sampling.encode(self.encoder, ids, mask, self.mesh)

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: Sequence[int],
        guidance_scales: Sequence[float],
        samplers: Sequence[str] | None = None,
        sr_noise_level: float | None = None,
        progress: Callable[[int, int, int], None] | None = None,
        init_images: np.ndarray | None = None,
        masks: np.ndarray | None = None,
        strengths: Sequence[float] | None = None,
        inpaint_resample: int = 1,
        inpaint_jump: int = 1,
        guidance_intervals: Sequence[tuple[float, float]] | None = None,
        guidance_rescales: Sequence[float] | None = None,
    ) -> list[np.ndarray]:
        """One entry per stage: its images at its resolution, in [-1,1]. Prompts are encoded once. SR stages
        augment their input at `sr_noise_level` (default: each stage config's diffusion.sr_noise_level).

        Editing (`diffusion.editing`): `init_images` [B,H,W,3] in [-1,1], one per prompt, are resized to each
        stage's size; with `masks` [B,H,W,1] (1 = regenerate, resized and made binary again) every stage inpaints,
        each SR stage from the inpainted output of the stage before, with `inpaint_resample` > 1 RePaint's
        resampling every `inpaint_jump` steps; with `strengths` (one per stage, default 1) below 1, image-to-image.
        Per stage, `guidance_intervals` (log-SNR; default: every step) and `guidance_rescales` (default 0)."""
        if len(prompts) != len(seeds):
            raise StageError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        n = len(self.stages)
        samplers = samplers or ["ddpm"] * n
        strengths = strengths or [1.0] * n
        intervals = guidance_intervals or [(-math.inf, math.inf)] * n
        rescales = guidance_rescales or [0.0] * n
        for name, values in (
            ("steps", steps), ("guidance_scales", guidance_scales), ("samplers", samplers), ("strengths", strengths),
            ("guidance_intervals", intervals), ("guidance_rescales", rescales),
        ):  # fmt: skip
            if len(values) != n:
                raise StageError(f"{len(values)} {name} for {n} stages")
        check_edit(len(prompts), init_images, masks, strengths, inpaint_resample, inpaint_jump)
        text, mask = self.encode(prompts)
        outputs: list[np.ndarray] = []
        for index, stage in enumerate(self.stages):
            report = None if progress is None else (lambda done, total, i=index: progress(i, done, total))
            size = stage.image_size
            outputs.append(
                stage.sample(
                    text,
                    mask,
                    seeds,
                    steps=steps[index],
                    guidance_scale=guidance_scales[index],
                    sampler=samplers[index],
                    lowres=outputs[-1] if outputs else None,
                    sr_noise_level=sr_noise_level,
                    progress=report,
                    init_image=None if init_images is None else images_lib.resize(init_images, size),
                    mask=None if masks is None else images_lib.resize_mask(masks, size),
                    strength=strengths[index],
                    resample=inpaint_resample,
                    jump_length=inpaint_jump,
                    guidance_interval=tuple(intervals[index]),
                    guidance_rescale=rescales[index],
                )
            )
        return outputs


def check_edit(
    count: int,
    init_images: np.ndarray | None,
    masks: np.ndarray | None,
    strengths: Sequence[float],
    resample: int,
    jump_length: int,
) -> None:
    """The editing inputs of `count` prompts agree with each other; a one-line StageError naming what does not."""
    if init_images is not None and (
        init_images.ndim != 4 or init_images.shape[0] != count or init_images.shape[-1] != 3
    ):
        raise StageError(f"init_images must be [{count}, H, W, 3] (one per prompt), got {tuple(init_images.shape)}")
    if masks is not None:
        if init_images is None:
            raise StageError("a mask needs the image it masks (init_images)")
        if tuple(masks.shape) != (*init_images.shape[:3], 1):
            raise StageError(
                f"the mask is {masks.shape[2]}x{masks.shape[1]} but its image is "
                f"{init_images.shape[2]}x{init_images.shape[1]}: they must be the same size (masks [B,H,W,1])"
            )
    for strength in strengths:
        try:
            editing.check_strength(strength)
        except ValueError as e:
            raise StageError(str(e)) from None
    if any(s < 1.0 for s in strengths) and init_images is None:
        raise StageError(f"strength {min(strengths)} < 1 (image-to-image) needs init_images")
    try:
        editing.check_resampling(resample, jump_length)
    except ValueError as e:
        raise StageError(str(e)) from None
    if resample > 1 and masks is None:
        raise StageError(f"inpaint_resample={resample} (RePaint) needs a mask: it only applies to inpainting")
