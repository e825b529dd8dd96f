"""The end-to-end CPU demo: data -> tiny T5 -> train -> sample -> score, in one command.

    python -m imagen_jax.tools.demo --workdir runs/demo

1. writes the coloured-shapes dataset at 32x32 as img2dataset TFRecord shards (<workdir>/data),
2. builds a tiny random T5 in Hugging Face format with a tokenizer trained on the captions (<workdir>/t5),
3. trains the 16x16 base stage, configs/demo.py (<workdir>/train), and the 16->32 super-resolution
   stage, configs/demo_sr.py (<workdir>/train_sr); rerunning resumes from the latest checkpoints,
4. samples a few prompts through the cascade with sample.py's code (<workdir>/samples),
5. scores prompt following on every demo caption and the SR stage's fidelity and sharpness (eval_demo).
Each step is also its own command; the README lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
PROMPTS = (
    "a red circle on the left",
    "a blue square at the top",
    "a yellow triangle on the right",
    "a green circle at the bottom",
    "a purple square in the middle",
    "a cyan triangle on the left",
)


def prepare(workdir: str, *, num_examples: int, image_size: int, seed: int) -> tuple[str, str]:
    """Writes the demo shards and the tiny T5 folder unless they exist; returns (shard glob, T5 folder)."""
    import tensorflow as tf

    from imagen_jax.data import demo as demo_data
    from imagen_jax.text.tiny import make_tiny_t5

    data_dir, t5_dir = os.path.join(workdir, "data"), os.path.join(workdir, "t5")
    if not tf.io.gfile.glob(os.path.join(data_dir, "*.tfrecord")):
        paths = demo_data.write_demo_shards(
            data_dir, num_examples=num_examples, image_size=image_size, num_shards=4, seed=seed
        )
        print(f"wrote {num_examples} demo examples in {len(paths)} shards to {data_dir}", flush=True)
    if not os.path.exists(os.path.join(t5_dir, "model.safetensors")):
        make_tiny_t5(t5_dir, demo_data.all_captions(), seed=seed)
        print(f"wrote a tiny random T5 to {t5_dir}", flush=True)
    return os.path.join(data_dir, "*.tfrecord"), t5_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--num_examples", type=int, default=4000, help="demo dataset size")
    parser.add_argument("--base_config", default=os.path.join(CONFIGS, "demo.py"))
    parser.add_argument("--sr_config", default=os.path.join(CONFIGS, "demo_sr.py"))
    args = parser.parse_args(argv)
    if args.num_examples < 1:
        parser.error(f"--num_examples must be >= 1, got {args.num_examples}")
    from imagen_jax.cli import main_guard

    def body() -> int:
        from imagen_jax import config as config_lib
        from imagen_jax.errors import ConfigError, UsageError

        try:
            base = config_lib.load_config_file(args.base_config)
            sr = config_lib.load_config_file(args.sr_config)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        run_demo(args.workdir, base, sr, num_examples=args.num_examples)
        return 0

    return main_guard("demo", body)


def run_demo(workdir: str, base, sr, *, num_examples: int) -> dict:
    """Data and T5, both stages trained (or resumed), cascade samples and scores; returns the scores."""
    from imagen_jax.sample_files import sample_to_folder
    from imagen_jax.tools import eval_demo
    from imagen_jax.train.loop import run

    start = time.perf_counter()
    shards, t5_dir = prepare(workdir, num_examples=num_examples, image_size=sr.data.image_size, seed=base.seed)
    train_dir, sr_dir = os.path.join(workdir, "train"), os.path.join(workdir, "train_sr")
    for config, stage_dir in ((base, train_dir), (sr, sr_dir)):
        config.data.train_shards, config.text.encoder = shards, t5_dir
        run(config, stage_dir)
    trained = time.perf_counter()
    guidance, steps = base.train.sample_guidance_scale, base.train.sample_steps
    sample_to_folder(
        [train_dir, sr_dir],
        list(PROMPTS),
        out=os.path.join(workdir, "samples"),
        num_images=4,
        seed=0,
        steps=[steps, sr.train.sample_steps],
        guidance_scales=[guidance, 1.0],
        batch_size=32,
        overwrite=True,
    )
    results = eval_demo.evaluate(
        train_dir,
        guidance_scale=guidance,
        steps=steps,
        out=os.path.join(workdir, "eval"),
        sr_workdir=sr_dir,
        sr_steps=sr.train.sample_steps,
    )
    results["super_resolution"] = eval_demo.evaluate_sr(train_dir, sr_dir, steps=sr.train.sample_steps)
    results["train_minutes"] = (trained - start) / 60
    results["total_minutes"] = (time.perf_counter() - start) / 60
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(
        f"samples: {os.path.join(workdir, 'samples', 'grid.png')}; scores: {os.path.join(workdir, 'demo_results.json')}"
    )
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
