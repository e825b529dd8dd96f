"""Sample images from prompts with a trained stage's EMA weights.

    python sample.py --workdir runs/demo --prompt "a red circle on the left" --num_images 4 --out samples/

Writes one PNG per image (N per prompt; image i of the run uses seed S + i), a grid.png with one row per
prompt, and samples.json mapping every file to its prompt, seed and settings. Same seed, same images.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read --prompts_file {args.prompts_file!r}: {e}")
    if not prompts:
        parser.error("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE with one prompt per line")
    return prompts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the trained stage's workdir (latest checkpoint is used)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for more")
    parser.add_argument("--prompts_file", help="text file with one prompt per line")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    parser.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance (default: config's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: config's)")
    parser.add_argument("--batch_size", type=int, default=16, help="images sampled at once")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    for name in ("num_images", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")

    from imagen_jax.sample_files import sample_to_folder

    try:
        written = sample_to_folder(
            args.workdir, prompts, out=args.out, num_images=args.num_images, seed=args.seed,
            steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"sample.py: error: {e}\n")
    print(json.dumps({"out": args.out, "images": len(written)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
