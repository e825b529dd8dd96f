"""Does a model trained on the demo shapes follow its prompts? Samples every demo caption and scores it.
With --sr_workdir it also scores the cascade's larger output and the super-resolution stage's fidelity,
sharpness and brightness bias.

    python -m imagen_jax.tools.eval_demo --workdir runs/demo/train [--guidance_scale 3] [--steps 64] \
        [--sr_workdir runs/demo/train_sr --sr_steps 32]

For each of the demo's captions (6 colours x 3 shapes x 5 positions) it samples `--per_prompt` images and
reads back the shape's colour, shape and position with `imagen_jax.data.demo`'s classifiers; it reports the
share that match the prompt, with guidance and, as the baseline, without (guidance scale 1).

With --concept_prompt (e.g. "a sks shape" after tools.dreambooth taught the model a ring) it also samples
--concept_images images of that prompt and reports the share whose shape reads back as --concept_shape, among
the demo's shapes and the new ones (data.demo.NEW_SHAPES), and the share in --concept_color when given.
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


def scores(samples: np.ndarray, triples: list[tuple[str, str, str]]) -> dict[str, float]:
    """Share of samples whose colour, shape and position (read back by `data.demo`'s classifiers) match."""
    from imagen_jax.data import demo

    readers = {"color": demo.classify_color, "shape": demo.classify_shape, "position": demo.classify_position}
    return {
        f"{name}_accuracy": float(np.mean([read(image) == t[i] for image, t in zip(samples, triples)]))
        for i, (name, read) in enumerate(readers.items())
    }


def evaluate(
    workdir: str,
    *,
    guidance_scale: float,
    steps: int,
    per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 96,
    baseline: bool = True,
    out: str | None = None,
    sampler: str = "ddpm",
    sr_workdir: str | None = None,
    sr_steps: int = 32,
    imagen: Imagen | None = None,
) -> dict:
    """Colour, shape and position accuracy of samples for every demo caption; writes a grid per scale under
    `out`. With `sr_workdir`, the guided samples also go through the SR stage and its larger output is scored
    too (`cascade`): super-resolution must keep what the base stage drew."""
    from imagen_jax import images as images_lib
    from imagen_jax.cascade import Imagen
    from imagen_jax.data import demo

    imagen = imagen or Imagen.load([workdir] + ([sr_workdir] if sr_workdir else []))
    triples = [t for t in itertools.product(demo.COLORS, demo.SHAPES, demo.POSITIONS) for _ in range(per_prompt)]
    prompts = [demo.caption(*t) for t in triples]
    results = {
        "workdir": workdir,
        "checkpoint_step": imagen.stages[0].step,
        "sampler": sampler,
        "steps": steps,
        "num_images": len(prompts),
    }
    scales = [guidance_scale] + ([1.0] if baseline and guidance_scale != 1.0 else [])
    for scale in scales:
        cascade = len(imagen.stages) > 1 and scale == guidance_scale
        stages = imagen.stages if cascade else imagen.stages[:1]
        run = imagen if cascade else Imagen(imagen.encoder, stages, imagen.mesh)
        outputs: list[list[np.ndarray]] = [[] for _ in stages]
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seeds = list(range(seed + start, seed + start + len(chunk)))
            images = run(
                chunk,
                seeds,
                steps=[steps, sr_steps][: len(stages)],
                guidance_scales=[scale, 1.0][: len(stages)],
                samplers=[sampler, "ddpm"][: len(stages)],
            )
            for collected, x in zip(outputs, images):
                collected.append(images_lib.to_uint8(x))
        key = f"guidance_{scale:g}"
        for index, collected in enumerate(outputs):
            samples = np.concatenate(collected)
            if index == 0:
                results[key] = scores(samples, triples)
            else:
                results[key]["cascade"] = {"image_size": samples.shape[1], "sr_steps": sr_steps}
                results[key]["cascade"].update(scores(samples, triples))
            if out:
                os.makedirs(out, exist_ok=True)
                suffix = "" if index == 0 else f"_{samples.shape[1]}px"
                images_lib.save_png(
                    images_lib.make_grid(samples, columns=len(demo.POSITIONS) * per_prompt),
                    os.path.join(out, f"eval_{key}{suffix}.png"),
                )
    return results


def concept(
    imagen: Imagen,
    prompt: str,
    shape: str,
    *,
    color: str | None,
    num_images: int,
    guidance_scale: float,
    steps: int,
    seed: int = 0,
    sampler: str = "ddpm",
    out: str | None = None,
) -> dict:
    """Share of `num_images` samples of `prompt` (base stage, seeds seed..) whose shape reads back as `shape` among
    SHAPES + NEW_SHAPES (and whose colour is `color`, when given); a grid goes to `out`."""
    from imagen_jax import images as images_lib
    from imagen_jax.cascade import Imagen
    from imagen_jax.data import demo

    base = Imagen(imagen.encoder, imagen.stages[:1], imagen.mesh)
    x = base([prompt] * num_images, list(range(seed, seed + num_images)), steps=[steps],
             guidance_scales=[guidance_scale], samplers=[sampler])[0]  # fmt: skip
    samples = images_lib.to_uint8(x)
    shapes = [demo.classify_shape(image, demo.SHAPES + demo.NEW_SHAPES) for image in samples]
    result = {
        "prompt": prompt,
        "shape": shape,
        "num_images": num_images,
        "guidance_scale": guidance_scale,
        "shape_share": float(np.mean([s == shape for s in shapes])),
        "shapes_read": {name: shapes.count(name) for name in sorted(set(shapes))},
    }
    if color:
        result["color"] = color
        result["color_share"] = float(np.mean([demo.classify_color(image) == color for image in samples]))
    if out:
        os.makedirs(out, exist_ok=True)
        images_lib.save_png(images_lib.make_grid(samples, columns=10), os.path.join(out, "concept.png"))
    return result


def main(argv: list[str] | None = None) -> int:
    from imagen_jax.data import demo

    parser = argparse.ArgumentParser(
        prog="eval_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--per_prompt", type=int, default=1, help="samples per caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_baseline", action="store_true", help="skip the unguided (scale 1) baseline")
    parser.add_argument("--sr_workdir", help="also score this SR stage (its input is the base stage's size)")
    parser.add_argument("--sr_steps", type=int, default=32)
    parser.add_argument("--concept_prompt", help='also score a taught concept\'s prompt, e.g. "a sks shape"')
    parser.add_argument(
        "--concept_shape", default="ring", choices=demo.SHAPES + demo.NEW_SHAPES, help="what the concept must draw"
    )
    parser.add_argument("--concept_color", choices=tuple(demo.COLORS), help="and its colour")
    parser.add_argument("--concept_images", type=int, default=40, help="samples of the concept prompt")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.per_prompt < 1 or args.sr_steps < 1:
        parser.error("--steps, --sr_steps and --per_prompt must be >= 1")
    if args.concept_images < 1:
        parser.error("--concept_images must be >= 1")
    from imagen_jax.cli import main_guard

    def body() -> int:
        from imagen_jax.cascade import Imagen

        imagen = Imagen.load([args.workdir] + ([args.sr_workdir] if args.sr_workdir else []))
        results = evaluate(
            args.workdir,
            guidance_scale=args.guidance_scale,
            steps=args.steps,
            per_prompt=args.per_prompt,
            seed=args.seed,
            baseline=not args.no_baseline,
            out=os.path.join(args.workdir, "eval"),
            sr_workdir=args.sr_workdir,
            sr_steps=args.sr_steps,
            imagen=imagen,
        )
        if args.concept_prompt:
            results["concept"] = concept(
                imagen,
                args.concept_prompt,
                args.concept_shape,
                color=args.concept_color,
                num_images=args.concept_images,
                guidance_scale=args.guidance_scale,
                steps=args.steps,
                seed=args.seed,
                out=os.path.join(args.workdir, "eval"),
            )
        if args.sr_workdir:
            results["super_resolution"] = evaluate_sr(
                args.workdir, args.sr_workdir, steps=args.sr_steps, seed=args.seed
            )
        print(json.dumps(results, indent=2))
        return 0

    return main_guard("eval_demo", body)


def high_frequency_energy(images: np.ndarray) -> float:
    """Mean squared discrete Laplacian: the energy of the finest details (higher = sharper)."""
    return float(np.mean(_laplacian(np.asarray(images, np.float64)) ** 2))


def high_frequency_correlation(images: np.ndarray, targets: np.ndarray) -> float:
    """Pearson correlation of the discrete Laplacians of `images` and `targets`: whether the fine detail is where
    the ground truth's is. Detail made up anywhere (noise added to bicubic upsampling) lowers it below bicubic's
    own; detail at the edges of the shapes raises it."""
    a, b = (_laplacian(np.asarray(x, np.float64)).ravel() for x in (images, targets))
    return float(np.corrcoef(a, b)[0, 1])


def _laplacian(x: np.ndarray) -> np.ndarray:
    return 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]


