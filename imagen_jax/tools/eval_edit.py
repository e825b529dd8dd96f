"""Does editing work on a model trained on the demo shapes? Inpainting and image-to-image, scored.

    python -m imagen_jax.tools.eval_edit --workdir runs/demo/train [--steps 64] [--guidance_scale 3] \
        [--repaint 4:1,4:4,4:16,8:2] [--out runs/demo/edit]

Inpainting: demo renders (a shape on the left or on the right) with that half masked and a prompt naming
another colour and shape there ("a green square on the left" over a red circle on the left). It reports the
share of kept pixels equal to the input (uint8; must be 1.0), the colour and shape accuracy of what was drawn
(the only shape left in the image is in the regenerated half), and the seam error, the mean squared step
across the mask's border on background rows (the inputs' own: their `seam_error_of_inputs`): without and with
RePaint resampling.
Image-to-image: renders recoloured by prompt ("a green circle on the left" over a red one) at strength 0.5,
scored on position kept and colour taken; and its two ends checked: strength 0 returns the input, strength 1
equals text-to-image from the same seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from imagen_jax.cascade import Imagen

SIDES = ("left", "right")


def _cases(size: int, seed: int) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Inpainting cases: for every side and every (colour, shape) asked for, a render of another colour and
    shape on that side; returns the renders [N,S,S,3] uint8 and the (colour, shape, side) the prompt asks for."""
    from imagen_jax.data import demo

    rng = np.random.default_rng(seed)
    colors, shapes = list(demo.COLORS), list(demo.SHAPES)
    renders, asked = [], []
    for side, (c, color), (s, shape) in itertools.product(SIDES, enumerate(colors), enumerate(shapes)):
        source = (colors[(c + 1) % len(colors)], shapes[(s + 1) % len(shapes)], side)
        renders.append(demo.render(*source, size, rng))
        asked.append((color, shape, side))
    return np.stack(renders), asked


