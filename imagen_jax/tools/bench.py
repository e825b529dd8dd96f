"""Throughput of the two halves of training on this machine: the train step (model mode, tools/bench_step.py)
and the input pipeline (data mode, tools/bench_data.py).

    python -m imagen_jax.tools.bench --config configs/demo.py [--steps 20] [--peak_tflops 989] [--config.a.b=...]
    python -m imagen_jax.tools.bench --config configs/base64.py --steps 0 --t5 xxl   # FLOPs only, T5-XXL in the step
    python -m imagen_jax.tools.bench --config configs/demo.py --loop [--steps 50]  # the training loop vs the bare step
    python -m imagen_jax.tools.bench --data [--sizes 64,256,1024] [--parallel 1,2,4] [--batch_size 64]
                                            [--seconds 10] [--shards GLOB] [--num_images 256]

Model mode prints a JSON object (images/s, FLOPs per step and image, MFU with --peak_tflops; with --loop the
training loop's images/s on real data beside the bare step's, tools/bench_loop.py) on stdout, and a line per
long phase (trace, FLOP count, compile, state init) on stderr as it goes; data mode a table
of images/s per output size and num_parallel_calls, with how to read it. The two modules' docstrings say how
each is measured. Bad arguments exit 2, other errors 1, each as one line `bench: error: ...`.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="model mode: the config whose train step is timed")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps after one warm-up step; 0 = FLOPs only (allocates nothing)"
    )
    parser.add_argument("--text_dim", type=int, default=64, help="width of the stand-in T5 (4096 = T5-XXL)")
    parser.add_argument(
        "--t5", default=None, help="a T5 of this real shape, random weights: xxl | xl | large | a config.json"
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak, for MFU (e.g. 989 H100 bf16)")
    parser.add_argument(
        "--loop", action="store_true", help="model mode: also time the training loop itself (data, feed, metrics)"
    )
    parser.add_argument("--data", action="store_true", help="data mode: time the input pipeline instead")
    parser.add_argument("--sizes", default="64,256,1024", help="data: output sizes, comma-separated")
    parser.add_argument("--parallel", default="1,2,4", help="data: num_parallel_calls values, comma-separated")
    parser.add_argument("--batch_size", type=int, default=64, help="data: per-host batch size")
    parser.add_argument("--seconds", type=float, default=10.0, help="data: timed wall seconds per (size, N)")
    parser.add_argument("--shards", default=None, help="data: read these shards instead of synthetic ones")
    parser.add_argument("--num_images", type=int, default=256, help="data: distinct synthetic records per size")
    args, overrides = parser.parse_known_args(argv)

    from imagen_jax.cli import main_guard
    from imagen_jax.errors import ConfigError, DataError, ImagenError, UsageError

    def body() -> int:
        if args.data == bool(args.config):
            raise UsageError("give either --config FILE (model mode) or --data (data mode)")
        if args.data:
            if overrides:
                raise UsageError(f"unknown arguments for --data: {' '.join(overrides)}")
            return data_mode()
        if args.steps < 0 or (args.loop and args.steps < 1):
            raise UsageError(
                f"--steps must be >= {int(args.loop)}{'' if args.loop else ' (0 = FLOPs only)'}, got {args.steps}"
            )
        if args.loop and (args.t5 or args.peak_tflops):
            raise UsageError("--loop trains on config.text.encoder's T5; it takes neither --t5 nor --peak_tflops")
        from imagen_jax import config as config_lib
        from imagen_jax.stage import config as stage_config

        try:
            config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
            stage_config.validate(config)  # a bad field is a one-line error here, not a traceback from the build
        except ConfigError as e:
            raise UsageError(str(e)) from None
        if args.loop:
            from imagen_jax.tools.bench_loop import benchmark_loop

            print(json.dumps(benchmark_loop(config, steps=args.steps), indent=2))
            return 0
        from imagen_jax.tools.bench_step import benchmark

        print(
            json.dumps(
                benchmark(config, steps=args.steps, text_dim=args.text_dim, peak_tflops=args.peak_tflops, t5=args.t5),
                indent=2,
            )
        )
        return 0

    def data_mode() -> int:
        from imagen_jax.tools import bench_data

        sizes, parallel = (
            bench_data.positive_ints(args.sizes, "--sizes"),
            bench_data.positive_ints(args.parallel, "--parallel"),
        )
        bench_data.check_data_args(sizes, parallel, args.batch_size, args.seconds, args.num_images)
        if args.shards is not None:  # shards that match nothing, or hold nothing usable: a bad argument
            try:
                bench_data.list_shards(args.shards)
            except ImagenError as e:
                raise UsageError(str(e)) from None
        try:
            results = bench_data.benchmark_data(
                sizes, parallel, args.batch_size, args.seconds, args.shards, num_images=args.num_images
            )
        except DataError as e:
            raise UsageError(f"{args.shards}: {e}") if args.shards else e from None
        print(bench_data.format_data_report(results, synthetic=args.shards is None))
        return 0

    return main_guard("bench", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