def speckle_fraction(images: np.ndarray, threshold: float = 0.25) -> float:
    """Share of pixels (any channel) more than `threshold` (in [-1, 1] units; 0.25 = 32 grey levels) from the
    median of their 3x3 neighbourhood: isolated dots stand out, edges (which a median keeps) do not."""
    x = np.asarray(images, np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    windows = np.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)])
    return float(np.mean((np.abs(x - np.median(windows, axis=0)) > threshold).any(axis=-1)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def evaluate_sr(
    base_workdir: str,
    sr_workdir: str,
    *,
    steps: int,
    sampler: str = "ddpm",
    count: int = 60,
    sr_noise_level: float | None = None,
    seed: int = 0,
) -> dict:
    """SR fidelity on fresh renders: the SR output, downsampled back, against its input (PSNR), and its
    sharpness against bicubic upsampling of the same input (high-frequency energy ratio). The noise level
    defaults to the SR config's (diffusion.sr_noise_level)."""
    import jax
    import jax.numpy as jnp

    from imagen_jax.cascade import Imagen
    from imagen_jax.data import demo
    from imagen_jax.diffusion import augment

    imagen = Imagen.load([base_workdir, sr_workdir])
    sr = imagen.stages[1]
    if sr_noise_level is None:
        sr_noise_level = float(sr.config.diffusion.sr_noise_level)
    rng = np.random.default_rng(seed + 12345)
    triples = list(itertools.product(demo.COLORS, demo.SHAPES, demo.POSITIONS))
    picks = [triples[i] for i in rng.permutation(len(triples))[:count]]
    targets = np.stack([demo.render(*t, sr.image_size, rng) for t in picks]).astype(np.float32) / 127.5 - 1.0
    lowres = np.asarray(augment.downsample(jnp.asarray(targets), sr.lowres_size))
    text, mask = imagen.encode([demo.caption(*t) for t in picks])
    out = sr.sample(
        text,
        mask,
        list(range(seed, seed + count)),
        steps=steps,
        guidance_scale=1.0,
        sampler=sampler,
        lowres=lowres,
        sr_noise_level=sr_noise_level,
    )
    bicubic = np.asarray(jax.image.resize(jnp.asarray(lowres), targets.shape, method="cubic")).clip(-1, 1)
    back = np.asarray(augment.downsample(jnp.asarray(out), sr.lowres_size))
    return {
        "sr_workdir": sr_workdir,
        "images": count,
        "steps": steps,
        "sampler": sampler,
        "sr_noise_level": sr_noise_level,
        "psnr_downsampled_output_vs_input_db": round(psnr(back, lowres), 2),
        "psnr_downsampled_bicubic_vs_input_db": round(
            psnr(np.asarray(augment.downsample(jnp.asarray(bicubic), sr.lowres_size)), lowres), 2
        ),
        "high_frequency_ratio_sr_vs_bicubic": round(high_frequency_energy(out) / high_frequency_energy(bicubic), 3),
        "high_frequency_ratio_target_vs_bicubic": round(
            high_frequency_energy(targets) / high_frequency_energy(bicubic), 3
        ),
        "high_frequency_correlation_sr": round(high_frequency_correlation(out, targets), 3),
        "high_frequency_correlation_bicubic": round(high_frequency_correlation(bicubic, targets), 3),
        "psnr_output_vs_target_db": round(psnr(out, targets), 2),
        # Mean of (output downsampled - input) in grey levels: > 0 means the SR stage brightens what it is given.
        "brightness_shift_grey_levels": round(float(np.mean(back - lowres)) * 127.5, 2),
        "speckle_fraction_sr": round(speckle_fraction(out), 4),
        "speckle_fraction_target": round(speckle_fraction(targets), 4),
        "psnr_bicubic_vs_target_db": round(psnr(bicubic, targets), 2),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
