"""Sampling prompts into a folder: one PNG per image, a grid, and a JSON index of prompts, seeds, settings."""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imagen_jax import images as images_lib
from imagen_jax.pipeline import Imagen

INDEX_FILE = "samples.json"


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def sample_to_folder(
    workdir: str,
    prompts: Sequence[str],
    *,
    out: str,
    num_images: int,
    seed: int,
    steps: int | None,
    guidance_scale: float | None,
    batch_size: int,
) -> list[str]:
    """Samples num_images per prompt (image i of the run: seed + i) and writes them under `out`."""
    try:
        tf.io.gfile.makedirs(out)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"output folder {out!r} cannot be written: {e}") from None
    imagen = Imagen.load([workdir])
    stage = imagen.stages[0]
    steps = int(steps or stage.config.train.sample_steps)
    guidance_scale = float(stage.config.train.sample_guidance_scale if guidance_scale is None else guidance_scale)
    jobs = [(p, prompt, j, seed + p * num_images + j) for p, prompt in enumerate(prompts) for j in range(num_images)]
    images: list[np.ndarray] = []
    with tqdm(total=len(jobs) * steps, desc="sampling", unit="step") as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            done = [0]

            def progress(_stage: int, finished: int, total: int) -> None:
                bar.update((finished - done[0]) * len(chunk))
                done[0] = finished

            (x,) = imagen([c[1] for c in chunk], [c[3] for c in chunk], steps=[steps], guidance_scales=[guidance_scale], progress=progress)
            images.extend(images_lib.to_uint8(x))
    index = {}
    for (p, prompt, j, image_seed), image in zip(jobs, images):
        name = f"{p:03d}_{j:02d}_{slug(prompt)}.png"
        images_lib.save_png(image, os.path.join(out, name))
        index[name] = {"prompt": prompt, "seed": image_seed, "steps": steps, "guidance_scale": guidance_scale,
                       "workdir": workdir, "checkpoint_step": stage.step, "image_size": int(image.shape[0])}
    grid = images_lib.make_grid(np.stack(images), columns=num_images)
    images_lib.save_png(grid, os.path.join(out, "grid.png"))
    tmp = os.path.join(out, INDEX_FILE + ".tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump({"grid": "grid.png", "images": index}, f, indent=2)
    tf.io.gfile.rename(tmp, os.path.join(out, INDEX_FILE), overwrite=True)
    return list(index)
