"""Which sampler, how many steps? Seconds per image and the quality each reaches, on a demo base model; and how
fast a config's U-Net samples with its text conditioning computed once per prompt, against the whole model
called at every step.

    python -m imagen_jax.tools.sampler_bench --workdir runs/demo/train [--runs ddpm:64,ddim:16,dpmpp_2m:16]
    python -m imagen_jax.tools.sampler_bench --config configs/demo.py [--images 4 --steps 50 --rounds 5
                                             --sampler ddpm --guidance_scale 3 --text_dim 512] [--config.a.b=...]

With --workdir, for each sampler:steps pair it samples all 90 demo captions with guidance (one compile first,
not timed), and prints seconds per image and the colour / position accuracy (imagen_jax.tools.eval_demo).
With --config it prints the speed figures of tools/sampler_speed.py as JSON (initial weights, random text).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_RUNS = "ddpm:64,ddpm:16,ddim:16,dpmpp_2m:16,dpmpp_2m:8"


def parse_runs(text: str) -> list[tuple[str, int]]:
    from imagen_jax.diffusion import SAMPLERS
    from imagen_jax.errors import UsageError

    runs = []
    for item in text.split(","):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise UsageError(f"bad run {item!r}: expected SAMPLER:STEPS with SAMPLER in {SAMPLERS} and STEPS >= 1")
        runs.append((name, int(steps)))
    return runs


def benchmark(workdir: str, runs: list[tuple[str, int]], *, guidance_scale: float) -> list[dict]:
    from imagen_jax.cascade import Imagen
    from imagen_jax.tools import eval_demo

    imagen = Imagen.load([workdir])
    rows = []
    for sampler, steps in runs:
        kwargs = dict(guidance_scale=guidance_scale, steps=steps, sampler=sampler, baseline=False, imagen=imagen)
        eval_demo.evaluate(workdir, **kwargs)  # compile (and warm up) outside the timing
        start = time.perf_counter()
        result = eval_demo.evaluate(workdir, **kwargs)
        seconds = time.perf_counter() - start
        scores = result[f"guidance_{guidance_scale:g}"]
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "seconds_per_image": round(seconds / result["num_images"], 4),
                **scores,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sampler_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", help="quality mode: a demo base stage's workdir or export folder")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="quality: comma-separated SAMPLER:STEPS pairs")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--config", help="speed mode: the config whose U-Net is timed")
    parser.add_argument("--images", type=int, default=4, help="speed: images per sampling call")
    parser.add_argument("--steps", type=int, default=50, help="speed: sampling steps")
    parser.add_argument("--sampler", default="ddpm", help="speed: the sampler")
    parser.add_argument("--rounds", type=int, default=5, help="speed: timed calls each way")
    parser.add_argument("--text_dim", type=int, default=512, help="speed: width of the random T5 embeddings")
    args, overrides = parser.parse_known_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        from imagen_jax.errors import UsageError

        if bool(args.workdir) == bool(args.config):
            raise UsageError("give either --workdir DIR (quality mode) or --config FILE (speed mode)")
        if args.workdir:
            if overrides:
                raise UsageError(f"unknown arguments for --workdir: {' '.join(overrides)}")
            benchmark(args.workdir, parse_runs(args.runs), guidance_scale=args.guidance_scale)
            return 0
        return speed()

    def speed() -> int:
        from imagen_jax import config as config_lib
        from imagen_jax.errors import ConfigError, UsageError
        from imagen_jax.tools.sampler_speed import benchmark_speed

        (sampler, steps), *_ = parse_runs(f"{args.sampler}:{args.steps}")
        if min(args.images, args.rounds, args.text_dim) < 1:
            raise UsageError("--images, --rounds and --text_dim must be >= 1")
        try:
            config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        figures = benchmark_speed(
            config, text_dim=args.text_dim, images=args.images, steps=steps, guidance_scale=args.guidance_scale,
            sampler=sampler, rounds=args.rounds,
        )  # fmt: skip
        print(json.dumps(figures, indent=2))
        return 0

    return main_guard("sampler_bench", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
