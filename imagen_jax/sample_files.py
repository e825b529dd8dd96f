"""Sampling prompts into a folder: one PNG per image (final resolution, plus each earlier stage's), a grid,
and a JSON index of prompts, seeds and per-stage settings.

A folder with a `samples.json` is complete. Every file is written to a temporary name (NAME.partial-PID)
and renamed into place; the images come first, then grid.png, and samples.json last (also temp + rename).
A previous run's samples.json is removed before the first new file is written, so a run that fails or is
interrupted half-way never leaves a folder that looks complete; its temporary files are removed on the way
out (those of a killed process by the next run into the same folder). A folder that already holds another
run's images is refused unless `overwrite`, which removes them first, so a folder never mixes two runs.

Arguments are typed values (sample.py parses its flags) and are checked here (`check_arguments`,
`check_writable`) so that sample.py can reject them before any model loads. Local folders need no TensorFlow;
gs:// paths go through tf.io.gfile (filesystem.py), imported on first use.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imagen_jax import filesystem
from imagen_jax.cascade import Imagen
from imagen_jax.diffusion import DISCRETE_SCHEDULES, SAMPLERS, editing
from imagen_jax.diffusion.guidance import check_guidance_interval, check_guidance_rescale
from imagen_jax.diffusion.timesteps import check_steps
from imagen_jax.errors import OutputError, UsageError
from imagen_jax.files import write_atomically
from imagen_jax.stage.sampling import step_count

INDEX_FILE = "samples.json"
GRID_FILE = "grid.png"
_PARTIAL = ".partial-"
_SEED_LIMIT = 2**32  # sampling seeds are uint32
_STAGE_FOLDER = re.compile(r"^\d+px$")  # intermediate resolutions: <size>px/


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def stage_settings(
    count: int,
    steps: Sequence[int] | None = None,
    guidance_scales: Sequence[float] | None = None,
    samplers: Sequence[str] | None = None,
    configs: Sequence | None = None,
) -> tuple[list[int], list[float], list[str]]:
    """Per-stage (steps, guidance scales, samplers), checked: each given list has one value per stage; one left
    None takes each stage config's train.sample_steps / train.sample_guidance_scale, or 'ddpm'. Without
    `configs` the lists for None values are empty (the check sample.py runs before any model loads)."""
    configs = list(configs or [])
    for name, values in (("steps", steps), ("guidance_scale", guidance_scales), ("sampler", samplers)):
        if values is not None and len(values) != count:
            raise UsageError(f"--{name} has {len(values)} values for {count} stages (give one, or one per stage)")
    steps_ = list(steps) if steps is not None else [c.train.sample_steps for c in configs]
    scales = (
        list(guidance_scales)
        if guidance_scales is not None
        else [float(c.train.sample_guidance_scale) for c in configs]
    )
    samplers_ = list(samplers) if samplers is not None else ["ddpm"] * count
    if any(isinstance(s, int) and s < 1 for s in steps_):
        raise UsageError(f"--steps must be >= 1 for every stage, got {_shown(steps, steps_)}")
    for index, value in enumerate(steps_):
        # Before the configs are known only a name is checked (that it exists); then each against its schedule.
        if not configs and not isinstance(value, str):
            continue
        try:
            check_steps(value, configs[index].diffusion.schedule if configs else DISCRETE_SCHEDULES[0])
        except ValueError as e:
            raise UsageError(f"--steps {_shown(steps, steps_)}: stage {index + 1}: {e}") from None
    if any(not (math.isfinite(g) and g >= 0) for g in scales):
        raise UsageError(
            f"--guidance_scale must be a finite number >= 0 (1: no guidance) for every stage, "
            f"got {_shown(guidance_scales, scales)}"
        )
    for name in samplers_:
        if name not in SAMPLERS:
            raise UsageError(
                f"--sampler {','.join(samplers_)!r}: unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}"
            )
    return steps_, scales, samplers_


def _shown(value: Sequence | None, parsed: list) -> str:
    """The values as given, or the configs' values they defaulted to."""
    if value is None:
        return f"{parsed} (the stages' configs)"
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


