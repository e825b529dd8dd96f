"""FID, KID and CLIP score of a trained cascade over guidance scales, against reference statistics.

    python -m imagen_jax.tools.evaluate --workdir runs/base64 [--sr_workdir runs/sr256] \
        --captions coco/annotations/captions_val2014.json --num_images 30000 \
        --reference stats/coco_val2014_256.npz --inception weights/inception-2015-12-05.safetensors \
        --clip weights/clip-vit-base-patch32 --guidance_scale 1,1.35,3,5,8 --out runs/base64/eval_30k
    python -m imagen_jax.tools.evaluate --workdir IF-I-XL-v1.0 --sr_workdir IF-II-L-v1.0 --steps smart100,smart50 \
        --guidance_scale 7 --sr_guidance_scale 4 --dtype bfloat16 ...   # DeepFloyd IF's folders (README)

Samples `--num_images` captions (a seeded subset of COCO's caption JSON, one per image; a text file, one per
line; or the caption field of img2dataset shards) through the cascade at each base guidance scale (SR stages use
--sr_guidance_scale, default 1), caption i with seed --seed + i, and scores every image: Inception features
against --reference (tools.fid_reference; refused when its resize, Inception weights or image size differ) and,
with --clip (a Hugging Face CLIPModel folder), the CLIP score of image and caption. Writes OUT/results.json
(per scale: FID, KID and precision/recall when the reference keeps its features, CLIP score), OUT/fid_vs_clip.png
(the trade-off curve) and a sample grid per scale.

Each batch's scores are written as it finishes: rerun the same command after an interruption and finished
batches are read back, not recomputed. A different command on the same --out is refused (OUT/evaluation.json
records the settings). With --distributed, every process runs the command, samples its share of the batches on
its own devices, and process 0 writes the results; OUT must then be shared storage (gs://).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from imagen_jax.sample_args import add_model_flags, per_stage, steps_value

SETTINGS_FILE = "evaluation.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", required=True, help="the base stage's workdir, export folder or DeepFloyd IF folder"
    )
    parser.add_argument("--sr_workdir", action="append", default=[], help="an SR stage, in order; repeatable")
    parser.add_argument("--captions", required=True, help="captions_val2014.json, a .txt file, or shards")
    parser.add_argument("--num_images", type=int, required=True, help="captions sampled per guidance scale")
    parser.add_argument("--reference", required=True, help="reference statistics (.npz, tools.fid_reference)")
    parser.add_argument("--inception", required=True, help="Inception weights (.safetensors, tools.convert_inception)")
    parser.add_argument("--clip", help="a Hugging Face CLIPModel folder (CLIP score); omitted: no CLIP score")
    parser.add_argument("--guidance_scale", default="1,1.35,3,5,8", help="base-stage guidance scales to sweep")
    parser.add_argument("--sr_guidance_scale", default="1", help="SR stages' guidance: one, or one per SR stage")
    parser.add_argument("--steps", default=None, help="sampler steps: one, or one per stage (default: configs')")
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m: one, or one per stage")
    parser.add_argument("--seed", type=int, default=0, help="caption subset seed; caption i samples with seed + i")
    parser.add_argument("--batch_size", type=int, default=32, help="images sampled and scored at once")
    add_model_flags(parser)
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument("--distributed", action="store_true", help="join a multi-host run (parallel/distributed.py)")
    args = parser.parse_args(argv)
    stages = [args.workdir, *args.sr_workdir]
    try:
        scales = [float(s) for s in args.guidance_scale.split(",")]
    except ValueError:
        parser.error(f"--guidance_scale {args.guidance_scale!r}: comma-separated floats, e.g. 1,1.35,3,5,8")
    try:
        sr_scales = per_stage(args.sr_guidance_scale, len(args.sr_workdir), float, "sr_guidance_scale") or []
        steps = per_stage(args.steps, len(stages), steps_value, "steps")
        samplers = per_stage(args.sampler, len(stages), str, "sampler")
    except ValueError as e:
        parser.error(str(e))
    if args.num_images < 2 or args.batch_size < 1 or args.seed < 0:
        parser.error("--num_images must be >= 2, --batch_size >= 1 and --seed >= 0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    settings = {
        "stages": stages,
        "captions": args.captions,
        "num_images": args.num_images,
        "seed": args.seed,
        "reference": args.reference,
        "inception": args.inception,
        "clip": args.clip,
        "sr_guidance_scales": sr_scales,
        "steps": steps,
        "samplers": samplers,
        "batch_size": args.batch_size,
        "text_encoder": args.text_encoder,
        "dtype": args.dtype,
    }

    from imagen_jax.cli import main_guard

    def body() -> int:
        import jax

        if args.distributed:
            from imagen_jax.parallel import distributed

            distributed.initialize()
        results = evaluate(settings, scales, args.out)
        if jax.process_index() == 0:
            print(json.dumps(results, indent=2))
        return 0

    return main_guard("evaluate", body)


def check_settings(out: str, settings: dict) -> None:
    """Records `settings` in OUT/evaluation.json, or refuses an OUT that holds another evaluation's batches."""
    from imagen_jax import filesystem
    from imagen_jax.errors import UsageError
    from imagen_jax.files import write_atomically

    path = os.path.join(out, SETTINGS_FILE)
    fs = filesystem.for_path(path)
    if fs.exists(path):
        with fs.GFile(path, "r") as f:
            previous = json.load(f)
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            key = changed[0]
            raise UsageError(
                f"{out} holds an evaluation made with {key}={previous.get(key)!r}, not {settings[key]!r}; "
                "rerun that command to resume it, or choose a new --out"
            )
        return
    fs.makedirs(out)
    write_atomically(path, json.dumps(settings, indent=2))


