"""Input-pipeline throughput: the images/s one host's tf.data pipeline (imagen_jax.data.pipeline) delivers per
stage resolution and per num_parallel_calls.

    python -m imagen_jax.tools.bench --data [--sizes 64,256,1024] [--parallel 1,2,4] [--batch_size 64]
                                            [--seconds 10] [--shards GLOB] [--num_images 256]

For each output size S and each N in --parallel it builds the real pipeline with num_parallel_calls=N (read,
parse, JPEG decode, antialiased bicubic resize, centre crop, batch; no random crop, whose cost is small next
to decode and resize), pulls two warm-up batches, then counts the images delivered in --seconds of wall time
(at least 3 batches). Without --shards it first writes, per size, a synthetic img2dataset-like TFRecord shard
set (8 files, --num_images distinct records; imagen_jax.data.synthetic) into a temp dir. With --shards it
reads your shards.

Reading the data figures: img/s/host is what this host sustains with N parallel calls and ms/batch the time
per --batch_size batch; bytes/image is the mean stored (encoded) image, what a host reads per image. Decoding
is CPU-bound and scales with N until the free cores run out, so `img/s per call` (img/s / N at the highest N)
is the rate of one core when N <= free cores (it underestimates it otherwise). A training host needs
    cores for data  ~=  train-step images/s per host (model mode: images_per_s / hosts)  /  img/s per call,
plus headroom for the train loop and for reading remote shards. The figures hold for this machine's cores;
the `load` column (1-minute load average after each row) shows when other work shared them. Rerun on the
training host for its own figures.
"""

from __future__ import annotations

import os
import tempfile
import time

import ml_collections

from imagen_jax.data.pipeline import make_dataset, numpy_batches
from imagen_jax.data.shards import list_shards
from imagen_jax.data.synthetic import STORED_SCALE, mean_image_bytes, write_synthetic_shards
from imagen_jax.errors import UsageError

WARMUP_BATCHES = 2
MIN_TIMED_BATCHES = 3  # at 1024 px one batch can take seconds; fewer timed batches would quantise the rate


def _time_pipeline(shards: str, size: int, parallel: int, batch_size: int, seconds: float) -> dict:
    """Builds the pipeline, pulls WARMUP_BATCHES, then counts the batches it delivers in `seconds` (and at
    least MIN_TIMED_BATCHES), timing to the end of the last one."""
    data_cfg = ml_collections.ConfigDict(
        {
            "train_shards": shards,
            "format": "tfrecord",
            "image_size": size,
            "crop_size": 0,
            "shuffle_buffer": 1_000,
            "num_parallel_calls": parallel,
            "precomputed_text": False,
            "min_image_size": 0,
            "max_aspect_ratio": 0.0,
            "min_caption_chars": 1,
            "max_caption_chars": 0,
            "require_success_status": True,
        }
    )
    ds, stats = make_dataset(data_cfg, batch_size=batch_size, seed=0, process_index=0, process_count=1)
    batches = numpy_batches(ds, stats)  # shards whose every record is skipped: an error, not a hang
    for _ in range(WARMUP_BATCHES):
        next(batches)
    count, start = 0, time.perf_counter()
    while count < MIN_TIMED_BATCHES or time.perf_counter() - start < seconds:
        image = next(batches)["image"]
        count += 1
    elapsed = time.perf_counter() - start
    del batches  # stops the pipeline's threads before the next measurement
    return {"batches": count, "elapsed_s": elapsed, "image_shape": tuple(image.shape[1:]), "load_1m": _load_1m()}


def benchmark_data(
    sizes: list[int],
    parallel: list[int],
    batch_size: int,
    seconds: float,
    shards: str | None = None,
    *,
    num_images: int = 256,
) -> list[dict]:
    """Images/s the input pipeline delivers on this host, for every (output size, num_parallel_calls).

    Without `shards`, synthetic shards of `num_images` records are written per size (see
    write_synthetic_shards); with it, every size reads those shards. One dict per (size, N), in order.
    """
    check_data_args(sizes, parallel, batch_size, seconds, num_images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            if shards is None:
                files = write_synthetic_shards(os.path.join(tmp, str(size)), size=size, num_images=num_images)
                pattern = os.path.join(tmp, str(size), "*.tfrecord")
            else:
                files, pattern = list_shards(shards), shards
            image_bytes = mean_image_bytes(files)
            for n in parallel:
                run = _time_pipeline(pattern, size, n, batch_size, seconds)
                results.append(
                    {
                        "size": size,
                        "parallel": n,
                        "batch_size": batch_size,
                        "images": run["batches"] * batch_size,
                        "elapsed_s": round(run["elapsed_s"], 3),
                        "images_per_s": run["batches"] * batch_size / run["elapsed_s"],
                        "ms_per_batch": run["elapsed_s"] / run["batches"] * 1e3,
                        "bytes_per_image": image_bytes,
                        "image_shape": run["image_shape"],
                        "load_1m": run["load_1m"],
                    }
                )
    return results


def format_data_report(results: list[dict], *, synthetic: bool) -> str:
    """The table, the per-call rate of each size at its highest N, and what the figures are for."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    source = (
        f"synthetic JPEG q90 shards, short side {STORED_SCALE}x size, aspect 1:1..16:9" if synthetic else "your shards"
    )
    lines = [
        f"data pipeline throughput, one host: os.cpu_count()={cores} ({usable} usable)",
        f"input: {source}; batch {results[0]['batch_size']}; N = num_parallel_calls",
        f"{'size':>6} {'N':>3} {'img/s/host':>11} {'ms/batch':>10} {'bytes/image':>12} {'load':>6}",
    ]
    for r in results:
        lines.append(
            f"{r['size']:>6} {r['parallel']:>3} {r['images_per_s']:>11.1f} {r['ms_per_batch']:>10.1f} "
            f"{r['bytes_per_image']:>12.0f} {r['load_1m']:>6.2f}"
        )
    lines.append("sustained img/s per parallel call (img/s / N at the highest N; ~ per core while N <= cores):")
    for size in dict.fromkeys(r["size"] for r in results):
        top = max((r for r in results if r["size"] == size), key=lambda r: r["parallel"])
        lines.append(f"{size:>6} px: {top['images_per_s'] / top['parallel']:.1f} img/s per call (N={top['parallel']})")
    lines.append("cores for data ~= train-step images/s per host / img/s per call.")
    lines.append(
        f"These figures are for this machine's {usable} cores; load = 1-minute load average after each "
        f"row (counts this benchmark's threads too; well above {usable}, other work shared the cores). "
        "Rerun on the training host."
    )
    return "\n".join(lines)


def _load_1m() -> float:
    """The 1-minute load average (runnable threads; above the core count, other work slowed the figures)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def check_data_args(sizes: list[int], parallel: list[int], batch_size: int, seconds: float, num_images: int) -> None:
    if not sizes or min(sizes) < 1 or not parallel or min(parallel) < 1:
        raise UsageError(f"sizes ({sizes}) and parallel ({parallel}) must be non-empty lists of positive integers")
    if batch_size < 1 or num_images < 1 or not seconds > 0:
        raise UsageError(
            f"--batch_size ({batch_size}) and --num_images ({num_images}) must be >= 1 and --seconds ({seconds}) > 0"
        )


def positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values