def check_arguments(
    *,
    num_prompts: int,
    num_stages: int,
    num_images: int,
    seed: int,
    batch_size: int,
    sr_noise_level: float | None,
    steps: Sequence[int] | None = None,
    guidance_scales: Sequence[float] | None = None,
    samplers: Sequence[str] | None = None,
    edit: Edit | None = None,
) -> None:
    """Raises UsageError naming the first bad argument (as its sample.py flag) and its value."""
    if num_prompts < 1:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE with one prompt per line")
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    last = _SEED_LIMIT - num_prompts * num_images
    if not 0 <= seed <= last:
        raise UsageError(f"--seed must be in [0, {last}] (image i uses seed + i, a uint32), got {seed}")
    if sr_noise_level is not None and not 0.0 <= sr_noise_level <= 1.0:
        raise UsageError(f"--sr_noise_level must be in [0, 1], got {sr_noise_level}")
    stage_settings(num_stages, steps, guidance_scales, samplers)
    if edit is not None:
        edit.check(num_stages)


@dataclasses.dataclass(frozen=True)
class Edit:
    """sample.py's editing flags: an image to start from (--init_image), a mask (--mask, white = regenerate), per
    stage strengths and guidance options (None: the defaults), RePaint's resampling."""

    init_image: str | None = None
    mask: str | None = None
    strengths: Sequence[float] | None = None
    inpaint_resample: int = 1
    inpaint_jump: int = 1
    guidance_intervals: Sequence[tuple[float, float]] | None = None
    guidance_rescales: Sequence[float] | None = None

    def check(self, num_stages: int) -> None:
        """Raises UsageError naming the first bad flag: values, counts, and the image files themselves."""
        for name, values in (
            ("strength", self.strengths),
            ("guidance_interval", self.guidance_intervals),
            ("guidance_rescale", self.guidance_rescales),
        ):
            if values is not None and len(values) != num_stages:
                raise UsageError(
                    f"--{name} has {len(values)} values for {num_stages} stages (give one, or one per stage)"
                )
        checks = [(f"--strength {s:g}", editing.check_strength, (s,)) for s in self.strengths or []]
        checks += [
            (f"--guidance_interval {a:g}:{b:g}", check_guidance_interval, ((a, b),))
            for a, b in self.guidance_intervals or []
        ]
        checks += [(f"--guidance_rescale {r:g}", check_guidance_rescale, (r,)) for r in self.guidance_rescales or []]
        checks.append(
            ("--inpaint_resample/--inpaint_jump", editing.check_resampling, (self.inpaint_resample, self.inpaint_jump))
        )
        for flag, check, args in checks:
            try:
                check(*args)
            except ValueError as e:
                raise UsageError(f"{flag}: {e}") from None
        if self.mask and not self.init_image:
            raise UsageError("--mask needs --init_image (the image it masks)")
        if self.inpaint_resample > 1 and not self.mask:
            raise UsageError(
                f"--inpaint_resample {self.inpaint_resample} (RePaint) needs --mask: it only applies to inpainting"
            )
        if self.strengths and min(self.strengths) < 1 and not self.init_image:
            raise UsageError(f"--strength {min(self.strengths):g} (image-to-image) needs --init_image")
        self.images(1)

    def images(self, count: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(init images [count,H,W,3] in [-1,1], masks [count,H,W,1] in {0,1}) read from the files, or None."""
        if not self.init_image:
            return None, None
        image = _read_image(self.init_image, "RGB", "--init_image").astype(np.float32) / 127.5 - 1.0
        mask = None
        if self.mask:
            grey = _read_image(self.mask, "L", "--mask")
            if grey.shape != image.shape[:2]:
                raise UsageError(
                    f"--mask {self.mask!r} is {grey.shape[1]}x{grey.shape[0]} but --init_image {self.init_image!r} is "
                    f"{image.shape[1]}x{image.shape[0]}: they must be the same size"
                )
            mask = np.repeat((grey >= 128).astype(np.float32)[None, :, :, None], count, axis=0)
        return np.repeat(image[None], count, axis=0), mask

    def settings(self, stage: int) -> dict:
        """What samples.json records of the editing for stage `stage` (nothing when not editing)."""
        entry = {}
        if self.strengths is not None:
            entry["strength"] = self.strengths[stage]
        if self.guidance_intervals is not None:
            entry["guidance_interval"] = [str(v) if math.isinf(v) else v for v in self.guidance_intervals[stage]]
        if self.guidance_rescales is not None:
            entry["guidance_rescale"] = self.guidance_rescales[stage]
        return entry

    def run_settings(self) -> dict:
        """The editing of the whole run, for samples.json."""
        entry = {}
        if self.init_image:
            entry["init_image"] = self.init_image
        if self.mask:
            entry.update(mask=self.mask, inpaint_resample=self.inpaint_resample, inpaint_jump=self.inpaint_jump)
        return entry


def _read_image(path: str, mode: str, flag: str) -> np.ndarray:
    """uint8 [H,W,3] (mode RGB) or [H,W] (L) of an image file; UsageError naming the flag and file if unreadable."""
    fs = filesystem.for_path(path)
    try:
        with fs.GFile(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert(mode), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{flag} {path!r} is not a readable image: {_message(e)}") from None
    except fs.errors as e:
        raise UsageError(f"{flag} {path!r} cannot be read: {_message(e)}") from None


def previous_images(out: str) -> list[str]:
    """What an earlier run left in `out`: its samples.json and the PNGs at the top and in <size>px/ folders."""
    fs = filesystem.for_path(out)
    if not fs.isdir(out):
        return []
    found = []
    for name in sorted(fs.listdir(out)):
        name = name.rstrip("/")
        path = os.path.join(out, name)
        if name == INDEX_FILE or name.endswith(".png"):
            found.append(path)
        elif _STAGE_FOLDER.match(name) and fs.isdir(path):
            found += [os.path.join(path, f) for f in sorted(fs.listdir(path)) if f.endswith(".png")]
    return found


def check_writable(out: str, *, overwrite: bool = False) -> None:
    """Creates `out` if needed and checks a file can be written there; a folder that holds another run's images
    is refused unless `overwrite` (whose files are then replaced). UsageError naming it if not."""
    fs = filesystem.for_path(out)
    try:
        fs.makedirs(out)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with fs.GFile(probe, "w") as f:
            f.write("")
        fs.remove(probe)
        previous = previous_images(out)
    except fs.errors as e:
        raise UsageError(f"--out {out!r} cannot be created or written: {_message(e)}") from None
    if previous and not overwrite:
        raise UsageError(
            f"--out {out!r} already holds another run's images ({len(previous)} files, e.g. "
            f"{os.path.relpath(previous[0], out)}); pass --overwrite to replace them, or choose a new folder"
        )


def sample_to_folder(
    workdirs: Sequence[str],
    prompts: Sequence[str],
    *,
    out: str,
    num_images: int,
    seed: int,
    steps: Sequence[int] | None = None,
    guidance_scales: Sequence[float] | None = None,
    samplers: Sequence[str] | None = None,
    sr_noise_level: float | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    checkpoint_steps: Sequence[int | None] | None = None,
    text_encoder: str | None = None,
    dtype: str | None = None,
    adapters: Sequence[tuple[int, str, float]] = (),
    edit: Edit | None = None,
) -> list[str]:
    """Samples num_images per prompt through the cascade (image i of the run: seed + i) into `out`.

    steps / guidance_scales / samplers: one value per stage; None takes each stage's config
    (train.sample_steps, train.sample_guidance_scale) and 'ddpm'. sr_noise_level: None takes each SR stage
    config's diffusion.sr_noise_level. A folder with another run's images needs `overwrite`. checkpoint_steps:
    one per stage (None: the latest), for workdirs. text_encoder, dtype, adapters: see `Imagen.load`. edit: an
    image to inpaint or start from, and the guidance options (`Edit`).
    Returns the final images' file names, as samples.json lists them.
    """
    from tqdm import tqdm

    from imagen_jax import images as images_lib

    check_arguments(
        num_prompts=len(prompts),
        num_stages=len(workdirs),
        num_images=num_images,
        seed=seed,
        batch_size=batch_size,
        sr_noise_level=sr_noise_level,
        steps=steps,
        guidance_scales=guidance_scales,
        samplers=samplers,
        edit=edit,
    )
    edit = edit or Edit()
    check_writable(out, overwrite=overwrite)
    imagen = Imagen.load(list(workdirs), checkpoint_steps, text_encoder=text_encoder, dtype=dtype, adapters=adapters)
    stages = imagen.stages
    n = len(stages)
    steps_, scales, samplers_ = stage_settings(n, steps, guidance_scales, samplers, [s.config for s in stages])
    jobs = [(p, prompt, j, seed + p * num_images + j) for p, prompt in enumerate(prompts) for j in range(num_images)]
    visits = [edit_visits(step_count(steps_[i]), edit, i) for i in range(n)]
    edit_inputs = edit.images(1)  # read once, repeated for each batch
    results: list[list[np.ndarray]] = [[] for _ in stages]
    bars = [
        tqdm(
            total=len(jobs) * visits[i],
            desc=f"stage {i + 1}/{n} ({stage.image_size}px)",
            unit="step",
            position=i,
        )
        for i, stage in enumerate(stages)
    ]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        done = {i: 0 for i in range(n)}

        def progress(stage: int, finished: int, total: int, done: dict = done, images: int = len(chunk)) -> None:
            bars[stage].update((finished - done[stage]) * images)
            done[stage] = finished

        init_images, masks = (None if x is None else np.repeat(x, len(chunk), axis=0) for x in edit_inputs)
        outputs = imagen(
            [c[1] for c in chunk],
            [c[3] for c in chunk],
            steps=steps_,
            guidance_scales=scales,
            samplers=samplers_,
            sr_noise_level=sr_noise_level,
            progress=progress,
            init_images=init_images,
            masks=masks,
            strengths=edit.strengths,
            inpaint_resample=edit.inpaint_resample,
            inpaint_jump=edit.inpaint_jump,
            guidance_intervals=edit.guidance_intervals,
            guidance_rescales=edit.guidance_rescales,
        )
        for i, x in enumerate(outputs):
            results[i].extend(images_lib.to_uint8(x))
    for bar in bars:
        bar.close()
    files: dict[str, np.ndarray] = {}
    index = {}
    stage_adapters = [[[path, scale] for k, path, scale in adapters if k == i] for i in range(n)]
    for k, (p, prompt, j, image_seed) in enumerate(jobs):
        name = f"{p:03d}_{j:02d}_{slug(prompt)}.png"
        files[name] = results[-1][k]
        entry = {"prompt": prompt, "seed": image_seed, "image_size": stages[-1].image_size, **edit.run_settings()}
        entry["stages"] = []
        for i, stage in enumerate(stages):
            stage_file = name
            if i < n - 1:  # intermediate resolutions, in a folder per size
                stage_file = f"{stage.image_size}px/{name}"
                files[stage_file] = results[i][k]
            level = stage.config.diffusion.sr_noise_level if sr_noise_level is None else sr_noise_level
            entry["stages"].append(
                {
                    "workdir": stage.workdir,
                    "checkpoint_step": stage.step,
                    "image_size": stage.image_size,
                    "steps": steps_[i],
                    "guidance_scale": scales[i],
                    "sampler": samplers_[i],
                    "file": stage_file,
                    **({"lora": stage_adapters[i]} if stage_adapters[i] else {}),
                    **({"sr_noise_level": level} if stage.lowres_size else {}),
                    **edit.settings(i),
                }
            )
        index[name] = entry
    files[GRID_FILE] = images_lib.make_grid(np.stack(results[-1]), columns=num_images)
    write_folder(out, files, {"grid": GRID_FILE, "images": index})
    return list(index)


def edit_visits(steps: int, edit: Edit, stage: int) -> int:
    """The model evaluations a stage of `steps` runs under `edit`: fewer for image-to-image, more with RePaint."""
    strength = 1.0 if edit.strengths is None or not edit.init_image else edit.strengths[stage]
    first = editing.first_evaluation(steps, strength)
    if not edit.mask or edit.inpaint_resample == 1:
        return steps - first
    return len(editing.evaluation_order(steps, first, edit.inpaint_resample, edit.inpaint_jump))


def write_folder(out: str, images: dict[str, np.ndarray], index: dict) -> None:
    """Writes `images` (path relative to `out` -> uint8 [H,W,3]) as PNGs in order, then `index` as
    samples.json: the order and the temporary names of the module docstring."""
    fs = filesystem.for_path(out)
    index_path = os.path.join(out, INDEX_FILE)
    try:
        if fs.exists(index_path):  # from here on the folder is not complete until the new index
            fs.remove(index_path)
        for stale in previous_images(out):  # an earlier run's images (check_writable allowed replacing them)
            fs.remove(stale)
        for pattern in ("*", os.path.join("*", "*")):  # debris of a killed run
            for debris in fs.glob(os.path.join(out, pattern + _PARTIAL + "*")):
                fs.remove(debris)
        for name, image in images.items():
            path = os.path.join(out, name)
            fs.makedirs(os.path.dirname(path))
            write_atomically(path, _png(image), marker=_PARTIAL)
        write_atomically(index_path, json.dumps(index, indent=2), marker=_PARTIAL)
    except fs.errors as e:
        raise OutputError(f"cannot write samples into {out!r}: {_message(e)}") from e


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)
