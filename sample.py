"""Sample images from prompts through the cascade: the base stage, then each super-resolution stage.

    python sample.py --workdir runs/demo/train --prompt "a red circle on the left" --num_images 4 --out samples/
    python sample.py --workdir BASE --sr_workdir SR256 --sr_workdir SR1024 --steps 256,64,32 \
        --guidance_scale 5,8,8 --sampler ddpm,dpmpp_2m,dpmpp_2m --prompt "a corgi" --out samples/

Each stage uses the EMA weights of its workdir's latest checkpoint (or an export folder). Writes one PNG per
image at the final resolution (N per prompt; image i of the run uses seed S + i), the earlier stages' images
in <size>px/ folders, a grid.png with one row per prompt, and samples.json mapping every file to its prompt,
seed and per-stage settings, written last: a folder with a samples.json is complete. Same seed, same images.
A folder that already holds another run's images is refused unless --overwrite.

Bad arguments are rejected before any model loads (exit 2); unreadable or wrongly ordered stages and failed
writes exit 1. Either way the error is one line on stderr.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_KIND_NAMES = {int: "an int", float: "a float", str: "a string"}


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                from_file = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read --prompts_file {args.prompts_file!r}: {e}")
        if not from_file:
            parser.error(f"--prompts_file {args.prompts_file!r} has no prompts (every line is blank)")
        prompts += from_file
    return prompts


def per_stage(value: str | None, count: int, kind: Callable, name: str) -> list | None:
    """'a' -> [a] * count; 'a,b,c' -> one per stage; None -> None (the stages' configs decide). Wrong counts or
    types: ValueError naming the flag."""
    if value is None:
        return None
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, count):
        raise ValueError(f"--{name} has {len(parts)} values for {count} stages (give one, or one per stage)")
    try:
        parsed = [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"--{name} {value!r}: each value must be {_KIND_NAMES.get(kind, kind.__name__)}") from None
    return parsed * count if len(parsed) == 1 else parsed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="the base stage's workdir or export folder")
    parser.add_argument(
        "--sr_workdir", action="append", default=[], help="a super-resolution stage, in order; repeatable"
    )
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for more")
    parser.add_argument("--prompts_file", help="text file (UTF-8) with one prompt per line")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    parser.add_argument(
        "--guidance_scale",
        default=None,
        help="classifier-free guidance: one value, or one per stage (a,b,c); default: configs'",
    )
    parser.add_argument("--steps", default=None, help="sampler steps: one value, or one per stage (default: configs')")
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m: one, or one per stage (default ddpm)")
    parser.add_argument(
        "--sr_noise_level",
        type=float,
        default=None,
        help="augmentation time of SR inputs, in [0, 1] (default: each SR config's "
        "diffusion.sr_noise_level, 0.2 unless set)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="images sampled at once")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run in --out")
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    stages = [args.workdir, *args.sr_workdir]
    try:
        steps = per_stage(args.steps, len(stages), int, "steps")
        scales = per_stage(args.guidance_scale, len(stages), float, "guidance_scale")
        samplers = per_stage(args.sampler, len(stages), str, "sampler")
    except ValueError as e:
        parser.error(str(e))

    from imagen_jax.cli import main_guard
    from imagen_jax.sample_files import check_arguments, check_writable, sample_to_folder

    def body() -> int:
        # Everything that can be checked is, before any model loads.
        check_arguments(
            num_prompts=len(prompts),
            num_stages=len(stages),
            num_images=args.num_images,
            seed=args.seed,
            batch_size=args.batch_size,
            sr_noise_level=args.sr_noise_level,
            steps=steps,
            guidance_scales=scales,
            samplers=samplers,
        )
        check_writable(args.out, overwrite=args.overwrite)
        written = sample_to_folder(
            stages,
            prompts,
            out=args.out,
            num_images=args.num_images,
            seed=args.seed,
            steps=steps,
            guidance_scales=scales,
            samplers=samplers,
            sr_noise_level=args.sr_noise_level,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
        )
        print(json.dumps({"out": args.out, "images": len(written)}))
        return 0

    return main_guard("sample.py", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
