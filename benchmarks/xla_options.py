"""Where XLA:CPU loses time in our train step, and whether a compiler option wins it back, on this machine's CPU.

    python benchmarks/xla_options.py step [--model tiny32] [--rounds 4] [--options '{"name": {"xla_...": value}}']
    python benchmarks/xla_options.py convs

`step` compiles one layout's real train step (ours.py, as side_by_side.py times it) once per option set
(`compiler_options` of `Lowered.compile`, each set on top of the package's XLA_FLAGS) and times the variants
alternately, round after round, in one process: the machine's drift hits all alike. Printed: median and min of
each variant's per-round best-of-2 step, and the first variant's median over each one's (> 1: faster). The default
sets are the options tried for issue 14 (benchmarks/README.md says what they gave).

`convs` times a 3x3 convolution's three parts (forward, input gradient, weight gradient) as XLA compiles them, and
the weight gradient written two other ways (im2col: one matrix product over the nine shifted inputs side by side;
nine products, one per tap), at the shapes of the tiny32 and base64-small U-Nets, in GFLOP/s (2 x multiply-adds,
padding taps included). Each variant is first checked against XLA's weight gradient.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's imagen_jax, whichever is installed in the venv

import imagen_jax  # noqa: E402,F401  (sets the package's XLA_FLAGS before JAX starts)

OPTIONS_TRIED = {
    "package default": {},
    "oneDNN": {"xla_cpu_use_onednn": True},
    "oneDNN custom calls": {"xla_cpu_experimental_onednn_custom_call": True},
    "512-bit vectors": {"xla_cpu_prefer_vector_width": 512},
    "concurrency scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "tiling propagation": {"xla_cpu_experimental_enable_tiling_propagation": True},
}

# (batch, side, channels in, channels out): tiny32's levels and a base64-small level.
CONV_SHAPES = [(32, 32, 32, 32), (32, 16, 64, 64), (32, 8, 128, 128), (32, 32, 64, 32), (8, 64, 128, 128)]


def step_mode(model: str, rounds: int, options: dict) -> None:
    import jax
    from layouts import LAYOUTS
    from ours import Ours

    if model not in LAYOUTS:
        raise SystemExit(f"xla_options: error: unknown model {model!r}; one of {', '.join(LAYOUTS)}")
    ours = Ours(LAYOUTS[model])
    args = (ours.text.params, ours.batch)
    compiled = {}
    for name, opts in options.items():
        if not opts:  # the package's own flags: the step Ours compiled already
            compiled[name] = ours.step
            continue
        start = time.perf_counter()
        compiled[name] = ours.trainer.train_step.lower(ours.state, *args, ours.streak).compile(compiler_options=opts)
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    state = ours.state
    for _ in range(rounds):
        for name, step in compiled.items():
            state, metrics = step(state, *args, ours.streak)  # this variant's warm-up
            jax.block_until_ready(metrics)
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                state, metrics = step(state, *args, ours.streak)
                jax.block_until_ready(metrics)
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    base = statistics.median(next(iter(times.values())))
    print(f"{'variant':24s} {'median ms':>10s} {'min ms':>8s} {'first / this':>13s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:24s} {median * 1e3:10.1f} {min(values) * 1e3:8.1f} {base / median:13.3f}")


def convs_mode() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    numbers = ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=numbers)

    def weight_grad(x, w, g):
        return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

    def input_grad(x, w, g):
        return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

    def shifted(x):
        side = x.shape[1]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [padded[:, i : i + side, j : j + side, :] for i in range(3) for j in range(3)]

    def im2col(x, w, g):
        columns = jnp.concatenate(shifted(x), axis=-1).reshape(-1, 9 * x.shape[-1])
        product = lax.dot_general(columns, g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
        return product.reshape(w.shape)

    def nine_products(x, w, g):
        flat_g = g.reshape(-1, g.shape[-1])
        taps = [lax.dot_general(s.reshape(-1, x.shape[-1]), flat_g, (((0,), (0,)), ((), ()))) for s in shifted(x)]
        return jnp.stack(taps).reshape(w.shape)

    def seconds(fn, *args, repeats: int = 20) -> float:
        fn = jax.jit(fn)
        jax.block_until_ready(fn(*args))
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    variants = {"forward": conv, "input grad": input_grad, "weight grad": weight_grad,
                "w-grad im2col": im2col, "w-grad 9 products": nine_products}  # fmt: skip
    print(f"{'batch x side, in -> out':26s}" + "".join(f"{name:>19s}" for name in variants) + "   (GFLOP/s)")
    rng = np.random.default_rng(0)
    for batch, side, cin, cout in CONV_SHAPES:
        x = jnp.asarray(rng.normal(size=(batch, side, side, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(batch, side, side, cout)), jnp.float32)
        reference = jax.jit(weight_grad)(x, w, g)
        for name in ("w-grad im2col", "w-grad 9 products"):
            error = float(jnp.max(jnp.abs(jax.jit(variants[name])(x, w, g) - reference)) / jnp.max(jnp.abs(reference)))
            if error > 1e-4:
                raise SystemExit(f"xla_options: error: {name} differs from XLA's weight gradient by {error:.2g}")
        gflop = 2 * batch * side * side * 9 * cin * cout / 1e9
        rates = [gflop / seconds(fn, *((x, w) if name == "forward" else (x, w, g))) for name, fn in variants.items()]
        print(f"{f'{batch} x {side}x{side}, {cin} -> {cout}':26s}" + "".join(f"{r:19.0f}" for r in rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("step", "convs"))
    parser.add_argument("--model", default="tiny32", help="step: a layout of layouts.py")
    parser.add_argument("--rounds", type=int, default=4, help="step: alternating rounds")
    parser.add_argument("--options", default=None, help="step: JSON {name: {option: value}}; default: the tried sets")
    args = parser.parse_args()
    if args.mode == "convs":
        convs_mode()
        return
    try:
        options = json.loads(args.options) if args.options else OPTIONS_TRIED
    except json.JSONDecodeError as e:
        raise SystemExit(f"xla_options: error: --options is not JSON: {e}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()) or not options:
        raise SystemExit('xla_options: error: --options must be a JSON object {"name": {"option": value}, ...}')
    step_mode(args.model, args.rounds, options)


if __name__ == "__main__":
    main()
