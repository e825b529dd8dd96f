"""Does a model trained on the demo shapes follow its prompts? Samples every demo caption and scores it.

    python -m imagen_jax.tools.eval_demo --workdir runs/demo [--guidance_scale 3] [--steps 64]

For each of the demo's captions (6 colours x 3 shapes x 5 positions) it samples `--per_prompt` images and
reads back the shape's colour and position with `imagen_jax.data.demo`'s classifiers; it reports the share
that match the prompt, with guidance and, as the baseline, without (guidance scale 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np

from imagen_jax import images as images_lib
from imagen_jax.data import demo
from imagen_jax.pipeline import Imagen


def evaluate(
    workdir: str, *, guidance_scale: float, steps: int, per_prompt: int = 1, seed: int = 0, batch_size: int = 96,
    baseline: bool = True, out: str | None = None,
) -> dict:
    """Colour and position accuracy of samples for every demo caption; writes a grid under `out`."""
    imagen = Imagen.load([workdir])
    triples = [t for t in itertools.product(demo.COLORS, demo.SHAPES, demo.POSITIONS) for _ in range(per_prompt)]
    prompts = [demo.caption(*t) for t in triples]
    results = {"workdir": workdir, "checkpoint_step": imagen.stages[0].step, "steps": steps, "num_images": len(prompts)}
    scales = [guidance_scale] + ([1.0] if baseline and guidance_scale != 1.0 else [])
    for scale in scales:
        samples = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            seeds = list(range(seed + start, seed + start + len(chunk)))
            (x,) = imagen(chunk, seeds, steps=[steps], guidance_scales=[scale])
            samples.append(images_lib.to_uint8(x))
        samples = np.concatenate(samples)
        color_ok = [demo.classify_color(img) == t[0] for img, t in zip(samples, triples)]
        position_ok = [demo.classify_position(img) == t[2] for img, t in zip(samples, triples)]
        key = f"guidance_{scale:g}"
        results[key] = {"color_accuracy": float(np.mean(color_ok)), "position_accuracy": float(np.mean(position_ok))}
        if out:
            os.makedirs(out, exist_ok=True)
            images_lib.save_png(images_lib.make_grid(samples, columns=len(demo.POSITIONS) * per_prompt),
                                os.path.join(out, f"eval_{key}.png"))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--per_prompt", type=int, default=1, help="samples per caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_baseline", action="store_true", help="skip the unguided (scale 1) baseline")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.per_prompt < 1:
        parser.error("--steps and --per_prompt must be >= 1")
    results = evaluate(args.workdir, guidance_scale=args.guidance_scale, steps=args.steps, per_prompt=args.per_prompt,
                       seed=args.seed, baseline=not args.no_baseline, out=os.path.join(args.workdir, "eval"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
