"""One evaluation: captions sampled at several guidance scales, scored against reference statistics.

Each batch's Inception features and CLIP scores are written as soon as they exist (`OUT/guidance_G/batch_K.npz`,
atomically), so an interrupted evaluation resumes where it stopped and recomputes nothing; with `out=None`
(the training loop's periodic evaluation) they stay in memory. Batches are dealt round-robin to `shard =
(index, count)` callers: tools.evaluate gives each process its own batches, each on its own devices; when the
processes sample together on one mesh (training), every process computes every batch.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from imagen_jax import filesystem
from imagen_jax import images as images_lib
from imagen_jax.errors import MetricsError
from imagen_jax.eval import clip_score, reference_stats
from imagen_jax.eval import metrics as metrics_lib
from imagen_jax.eval import scorer as scorer_lib
from imagen_jax.eval.reference_stats import ReferenceStats
from imagen_jax.eval.scorer import Scorer
from imagen_jax.files import write_atomically

# captions, seeds, guidance scale -> uint8 images [N, S, S, 3]
SampleFn = Callable[[list[str], list[int], float], np.ndarray]
RESULTS_FILE = "results.json"
PLOT_FILE = "fid_vs_clip.png"


def batch_path(out: str, scale: float, index: int) -> str:
    return os.path.join(out, f"guidance_{scale:g}", f"batch_{index:05d}.npz")


def _save_batch(path: str, features: np.ndarray, clip: np.ndarray | None) -> None:
    filesystem.for_path(path).makedirs(os.path.dirname(path))
    buffer = io.BytesIO()
    arrays = {"features": features} | ({} if clip is None else {"clip_scores": clip})
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


def _load_batch(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    with filesystem.for_path(path).GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return data["features"], (data["clip_scores"] if "clip_scores" in data.files else None)


def score_scale(
    sample: SampleFn,
    scorer: Scorer,
    captions: Sequence[str],
    scale: float,
    *,
    batch_size: int,
    seed: int = 0,
    out: str | None = None,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Features [N, 2048] and CLIP scores [N] (None without CLIP) of `captions` sampled at `scale` (caption i
    with seed + i). With `out`: batches already there are read, not recomputed; returns None unless this
    caller holds every batch (shard count 1)."""
    starts = list(range(0, len(captions), batch_size))
    features: list[np.ndarray] = []
    clips: list[np.ndarray] = []
    for index, start in enumerate(starts):
        path = None if out is None else batch_path(out, scale, index)
        mine = index % shard[1] == shard[0]
        if path is not None and filesystem.for_path(path).exists(path):
            if shard[1] == 1:
                f, c = _load_batch(path)
                features.append(f)
                clips.append(c)
            continue
        if not mine:
            continue
        chunk = list(captions[start : start + batch_size])
        images = sample(chunk, list(range(seed + start, seed + start + len(chunk))), scale)
        f = scorer.features(images)
        c = scorer.clip_scores(images, chunk) if scorer.has_clip else None
        if path is not None:
            _save_batch(path, f, c)
            if index == 0:
                grid = images_lib.make_grid(images[:16], columns=4)
                images_lib.save_png(grid, os.path.join(out, f"guidance_{scale:g}", "samples.png"))
        features.append(f)
        clips.append(c)
        done = min(start + batch_size, len(captions))
        log(f"guidance {scale:g}: {done}/{len(captions)} images sampled and scored")
    if shard[1] != 1:
        return None
    clip = None if any(c is None for c in clips) else np.concatenate(clips)
    return np.concatenate(features), clip


def summarise(
    features: np.ndarray,
    clip: np.ndarray | None,
    reference: ReferenceStats,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict:
    """FID against the reference moments; KID and precision/recall when the reference keeps its features (KID's
    subset size shrinks to the smaller set when needed, and says so); mean CLIP score."""
    stats = metrics_lib.FeatureStatistics.of(features)
    result: dict = {
        "num_images": int(features.shape[0]),
        "fid": metrics_lib.frechet_distance(stats.mean(), stats.covariance(), reference.mean, reference.covariance),
    }
    if reference.features is not None:
        size = min(kid_subset_size, features.shape[0], reference.features.shape[0])
        kid, kid_std = metrics_lib.kernel_inception_distance(
            features, reference.features, subsets=kid_subsets, subset_size=size
        )
        precision, recall = metrics_lib.precision_recall(
            features, reference.features, neighborhood=reference_stats.RADII_NEIGHBORHOOD,
            real_radii=reference.neighbour_radii(),
        )  # fmt: skip
        result |= {"kid": kid, "kid_std": kid_std, "kid_subset_size": size, "precision": precision, "recall": recall}
    if clip is not None:
        result["clip_score"] = clip_score.mean_score(float(np.sum(clip, dtype=np.float64)), len(clip))
    return result


def check_reference(reference: ReferenceStats, scorer: Scorer, images_size: int) -> None:
    """Refuses reference statistics whose features were made another way than `scorer` makes them (resize,
    Inception weights, layer), or from images of another size than the samples: FID would measure the difference."""
    reference_stats.check_compatible(
        reference,
        resize=scorer_lib.RESIZE,
        weights_id=scorer.weights_id,
        weights_sha256=scorer.weights_sha256,
        feature_layer=scorer_lib.FEATURE_LAYER,
    )
    if reference.image_size and reference.image_size != images_size:
        raise MetricsError(
            f"{reference.path}: reference images were {reference.image_size}px, the samples are {images_size}px; "
            f"make the reference with tools.fid_reference --image_size {images_size}"
        )


def plot(results: dict[str, dict], path: str) -> None:
    """FID (y) against CLIP score (x), one point per guidance scale, joined in scale order: the paper's
    trade-off curve. A plain PNG drawn with PIL (no plotting library)."""
    from PIL import Image, ImageDraw

    points = [(float(k), v["clip_score"], v["fid"]) for k, v in results.items() if "clip_score" in v]
    if not points:
        return
    points.sort()
    width, height, margin = 640, 480, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[1] for p in points], [p[2] for p in points]

    def span(values: list[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or max(abs(high) * 0.1, 1e-3)
        return low - pad, high + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
            height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin),
        )

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(5):
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(x, y0)
        _, py = at(x0, y)
        draw.text((px - 15, height - margin + 8), f"{x:.2f}", fill="black")
        draw.text((8, py - 6), f"{y:.2f}", fill="black")
    draw.text((width // 2 - 40, height - 30), "CLIP score", fill="black")
    draw.text((8, 20), "FID (lower is better)", fill="black")
    draw.line([at(x, y) for _, x, y in points], fill=(40, 90, 200), width=2)
    for scale, x, y in points:
        px, py = at(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(200, 40, 40))
        draw.text((px + 6, py - 14), f"w={scale:g}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())


def write_results(out: str, results: dict) -> None:
    write_atomically(os.path.join(out, RESULTS_FILE), json.dumps(results, indent=2))
