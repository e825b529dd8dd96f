"""Sample images from prompts through the cascade: the base stage, then each super-resolution stage.

    python sample.py --workdir runs/demo/train --prompt "a red circle on the left" --num_images 4 --out samples/
    python sample.py --workdir BASE --sr_workdir SR256 --sr_workdir SR1024 --steps 256,64,32 \
        --guidance_scale 5,8,8 --sampler ddpm,dpmpp_2m,dpmpp_2m --prompt "a corgi" --out samples/
    python sample.py --workdir IF-I-XL-v1.0 --sr_workdir IF-II-L-v1.0 --prompt "a corgi" --out samples/

A stage is a training workdir, an export folder, or a DeepFloyd IF pipeline folder as diffusers saves it (its
defaults are diffusers': stage I 100 steps at guidance 7, stage II 50 at 4; --steps also takes IF's step lists
by name, e.g. smart50).

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

from imagen_jax.sample_args import (
    adapter_values,
    add_adapter_flags,
    add_edit_flags,
    add_model_flags,
    add_prompt_flags,
    add_stage_flags,
    edit_values,
    read_prompts,
    stage_values,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", required=True, help="the base stage's workdir, export folder or DeepFloyd IF folder"
    )
    parser.add_argument(
        "--sr_workdir", action="append", default=[], help="a super-resolution stage, in order; repeatable"
    )
    add_prompt_flags(parser)
    add_stage_flags(parser)
    add_model_flags(parser)
    add_adapter_flags(parser)
    add_edit_flags(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run in --out")
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    stages = [args.workdir, *args.sr_workdir]
    steps, scales, samplers = stage_values(args, len(stages), parser)
    adapters = adapter_values(args, len(stages), parser)
    strengths, intervals, rescales = edit_values(args, len(stages), parser)

    from imagen_jax.cli import main_guard
    from imagen_jax.sample_files import Edit, check_arguments, check_writable, sample_to_folder

    edit = Edit(
        init_image=args.init_image,
        mask=args.mask,
        strengths=strengths,
        inpaint_resample=args.inpaint_resample,
        inpaint_jump=args.inpaint_jump,
        guidance_intervals=intervals,
        guidance_rescales=rescales,
    )

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
            edit=edit,
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
            text_encoder=args.text_encoder,
            dtype=args.dtype,
            adapters=adapters,
            edit=edit,
        )
        print(json.dumps({"out": args.out, "images": len(written)}))
        return 0

    return main_guard("sample.py", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