def evaluate(settings: dict, guidance_scales: list[float], out: str) -> dict:
    """Samples and scores (module docstring); returns the results (process 0 also writes them)."""
    import jax
    from jax.experimental import multihost_utils

    from imagen_jax import images as images_lib
    from imagen_jax.cascade import Imagen
    from imagen_jax.eval import evaluation, reference_stats
    from imagen_jax.eval import scorer as scorer_lib
    from imagen_jax.eval.sources import read_captions

    captions = read_captions(settings["captions"], settings["num_images"], settings["seed"])
    reference = reference_stats.load(settings["reference"])
    imagen = Imagen.load(settings["stages"], text_encoder=settings.get("text_encoder"), dtype=settings.get("dtype"))
    scorer = scorer_lib.Scorer(settings["inception"], imagen.mesh, settings["clip"])
    evaluation.check_reference(reference, scorer, imagen.stages[-1].image_size)
    if jax.process_index() == 0:
        check_settings(out, settings)
    multihost_utils.sync_global_devices("evaluate: settings checked")
    n = len(imagen.stages)
    steps = settings["steps"] or [s.config.train.sample_steps for s in imagen.stages]
    samplers = settings["samplers"] or ["ddpm"] * n

    def sample(chunk: list[str], seeds: list[int], scale: float):
        outputs = imagen(
            chunk, seeds, steps=steps, guidance_scales=[scale, *settings["sr_guidance_scales"]], samplers=samplers
        )
        return images_lib.to_uint8(outputs[-1])

    shard = (jax.process_index(), jax.process_count())
    for scale in guidance_scales:
        evaluation.score_scale(
            sample,
            scorer,
            captions,
            scale,
            batch_size=settings["batch_size"],
            seed=settings["seed"],
            out=out,
            shard=shard,
        )
    multihost_utils.sync_global_devices("evaluate: every batch scored")
    results = {
        "settings": settings,
        "checkpoint_steps": [s.step for s in imagen.stages],
        "image_size": imagen.stages[-1].image_size,
        "reference_count": reference.count,
        "inception_weights": scorer.weights_id,
        "guidance": {},
    }
    if jax.process_index() != 0:
        return results
    for scale in guidance_scales:  # every batch is on disk now: read back, nothing sampled
        features, clip = evaluation.score_scale(
            sample, scorer, captions, scale, batch_size=settings["batch_size"], seed=settings["seed"], out=out
        )
        results["guidance"][f"{scale:g}"] = evaluation.summarise(features, clip, reference)
    evaluation.write_results(out, results)
    evaluation.plot(results["guidance"], os.path.join(out, evaluation.PLOT_FILE))
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
