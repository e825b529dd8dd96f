"""DreamBooth (arXiv 2208.12242): teach a trained stage one subject from a few images, under a rare identifier.

    python -m imagen_jax.tools.dreambooth --instance_images DIR --instance_prompt "a sks ring" \\
        --class_prompt "a ring" --init_from STAGE --workdir OUT [--base_stages BASE [SR ...]] \\
        [--num_class_images 100] [--text_encoder T5] [--class_steps N ...] [--class_guidance_scale G ...] \\
        [--config.train.num_steps=800 --config.train.prior_loss_weight=1.0 ...]

STAGE is a training workdir, an export folder or a DeepFloyd IF folder (any stage kind). The run is one command:
  1. the instance images (3-20 is the paper's range; 1-100 are taken), resized and centre-cropped to the stage's
     image size, become OUT/instance_data/00000.tfrecord, each captioned with the instance prompt;
  2. `--num_class_images` class images are sampled from the starting model with the class prompt into
     OUT/class_images/NNNNN.png (image i from seed --class_seed + i), beside a manifest.json naming the prompt,
     stages and sampler settings. A rerun samples only the images still missing; a folder made with other
     settings is refused. An SR stage's class images are the cascade's output at its size: pass the stages
     before it with --base_stages (training makes their low-res inputs by downsampling, as SR training does);
  3. train.py's loop trains in OUT/train from STAGE's weights (train.init_from), each batch half instance and
     half class examples (data.prior_shards), the loss mean(instance) + train.prior_loss_weight * mean(class).
     `--num_class_images 0` trains on the instance images alone (no prior preservation).
The starting stage's own config is the run's, with DreamBooth's training settings (DEFAULTS); any `--config.*`
override (LoRA or a trainable subset included) goes last. Rerunning the same command resumes where it stopped.
Bad arguments exit 2, other errors 1, each as one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from imagen_jax.errors import DataError, UsageError  # noqa: E402 (after the TF settings above)
from imagen_jax.files import write_atomically  # noqa: E402

MAX_INSTANCE_IMAGES = 100
PAPER_RANGE = (3, 20)  # instance images the paper fine-tunes on
MANIFEST = "manifest.json"
# DreamBooth's training settings, set over the starting stage's config (its model, text and diffusion fields
# stay) before the command line's --config overrides: a short constant-rate fine-tune of a small batch, an EMA
# that follows it within the run, grids of both prompts, no evaluation during training.
DEFAULTS = {
    "train.batch_size": 4,
    "train.num_steps": 800,
    "train.learning_rate": 1e-5,
    "train.warmup_steps": 0,
    "train.end_lr_fraction": 1.0,
    "train.ema_decay": 0.99,
    "train.checkpoint_every": 200,
    "train.log_every": 50,
    "train.sample_every": 200,
    "eval.every": 0,
    "data.shuffle_buffer": 1000,
}


def instance_images(folder: str, size: int, warn: Callable[[str], None] = print) -> list[np.ndarray]:
    """The images in `folder` (hidden files skipped), RGB uint8 [size, size, 3]: transparent pixels on white, then
    the largest centred square scaled to `size`. A file that is not an image, or fewer than 1 or more than
    MAX_INSTANCE_IMAGES images, is a DataError naming it; outside the paper's 3-20, a warning."""
    if not os.path.isdir(folder):
        raise DataError(f"--instance_images {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    if not 1 <= len(names) <= MAX_INSTANCE_IMAGES:
        raise DataError(f"--instance_images {folder!r} holds {len(names)} files; DreamBooth takes 1 to 100 images")
    if not PAPER_RANGE[0] <= len(names) <= PAPER_RANGE[1]:
        warn(f"warning: {len(names)} instance images; DreamBooth's paper fine-tunes on 3 to 20")
    images = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"instance image {path!r} is not an image PIL can read ({type(e).__name__})") from None
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
        images.append(np.asarray(image))
    return images


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: str, images: Sequence[np.ndarray], caption: str) -> str:
    """One img2dataset-format TFRecord shard of PNG `images`, all captioned `caption` (data/records.py)."""
    import tensorflow as tf

    from imagen_jax.data.records import example_from_sample

    tf.io.gfile.makedirs(os.path.dirname(path))
    partial = f"{path}.partial-{os.getpid()}"
    with tf.io.TFRecordWriter(partial) as writer:
        for index, image in enumerate(images):
            side = int(image.shape[0])
            meta = {"status": "success", "width": side, "height": side, "original_width": side, "original_height": side}
            example = example_from_sample(f"{index:05d}", _png(image), "png", caption.encode("utf-8"), meta)
            writer.write(example.SerializeToString())
    tf.io.gfile.rename(partial, path, overwrite=True)
    return path