def half_mask(size: int, side: str) -> np.ndarray:
    """[S,S,1] float: 1 on the `side` half (regenerated), 0 on the other (kept)."""
    mask = np.zeros((size, size, 1), np.float32)
    if side == "left":
        mask[:, : size // 2] = 1.0
    else:
        mask[:, size // 2 :] = 1.0
    return mask


def seam_error(images: np.ndarray) -> float:
    """Mean squared step (grey levels^2, over RGB) between the two columns at the mask's border, on the rows where
    both are background (not the drawn shape, whose edge may lie on the border): 0 for a seamless background."""
    from imagen_jax.data import demo

    border = images.shape[2] // 2
    steps = []
    for image in images:
        _, shape = demo.foreground(image)
        rows = ~shape[:, border] & ~shape[:, border - 1]
        step = image[rows, border].astype(np.float64) - image[rows, border - 1]
        steps.extend(np.mean(np.square(step), axis=-1))
    return float(np.mean(steps)) if steps else 0.0


def _sample(imagen: Imagen, prompts, seeds, steps, scale, **edit) -> np.ndarray:
    from imagen_jax import images as images_lib

    return images_lib.to_uint8(imagen(prompts, seeds, steps=[steps], guidance_scales=[scale], **edit)[0])


def inpainting(
    imagen: Imagen, *, steps: int, guidance_scale: float, repaint: list[tuple[int, int]], seed: int = 0
) -> dict:
    """Scores of inpainting the demo cases without RePaint and with each (resample, jump length) of `repaint`."""
    from imagen_jax import images as images_lib
    from imagen_jax.data import demo

    size = imagen.stages[0].image_size
    renders, asked = _cases(size, seed)
    prompts = [demo.caption(*a) for a in asked]
    masks = np.stack([half_mask(size, side) for _, _, side in asked])
    seeds = list(range(seed, seed + len(prompts)))
    results = {"num_images": len(prompts), "seam_error_of_inputs": seam_error(renders)}
    for r, j in [(1, 1), *repaint]:
        out = _sample(
            imagen, prompts, seeds, steps, guidance_scale, init_images=images_lib.from_uint8(renders), masks=masks,
            inpaint_resample=r, inpaint_jump=j,
        )  # fmt: skip
        name = "plain" if r == 1 else f"repaint_{r}x{j}"
        kept = masks[..., 0] < 0.5
        results[name] = {
            "kept_pixels_exact": float(np.mean(np.all(out == renders, axis=-1)[kept])),
            "color_accuracy": float(np.mean([demo.classify_color(x) == a[0] for x, a in zip(out, asked)])),
            "shape_accuracy": float(np.mean([demo.classify_shape(x) == a[1] for x, a in zip(out, asked)])),
            "seam_error": seam_error(out),
        }
    return results


def image_to_image(imagen: Imagen, *, steps: int, guidance_scale: float, strength: float, seed: int = 0) -> dict:
    """Recolouring demo renders at `strength`, and the two ends (0: the input, 1: text-to-image)."""
    from imagen_jax import images as images_lib
    from imagen_jax.data import demo

    size = imagen.stages[0].image_size
    rng = np.random.default_rng(seed + 1)
    colors = list(demo.COLORS)
    sources, asked = [], []
    for (c, color), shape, position in itertools.product(enumerate(colors), demo.SHAPES, demo.POSITIONS):
        sources.append(demo.render(color, shape, position, size, rng))
        asked.append((colors[(c + 1) % len(colors)], shape, position))
    sources_arr = np.stack(sources)
    inputs = images_lib.from_uint8(sources_arr)
    prompts = [demo.caption(*a) for a in asked]
    seeds = list(range(seed, seed + len(prompts)))
    run = lambda s: _sample(imagen, prompts, seeds, steps, guidance_scale, init_images=inputs, strengths=[s])  # noqa: E731
    edited = run(strength)
    return {
        "num_images": len(prompts),
        "strength": strength,
        "position_kept": float(np.mean([demo.classify_position(x) == a[2] for x, a in zip(edited, asked)])),
        "color_taken": float(np.mean([demo.classify_color(x) == a[0] for x, a in zip(edited, asked)])),
        "shape_kept": float(np.mean([demo.classify_shape(x) == a[1] for x, a in zip(edited, asked)])),
        "strength_0_is_input": bool(np.array_equal(run(0.0), sources_arr)),
        "strength_1_is_text_to_image": bool(
            np.array_equal(run(1.0), _sample(imagen, prompts, seeds, steps, guidance_scale))
        ),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a demo base stage: workdir or export folder")
    parser.add_argument("--steps", type=int, default=64, help="DDPM steps")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument(
        "--repaint",
        default="4:1,4:4,4:16,8:2",
        help="RePaint settings to compare with none: RESAMPLE:JUMP, comma-separated",
    )
    parser.add_argument("--strength", type=float, default=0.5, help="image-to-image strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write edit_results.json here")
    args = parser.parse_args(argv)
    try:
        repaint = [tuple(int(v) for v in item.split(":")) for item in args.repaint.split(",")]
        if any(len(item) != 2 or min(item) < 1 for item in repaint):
            raise ValueError
    except ValueError:
        parser.error(f"--repaint {args.repaint!r}: expected RESAMPLE:JUMP pairs of integers >= 1, e.g. 4:1,8:2")
    from imagen_jax.cascade import Imagen
    from imagen_jax.cli import main_guard

    def body() -> int:
        imagen = Imagen.load([args.workdir])
        results = {
            "workdir": args.workdir,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "inpainting": inpainting(
                imagen, steps=args.steps, guidance_scale=args.guidance_scale, repaint=repaint, seed=args.seed,
            ),
            "image_to_image": image_to_image(
                imagen, steps=args.steps, guidance_scale=args.guidance_scale, strength=args.strength, seed=args.seed
            ),
        }  # fmt: skip
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "edit_results.json"), "w") as f:
                f.write(text)
        return 0

    return main_guard("eval_edit", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
