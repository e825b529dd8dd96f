"""Which sampler, how many steps? Seconds per image and the quality each reaches, on a demo base model.

    python -m imagen_jax.tools.sampler_bench --workdir runs/demo/train [--runs ddpm:64,ddim:16,dpmpp_2m:16]

For each sampler:steps pair it samples all 90 demo captions with guidance (one compile first, not timed),
and prints seconds per image and the colour / position accuracy (imagen_jax.tools.eval_demo).
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
    parser.add_argument("--workdir", required=True, help="a demo base stage's workdir or export folder")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated SAMPLER:STEPS pairs")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        benchmark(args.workdir, parse_runs(args.runs), guidance_scale=args.guidance_scale)
        return 0

    return main_guard("sampler_bench", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