def class_images(
    folder: str,
    stages: Sequence[str],
    prompt: str,
    count: int,
    *,
    seed: int = 0,
    steps: Sequence[int | str] | None = None,
    guidance_scales: Sequence[float] | None = None,
    sampler: str = "ddpm",
    text_encoder: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
) -> list[np.ndarray]:
    """The first `count` class images of `folder` (uint8, the last stage's size), sampled from the cascade
    `stages` with `prompt` where missing: image i from seed + i, each PNG written as soon as its batch is done, so
    a killed run loses at most one batch. The manifest pins what the images are samples of; a folder whose
    manifest differs is a DataError naming the first differing setting. The model loads only when images are
    missing."""
    from imagen_jax import images as images_lib
    from imagen_jax.sample_files import stage_settings

    identity = {
        "class_prompt": prompt,
        "stages": [os.path.abspath(s) if "://" not in s else s for s in stages],
        "seed": seed,
        "steps": list(steps) if steps is not None else None,
        "guidance_scales": list(guidance_scales) if guidance_scales is not None else None,
        "sampler": sampler,
    }
    stage_settings(len(stages), steps, guidance_scales, [sampler] * len(stages))  # before any model loads
    manifest = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                saved = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{manifest}: cannot read the class images' manifest ({e})") from None
        if not isinstance(saved, dict):
            raise DataError(f"{manifest}: not a class images' manifest (a JSON object)")
        for key, value in identity.items():
            if saved.get(key) != value:
                raise DataError(
                    f"{manifest} holds class images made with {key}={saved.get(key)!r}, not {value!r}: use another "
                    f"--workdir, or delete {folder} to sample them again"
                )
    else:
        os.makedirs(folder, exist_ok=True)
        write_atomically(manifest, json.dumps(identity, indent=2))
    paths = [os.path.join(folder, f"{i:05d}.png") for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not os.path.exists(path)]
    if missing:
        from imagen_jax.cascade import Imagen

        log(f"sampling {len(missing)} of {count} class images for {prompt!r} into {folder}")
        imagen = Imagen.load(stages, text_encoder=text_encoder, dtype=dtype)
        steps_, scales, samplers = stage_settings(
            len(stages), steps, guidance_scales, [sampler] * len(stages), [s.config for s in imagen.stages]
        )
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            outputs = imagen(
                [prompt] * len(chunk),
                [seed + i for i in chunk],
                steps=steps_,
                guidance_scales=scales,
                samplers=samplers,
            )
            for i, image in zip(chunk, images_lib.to_uint8(outputs[-1])):
                write_atomically(paths[i], _png(image))
            log(f"class images: {start + len(chunk)} of {len(missing)} sampled")
    return [_read_png(path) for path in paths]


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def training_config(cascade: Sequence[str], prompts: Sequence[str], overrides: Sequence[str], text_encoder: str | None):
    """The config of the cascade's last stage (the one trained) with DEFAULTS, train.init_from, `prompts` as the
    sample grids' (instance and class prompt) and T5 `text_encoder` (default: the stage's own, else the first
    stage's, which the class images are sampled with: an IF stage II folder has none), then the command line's
    --config overrides."""
    from imagen_jax import config as config_lib
    from imagen_jax.errors import ConfigError
    from imagen_jax.stage.stage import stage_config
    from imagen_jax.train import init_from as init_from_lib

    config = stage_config(cascade[-1])
    for key, value in DEFAULTS.items():
        config_lib.apply_override(config, key, repr(value))
    config.train.init_from = cascade[-1]
    config.train.sample_prompts = tuple(prompts)
    config.text.encoder = text_encoder or config.text.encoder or stage_config(cascade[0]).text.encoder
    try:
        config = config_lib.apply_overrides(config, list(overrides))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return init_from_lib.adopt_source(config)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instance_images", required=True, help="folder of the subject's images (3-20)")
    parser.add_argument("--instance_prompt", required=True, help='with a rare identifier, e.g. "a sks ring"')
    parser.add_argument("--class_prompt", required=True, help='the subject\'s class, e.g. "a ring"')
    parser.add_argument("--init_from", required=True, help="the stage to fine-tune: workdir, export or IF folder")
    parser.add_argument(
        "--workdir", required=True, help="a local folder: instance/class data, class images, the run (train/)"
    )
    parser.add_argument(
        "--base_stages", nargs="+", default=[], help="SR stages: the cascade's stages before --init_from"
    )
    parser.add_argument("--num_class_images", type=int, default=100, help="0: no prior preservation")
    parser.add_argument("--class_seed", type=int, default=0, help="class image i is sampled from seed + i")
    parser.add_argument("--class_steps", nargs="+", help="sampler steps per stage (default: the configs')")
    parser.add_argument("--class_guidance_scale", nargs="+", type=float, help="per stage (default: the configs')")
    parser.add_argument("--class_sampler", default="ddpm", help="ddpm | ddim | dpmpp_2m")
    parser.add_argument("--class_batch_size", type=int, default=8, help="class images sampled at once")
    parser.add_argument("--text_encoder", help="T5 folder (default: the starting stage's text.encoder)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="class sampling's compute dtype")
    args, overrides = parser.parse_known_args(argv)

    from imagen_jax.cli import main_guard

    def body() -> int:
        if args.num_class_images < 0 or args.class_batch_size < 1:
            raise UsageError("--num_class_images must be >= 0 and --class_batch_size >= 1")
        if not args.instance_prompt.strip() or not args.class_prompt.strip():
            raise UsageError("--instance_prompt and --class_prompt must not be empty")
        steps = [int(s) if s.isdigit() else s for s in args.class_steps] if args.class_steps else None
        cascade = [*args.base_stages, args.init_from]
        config = training_config(cascade, (args.instance_prompt, args.class_prompt), overrides, args.text_encoder)
        size = int(config.data.image_size)
        images = instance_images(args.instance_images, size)
        config.data.train_shards = write_shard(
            os.path.join(args.workdir, "instance_data", "00000.tfrecord"), images, args.instance_prompt
        )
        print(f"{len(images)} instance images at {size}x{size} for {args.instance_prompt!r}", flush=True)
        if args.num_class_images:
            prior = class_images(
                os.path.join(args.workdir, "class_images"),
                cascade,
                args.class_prompt,
                args.num_class_images,
                seed=args.class_seed,
                steps=steps,
                guidance_scales=args.class_guidance_scale,
                sampler=args.class_sampler,
                text_encoder=args.text_encoder,
                dtype=args.dtype,
                batch_size=args.class_batch_size,
            )
            config.data.prior_shards = write_shard(
                os.path.join(args.workdir, "class_data", "00000.tfrecord"), prior, args.class_prompt
            )
        from imagen_jax.train.loop import run

        run(config, os.path.join(args.workdir, "train"))
        return 0

    return main_guard("dreambooth", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
