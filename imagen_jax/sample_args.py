"""The sampling flags that sample.py and tools.compare share, parsed before JAX is imported: prompts from
flags or a file, and per-stage settings ('5' for every stage, or '5,8,8' one per stage)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def steps_value(text: str) -> int | str:
    """A --steps value: a count ('50'), or a named step list of a discrete schedule ('smart50': DeepFloyd IF's)."""
    text = text.strip()
    return text if text[:1].isalpha() else int(text)


_KIND_NAMES = {int: "an int", float: "a float", str: "a string", steps_value: "an int or a step list's name"}


def add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for more")
    parser.add_argument("--prompts_file", help="text file (UTF-8) with one prompt per line")


def add_stage_flags(parser: argparse.ArgumentParser) -> None:
    """The per-stage sampler settings and the batch flags (read back with `stage_values`)."""
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    parser.add_argument(
        "--guidance_scale",
        default=None,
        help="classifier-free guidance: one value, or one per stage (a,b,c); default: configs'",
    )
    parser.add_argument(
        "--steps",
        default=None,
        help="sampler steps: one value, or one per stage (default: configs'); DeepFloyd IF stages also take IF's "
        "step lists by name (smart27, smart50, smart100, smart185, fast27, super27, super40, super100)",
    )
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m: one, or one per stage (default ddpm)")
    parser.add_argument(
        "--sr_noise_level",
        type=float,
        default=None,
        help="augmentation time of SR inputs, in [0, 1] (default: each SR config's "
        "diffusion.sr_noise_level, 0.2 unless set)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="images sampled at once")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """How the cascade's models load (`Imagen.load`'s text_encoder and dtype): shared by sample.py and the tools."""
    parser.add_argument(
        "--text_encoder",
        default=None,
        help="a T5 folder to encode the prompts with (default: the base stage's text.encoder; a DeepFloyd IF "
        "stage I folder's text_encoder/)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype of T5 and the U-Nets (default: the configs'; float32 is the faster on CPUs)",
    )


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """--prompt values, then the lines of --prompts_file; an unreadable or empty file is a parser error."""
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


def stage_values(
    args: argparse.Namespace, count: int, parser: argparse.ArgumentParser
) -> tuple[list | None, list | None, list | None]:
    """(steps, guidance scales, samplers) for `count` stages from the flags of `add_stage_flags`."""
    try:
        return (
            per_stage(args.steps, count, steps_value, "steps"),
            per_stage(args.guidance_scale, count, float, "guidance_scale"),
            per_stage(args.sampler, count, str, "sampler"),
        )
    except ValueError as e:
        parser.error(str(e))
        raise  # parser.error exits; this keeps type checkers sure the function returns


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """--lora: LoRA adapters files (tools.export --lora_only) merged into a stage's weights at load."""
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[STAGE=]FILE[:SCALE]",
        help="LoRA adapters for stage STAGE (1 = --workdir, 2 = the first --sr_workdir, ...; default 1) at SCALE "
        "(default 1.0), merged into its weights; repeatable (several adapters add up). An adapter made for another "
        "base is refused before any weights load",
    )


def adapter_values(
    args: argparse.Namespace, count: int, parser: argparse.ArgumentParser
) -> list[tuple[int, str, float]]:
    """(stage index from 0, file, scale) for each --lora of `count` stages; a bad value is a parser error."""
    adapters = []
    for value in args.lora:
        stage, sep, rest = value.partition("=")
        if not (sep and stage.isdigit()):  # no STAGE= (an '=' inside the path is the path's)
            stage, rest = "1", value
        path, sep, scale = rest.rpartition(":")
        try:
            factor = float(scale) if sep else 1.0
        except ValueError:
            sep = ""  # a ':' inside the path, no scale
        if not sep:
            path, factor = rest, 1.0
        if not 1 <= int(stage) <= count:
            parser.error(f"--lora {value!r}: the stage must be 1..{count} (the cascade's stages, base first)")
        if not math.isfinite(factor):
            parser.error(f"--lora {value!r}: the scale must be a finite number")
        if not path:
            parser.error(f"--lora {value!r}: no adapters file")
        adapters.append((int(stage) - 1, path, factor))
    return adapters


def interval_value(text: str) -> tuple[float, float]:
    """A --guidance_interval value 'LO:HI' (log-SNR; 'inf' and '-inf' allowed)."""
    low, sep, high = text.partition(":")
    if not sep:
        raise ValueError(text)
    return float(low), float(high)


_KIND_NAMES[interval_value] = "LO:HI (two log-SNR numbers)"


def add_edit_flags(parser: argparse.ArgumentParser) -> None:
    """Inpainting, image-to-image and the guidance options (read back with `edit_values`)."""
    parser.add_argument("--init_image", help="an image (PNG/JPEG) to edit: the start of every prompt's samples")
    parser.add_argument(
        "--mask",
        help="inpainting: a mask image the size of --init_image, white where the image is regenerated, black where "
        "it is kept (resized to each stage's size)",
    )
    parser.add_argument(
        "--strength",
        default=None,
        help="image-to-image: how much of the sampling runs from the noised --init_image, in [0, 1] (0: the input, "
        "1: text-to-image); one value, or one per stage (default 1)",
    )
    parser.add_argument(
        "--inpaint_resample",
        type=int,
        default=1,
        help="RePaint: each block of --inpaint_jump steps runs this many times (1: no resampling; ~this many "
        "times the model calls)",
    )
    parser.add_argument("--inpaint_jump", type=int, default=1, help="RePaint's jump length in steps (default 1)")
    parser.add_argument(
        "--guidance_interval",
        default=None,
        help="guide only where the log-SNR lies in LO:HI (e.g. -4:2; default: every step); one, or one per stage",
    )
    parser.add_argument(
        "--guidance_rescale",
        default=None,
        help="guidance rescale in [0, 1] (0: off, the default; 0.7 in its paper); one value, or one per stage",
    )


def edit_values(
    args: argparse.Namespace, count: int, parser: argparse.ArgumentParser
) -> tuple[list | None, list | None, list | None]:
    """(strengths, guidance intervals, guidance rescales) for `count` stages from the flags of `add_edit_flags`."""
    try:
        return (
            per_stage(args.strength, count, float, "strength"),
            per_stage(args.guidance_interval, count, interval_value, "guidance_interval"),
            per_stage(args.guidance_rescale, count, float, "guidance_rescale"),
        )
    except ValueError as e:
        parser.error(str(e))
        raise
