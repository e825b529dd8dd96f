"""Sampling prompts into a folder: one PNG per image (final resolution, plus each earlier stage's), a grid,
and a JSON index of prompts, seeds and per-stage settings."""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imagen_jax import images as images_lib
from imagen_jax.pipeline import Imagen

INDEX_FILE = "samples.json"


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def per_stage(value: str | None, count: int, kind: Callable, name: str, defaults: Sequence) -> list:
    """'a' -> [a] * count; 'a,b,c' -> one per stage; None -> defaults. Wrong counts or types: ValueError."""
    if value is None:
        return list(defaults)
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, count):
        raise ValueError(f"--{name} has {len(parts)} values for {count} stages (give one, or one per stage)")
    try:
        parsed = [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"--{name} {value!r}: each value must be a {kind.__name__}") from None
    return parsed * count if len(parsed) == 1 else parsed


def check_writable(out: str) -> None:
    try:
        tf.io.gfile.makedirs(out)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"output folder {out!r} cannot be written: {e}") from None


def sample_to_folder(
    workdirs: Sequence[str],
    prompts: Sequence[str],
    *,
    out: str,
    num_images: int,
    seed: int,
    steps: str | None = None,
    guidance_scale: str | None = None,
    sampler: str | None = None,
    sr_noise_level: float = 0.2,
    batch_size: int = 16,
) -> list[str]:
    """Samples num_images per prompt through the cascade (image i of the run: seed + i) into `out`.

    steps / guidance_scale / sampler: one value for every stage or a comma-separated value per stage;
    None takes each stage's config (train.sample_steps, train.sample_guidance_scale) and 'ddpm'.
    """
    check_writable(out)
    imagen = Imagen.load(list(workdirs))
    stages = imagen.stages
    n = len(stages)
    steps_ = per_stage(steps, n, int, "steps", [s.config.train.sample_steps for s in stages])
    scales = per_stage(guidance_scale, n, float, "guidance_scale", [s.config.train.sample_guidance_scale for s in stages])
    samplers = per_stage(sampler, n, str, "sampler", ["ddpm"] * n)
    if any(s < 1 for s in steps_):
        raise ValueError(f"--steps must be >= 1, got {steps_}")
    jobs = [(p, prompt, j, seed + p * num_images + j) for p, prompt in enumerate(prompts) for j in range(num_images)]
    results: list[list[np.ndarray]] = [[] for _ in stages]
    bars = [tqdm(total=len(jobs) * steps_[i], desc=f"stage {i + 1}/{n} ({stage.image_size}px)", unit="step", position=i)
            for i, stage in enumerate(stages)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        done = {i: 0 for i in range(n)}

        def progress(stage: int, finished: int, total: int) -> None:
            bars[stage].update((finished - done[stage]) * len(chunk))
            done[stage] = finished

        outputs = imagen([c[1] for c in chunk], [c[3] for c in chunk], steps=steps_, guidance_scales=scales,
                         samplers=samplers, sr_noise_level=sr_noise_level, progress=progress)
        for i, x in enumerate(outputs):
            results[i].extend(images_lib.to_uint8(x))
    for bar in bars:
        bar.close()
    index = {}
    for k, (p, prompt, j, image_seed) in enumerate(jobs):
        name = f"{p:03d}_{j:02d}_{slug(prompt)}.png"
        images_lib.save_png(results[-1][k], os.path.join(out, name))
        entry = {"prompt": prompt, "seed": image_seed, "image_size": stages[-1].image_size, "stages": []}
        for i, stage in enumerate(stages):
            stage_file = name
            if i < n - 1:  # intermediate resolutions, in a folder per size
                stage_file = os.path.join(f"{stage.image_size}px", name)
                tf.io.gfile.makedirs(os.path.join(out, f"{stage.image_size}px"))
                images_lib.save_png(results[i][k], os.path.join(out, stage_file))
            entry["stages"].append({
                "workdir": stage.workdir, "checkpoint_step": stage.step, "image_size": stage.image_size,
                "steps": steps_[i], "guidance_scale": scales[i], "sampler": samplers[i], "file": stage_file,
                **({"sr_noise_level": sr_noise_level} if stage.lowres_size else {}),
            })
        index[name] = entry
    grid = images_lib.make_grid(np.stack(results[-1]), columns=num_images)
    images_lib.save_png(grid, os.path.join(out, "grid.png"))
    tmp = os.path.join(out, INDEX_FILE + ".tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump({"grid": "grid.png", "images": index}, f, indent=2)
    tf.io.gfile.rename(tmp, os.path.join(out, INDEX_FILE), overwrite=True)
    return list(index)
