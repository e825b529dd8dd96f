"""Reference statistics for FID/KID: the Inception features of real images, made once, read by every evaluation.

    python -m imagen_jax.tools.fid_reference --images 'coco/val2014' --image_size 64 \
        --inception weights/inception-2015-12-05.safetensors --out stats/coco_val2014_64.npz [--num_images 30000]
    python -m imagen_jax.tools.fid_reference --images 'data/cc3m-val-{00000..00015}.tfrecord' --image_size 256 ...

--images is a folder of JPEG/PNG/WebP files or img2dataset shards (a pattern). Each image is centre-cropped and
resized to --image_size as training data is, then fed to Inception (its own TF1 bilinear resize to 299), so the
statistics describe the real images at the resolution the evaluated stage samples; tools.evaluate refuses
statistics of another size, resize or Inception weights. Writes mean, covariance and count, and (unless
--no_features) the features themselves, which KID and precision/recall need (8 KB per image). Images that do not
decode are skipped and counted. Runs on every local device; one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fid_reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", required=True, help="folder of images, or img2dataset shards (a pattern)")
    parser.add_argument("--image_size", type=int, required=True, help="the evaluated stage's output size")
    parser.add_argument("--inception", required=True, help="Inception weights (.safetensors; tools.convert_inception)")
    parser.add_argument("--out", required=True, help="the statistics file to write (.npz; local or gs://)")
    parser.add_argument("--num_images", type=int, default=None, help="at most this many images (default: all)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--no_features", action="store_true", help="keep only the moments (FID only; no KID, PR)")
    args = parser.parse_args(argv)
    if args.image_size < 8 or args.batch_size < 1 or (args.num_images is not None and args.num_images < 2):
        parser.error("--image_size must be >= 8, --batch_size >= 1 and --num_images >= 2")
    if not args.out.endswith(".npz"):
        parser.error(f"--out {args.out!r}: the statistics file must end in .npz")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

    from imagen_jax.cli import main_guard

    def body() -> int:
        stats = make_reference(
            args.images,
            image_size=args.image_size,
            inception=args.inception,
            num_images=args.num_images,
            batch_size=args.batch_size,
            keep_features=not args.no_features,
        )
        from imagen_jax.eval import reference_stats

        reference_stats.save(args.out, stats.with_radii())  # precision/recall's real balls, once, here
        print(f"wrote {args.out}: {stats.count} images, {args.image_size}px, weights {stats.weights_id}")
        return 0

    return main_guard("fid_reference", body)


def make_reference(
    images: str,
    *,
    image_size: int,
    inception: str,
    num_images: int | None = None,
    batch_size: int = 64,
    keep_features: bool = True,
):
    """The ReferenceStats of the images `images` names (module docstring), features made on the local devices."""
    import numpy as np

    from imagen_jax.errors import DataError
    from imagen_jax.eval import metrics as metrics_lib
    from imagen_jax.eval import scorer as scorer_lib
    from imagen_jax.eval.reference_stats import ReferenceStats
    from imagen_jax.eval.sources import ReferenceImages
    from imagen_jax.stage.model import local_mesh

    scorer = scorer_lib.Scorer(inception, local_mesh())
    source = ReferenceImages(images, image_size)
    stats, kept = None, []
    start = last = time.perf_counter()
    for batch in source.batches(batch_size, num_images):
        features = scorer.features(batch)
        stats = stats or metrics_lib.FeatureStatistics(features.shape[1])
        stats.update(features)
        if keep_features:
            kept.append(features)
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            rate = source.delivered / (last - start)
            print(f"{source.delivered} images ({source.skipped} skipped), {rate:.1f} images/s", flush=True)
    if stats is None or stats.count < 2:
        raise DataError(f"{images}: {source.delivered} decodable images ({source.skipped} skipped); need at least 2")
    print(f"{source.delivered} images, {source.skipped} skipped (did not decode)", flush=True)
    return ReferenceStats.from_statistics(
        stats,
        features=np.concatenate(kept) if keep_features else None,
        resize=scorer_lib.RESIZE,
        weights_id=scorer.weights_id,
        weights_sha256=scorer.weights_sha256,
        feature_layer=scorer_lib.FEATURE_LAYER,
        image_size=image_size,
        source=f"{images}: {source.delivered} images centre-cropped to {image_size}px ({source.skipped} skipped)",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
