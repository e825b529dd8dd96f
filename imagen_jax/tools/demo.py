"""The end-to-end CPU demo: data -> tiny T5 -> train -> sample -> score, in one command.

    python -m imagen_jax.tools.demo --workdir runs/demo

1. writes the coloured-shapes dataset as img2dataset TFRecord shards (<workdir>/data),
2. builds a tiny random T5 in Hugging Face format with a tokenizer trained on the captions (<workdir>/t5),
3. trains configs/demo.py on them (<workdir>/train; rerunning resumes from the latest checkpoint),
4. samples a few prompts with sample.py's code (<workdir>/samples),
5. scores prompt following on every demo caption (eval_demo) and prints the figures.
Each step is also its own command; the README lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import tensorflow as tf

from imagen_jax import config as config_lib
from imagen_jax.data import demo as demo_data
from imagen_jax.sample_files import sample_to_folder
from imagen_jax.text.tiny import make_tiny_t5
from imagen_jax.tools import eval_demo
from imagen_jax.train.loop import run

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py")
PROMPTS = ("a red circle on the left", "a blue square at the top", "a yellow triangle on the right",
           "a green circle at the bottom", "a purple square in the middle", "a cyan triangle on the left")


def prepare(workdir: str, *, num_examples: int, image_size: int, seed: int) -> tuple[str, str]:
    """Writes the demo shards and the tiny T5 folder unless they exist; returns (shard glob, T5 folder)."""
    data_dir, t5_dir = os.path.join(workdir, "data"), os.path.join(workdir, "t5")
    if not tf.io.gfile.glob(os.path.join(data_dir, "*.tfrecord")):
        paths = demo_data.write_demo_shards(data_dir, num_examples=num_examples, image_size=image_size,
                                            num_shards=4, seed=seed)
        print(f"wrote {num_examples} demo examples in {len(paths)} shards to {data_dir}", flush=True)
    if not os.path.exists(os.path.join(t5_dir, "model.safetensors")):
        make_tiny_t5(t5_dir, demo_data.all_captions(), seed=seed)
        print(f"wrote a tiny random T5 to {t5_dir}", flush=True)
    return os.path.join(data_dir, "*.tfrecord"), t5_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--num_examples", type=int, default=4000, help="demo dataset size")
    parser.add_argument("--config", default=DEMO_CONFIG, help="the training config (default configs/demo.py)")
    args, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    shards, t5_dir = prepare(args.workdir, num_examples=args.num_examples, image_size=config.data.image_size,
                             seed=config.seed)
    config.data.train_shards, config.text.encoder = shards, t5_dir
    train_dir = os.path.join(args.workdir, "train")
    run(config, train_dir)
    trained = time.perf_counter()
    guidance, steps = config.train.sample_guidance_scale, config.train.sample_steps
    sample_to_folder(train_dir, list(PROMPTS), out=os.path.join(args.workdir, "samples"), num_images=4, seed=0,
                     steps=steps, guidance_scale=guidance, batch_size=32)
    results = eval_demo.evaluate(train_dir, guidance_scale=guidance, steps=steps,
                                 out=os.path.join(args.workdir, "eval"))
    results["train_minutes"] = (trained - start) / 60
    results["total_minutes"] = (time.perf_counter() - start) / 60
    with open(os.path.join(args.workdir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"samples: {os.path.join(args.workdir, 'samples', 'grid.png')}; scores: {os.path.join(args.workdir, 'demo_results.json')}")


if __name__ == "__main__":
    main()
