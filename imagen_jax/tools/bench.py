"""Throughput of the two halves of training on this machine: the train step (model) and the input pipeline (data).

Model mode: images/s, FLOPs per step and MFU of a config's train step on this machine's devices.

    python -m imagen_jax.tools.bench --config configs/demo.py [--steps 20] [--peak_tflops 989] [--config.a.b=...]
    python -m imagen_jax.tools.bench --config configs/base64.py --steps 0 --text_dim 4096   # FLOPs only

Runs the real jitted train step (frozen T5 + U-Net + optimizer + EMA, sharded over all devices) on random
images and captions, after one compile step. FLOPs come from XLA's cost analysis of the compiled step;
MFU = achieved FLOP/s / (peak_tflops per device x devices). Without `config.text.encoder` a random one-layer
T5 of width --text_dim stands in (its cost is small next to the U-Net's, its width sets the text projections).

Data mode: images/s one host's tf.data pipeline (imagen_jax.data.pipeline) delivers per stage resolution.

    python -m imagen_jax.tools.bench --data [--sizes 64,256,1024] [--parallel 1,2,4] [--batch_size 64]
                                            [--seconds 10] [--shards GLOB] [--num_images 256]

For each output size S and each N in --parallel it builds the real pipeline with num_parallel_calls=N (read,
parse, JPEG decode, antialiased bicubic resize, centre crop, batch; no random crop, whose cost is small next
to decode and resize), pulls two warm-up batches, then counts the images delivered in --seconds of wall time
(at least 3 batches). Without --shards it first writes, per size, a synthetic
img2dataset-like TFRecord shard set (8 files, --num_images distinct records) into a temp dir: JPEG quality 90
of natural-ish content (1/f colour noise, flat-coloured shapes with hard edges, sensor-like pixel noise;
0.2-0.4 bytes/pixel, as web photos) stored as `img2dataset --resize_mode keep_ratio --image_size 1.25*S`
would deliver them: short side round(1.25*S), aspect ratio 1:1, 4:3, 3:2 or 16:9, landscape or portrait,
so the resize does real down-sampling work as it does on real shards. With --shards it reads your shards.

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

import argparse
import io
import json
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from imagen_jax import config as config_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import T5Encoder, make_tiny_t5
from imagen_jax.train import optimizer as optimizer_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train.step import make_train_step

CAPTIONS = ["a red circle on the left", "a photograph of a corgi wearing sunglasses on the beach"]


def benchmark(config, *, steps: int, text_dim: int, peak_tflops: float | None) -> dict:
    """Compiles and times `steps` train steps; returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        if not config.text.encoder:
            config.text.encoder = make_tiny_t5(os.path.join(tmp, "t5"), CAPTIONS, d_model=text_dim, num_layers=1,
                                               num_heads=max(1, text_dim // 64), d_kv=min(64, text_dim), d_ff=2 * text_dim)
        encoder = T5Encoder.from_pretrained(config.text.encoder, dtype=state_lib.compute_dtype(config.text.dtype))
    mesh = mesh_lib.make_mesh(config.mesh)
    spec = state_lib.model_spec(config, encoder.dim, mesh)
    tx = optimizer_lib.make_optimizer(config.train)
    shardings = state_lib.state_shardings(spec, tx, mesh)
    t5_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), encoder.state)
    t5_params = jax.device_put(encoder.state, t5_shardings)
    step = make_train_step(config, spec.graphdef, encoder.apply, tx, optimizer_lib.learning_rate_schedule(config.train),
                           mesh, shardings, t5_shardings)
    batch_size, size = config.train.batch_size, config.data.crop_size or config.data.image_size  # SR: trained on crops
    ids, mask = encoder.tokenizer([CAPTIONS[i % 2] for i in range(batch_size)], config.text.max_length)
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
    batch = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_params))
    if steps == 0:  # FLOPs only: lowered on abstract shapes, so not even base64's state is allocated.
        abstract = state_lib.abstract_state(config, encoder.dim, tx, shardings)
        cost = step.lower(abstract, t5_params, batch).cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
        return {"unet_params_M": round(num_params / 1e6, 2), "image_size": size, "global_batch": batch_size,
                "gflop_per_step": round(flops / 1e9, 1), "gflop_per_image": round(flops / 1e9 / batch_size, 1)}
    state = state_lib.init_state(config, encoder.dim, tx, shardings)

    start = time.perf_counter()
    compiled = step.lower(state, t5_params, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = compiled(state, t5_params, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, t5_params, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    result = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "unet_params_M": round(num_params / 1e6, 2),
        "image_size": size,
        "global_batch": batch_size,
        "compute_dtype": config.train.compute_dtype,
        "compile_s": round(compile_s, 1),
        "step_ms": round(step_s * 1e3, 1),
        "images_per_s": round(batch_size / step_s, 1),
        "images_per_s_per_device": round(batch_size / step_s / jax.device_count(), 1),
        "gflop_per_step": round(flops / 1e9, 1),
        "gflop_per_image": round(flops / 1e9 / batch_size, 1),
        "achieved_tflops": round(flops / step_s / 1e12, 3),
    }
    if peak_tflops:
        result["mfu"] = round(flops / step_s / (peak_tflops * 1e12 * jax.device_count()), 4)
    return result


# ------------------------------------------------------------------------------------------ data mode
STORED_SCALE = 1.25  # stored short side / output size: img2dataset keep_ratio at 1.25x the stage's size
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)
SYNTHETIC_SHARDS = 8
WARMUP_BATCHES = 2
MIN_TIMED_BATCHES = 3  # at 1024 px one batch can take seconds; fewer timed batches would quantise the rate

_SUBJECTS = ("a dog", "two cyclists", "an old lighthouse", "a bowl of ramen", "a city street", "a red barn",
             "a child with a kite", "a mountain lake", "a vintage car", "a cat on a sofa", "a wedding cake")
_SCENES = ("at sunset", "in the rain", "on a sunny beach", "in a snowy forest", "under neon lights",
           "in a busy market", "seen from above", "in soft morning light")
_STYLES = ("a photograph of", "a close-up photo of", "an illustration of", "stock photo:", "a painting of")


def _natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 [H,W,3] image with photo-like statistics, so JPEG size and decode cost are realistic: 1/f
    colour noise (octaves summed at 1/8 resolution, then bicubic up-sampled), a few flat shapes with hard
    edges, and +-10 pixel noise. A flat colour would compress (and decode) unrealistically well."""
    low_h, low_w = max(2, height // 8), max(2, width // 8)
    low = np.zeros((low_h, low_w, 3), np.float32)
    cells = 2
    while cells <= min(low_h, low_w):
        grid_h, grid_w = round(cells * low_h / min(low_h, low_w)), round(cells * low_w / min(low_h, low_w))
        grid = rng.normal(0, 1, (grid_h, grid_w, 3)).astype(np.float32)
        octave = [np.asarray(Image.fromarray(grid[..., c]).resize((low_w, low_h), Image.BICUBIC)) for c in range(3)]
        low += 60.0 / cells**0.8 * np.stack(octave, -1)
        cells *= 2
    low += rng.uniform(60, 190, 3).astype(np.float32)
    image = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
        x1, y1 = (x0, y0) + rng.uniform(0.05, 0.5, 2) * (width, height)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _caption(rng: np.random.Generator) -> str:
    return f"{rng.choice(_STYLES)} {rng.choice(_SUBJECTS)} {rng.choice(_SCENES)}"


def write_synthetic_shards(out_dir: str, *, size: int, num_images: int, num_shards: int = SYNTHETIC_SHARDS,
                           seed: int = 0) -> list[str]:
    """Writes `num_images` img2dataset-like records for output size `size` into `num_shards` TFRecord files.

    Images are JPEG quality 90 with short side round(STORED_SCALE * size) and an aspect ratio from ASPECTS
    (landscape or portrait), as `img2dataset --resize_mode keep_ratio` delivers; original_width/height
    say the source photo was twice as large. Returns the shard paths.
    """
    import tensorflow as tf  # Deferred (here and below): TF takes seconds to import; model mode needs none.

    if size < 1 or num_images < 1 or not 1 <= num_shards <= num_images:
        raise ValueError(f"need size >= 1, num_images >= 1 and 1 <= num_shards <= num_images; got size={size}, "
                         f"num_images={num_images}, num_shards={num_shards}")

    def feature(value: bytes | int) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    rng = np.random.default_rng(seed)
    short = max(1, round(STORED_SCALE * size))
    bounds = np.linspace(0, num_images, num_shards + 1).round().astype(int)
    tf.io.gfile.makedirs(out_dir)
    paths = []
    for shard, (first, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = os.path.join(out_dir, f"{shard:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for index in range(first, stop):
                long = round(short * ASPECTS[index % len(ASPECTS)])
                height, width = (short, long) if rng.random() < 0.75 else (long, short)
                buffer = io.BytesIO()
                Image.fromarray(_natural_image(rng, height, width)).save(buffer, format="JPEG", quality=90)
                example = tf.train.Example(features=tf.train.Features(feature={
                    "jpg": feature(buffer.getvalue()), "txt": feature(_caption(rng).encode()),
                    "key": feature(f"{shard:05d}{index - first:04d}".encode()), "status": feature(b"success"),
                    "width": feature(width), "height": feature(height),
                    "original_width": feature(2 * width), "original_height": feature(2 * height),
                }))
                writer.write(example.SerializeToString())
        paths.append(path)
    return paths


def mean_image_bytes(files: list[str], limit: int = 256) -> float:
    """Mean size of the stored (encoded) image over the first `limit` records of `files`."""
    import tensorflow as tf

    from imagen_jax.data.decode import IMAGE_FEATURES

    sizes = []
    for record in tf.data.TFRecordDataset(files).take(limit).as_numpy_iterator():
        features = tf.train.Example.FromString(record).features.feature
        encoded = [features[n].bytes_list.value[0] for n in IMAGE_FEATURES if n in features]
        sizes.append(max((len(e) for e in encoded), default=0))
    if not sizes:
        raise ValueError(f"shards {files[:3]}... hold no records")
    return float(np.mean(sizes))


def _time_pipeline(shards: str, size: int, parallel: int, batch_size: int, seconds: float) -> dict:
    """Builds the pipeline, pulls WARMUP_BATCHES, then counts the batches it delivers in `seconds` (and at
    least MIN_TIMED_BATCHES), timing to the end of the last one."""
    from imagen_jax.data.pipeline import make_dataset, numpy_batches

    data_cfg = ml_collections.ConfigDict({
        "train_shards": shards, "format": "tfrecord", "image_size": size, "crop_size": 0,
        "shuffle_buffer": 1_000, "num_parallel_calls": parallel, "precomputed_text": False,
        "min_image_size": 0, "max_aspect_ratio": 0.0, "min_caption_chars": 1, "max_caption_chars": 0,
        "require_success_status": True,
    })
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


def benchmark_data(sizes: list[int], parallel: list[int], batch_size: int, seconds: float,
                   shards: str | None = None, *, num_images: int = 256) -> list[dict]:
    """Images/s the input pipeline delivers on this host, for every (output size, num_parallel_calls).

    Without `shards`, synthetic shards of `num_images` records are written per size (see
    write_synthetic_shards); with it, every size reads those shards. One dict per (size, N), in order.
    """
    _check_data_args(sizes, parallel, batch_size, seconds, num_images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            if shards is None:
                files = write_synthetic_shards(os.path.join(tmp, str(size)), size=size, num_images=num_images)
                pattern = os.path.join(tmp, str(size), "*.tfrecord")
            else:
                from imagen_jax.data.shards import list_shards

                files, pattern = list_shards(shards), shards
            image_bytes = mean_image_bytes(files)
            for n in parallel:
                run = _time_pipeline(pattern, size, n, batch_size, seconds)
                results.append({
                    "size": size, "parallel": n, "batch_size": batch_size,
                    "images": run["batches"] * batch_size, "elapsed_s": round(run["elapsed_s"], 3),
                    "images_per_s": run["batches"] * batch_size / run["elapsed_s"],
                    "ms_per_batch": run["elapsed_s"] / run["batches"] * 1e3,
                    "bytes_per_image": image_bytes, "image_shape": run["image_shape"], "load_1m": run["load_1m"],
                })
    return results


def format_data_report(results: list[dict], *, synthetic: bool) -> str:
    """The table, the per-call rate of each size at its highest N, and what the figures are for."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    source = (f"synthetic JPEG q90 shards, short side {STORED_SCALE}x size, aspect 1:1..16:9" if synthetic
              else "your shards")
    lines = [
        f"data pipeline throughput, one host: os.cpu_count()={cores} ({usable} usable)",
        f"input: {source}; batch {results[0]['batch_size']}; N = num_parallel_calls",
        f"{'size':>6} {'N':>3} {'img/s/host':>11} {'ms/batch':>10} {'bytes/image':>12} {'load':>6}",
    ]
    for r in results:
        lines.append(f"{r['size']:>6} {r['parallel']:>3} {r['images_per_s']:>11.1f} {r['ms_per_batch']:>10.1f} "
                     f"{r['bytes_per_image']:>12.0f} {r['load_1m']:>6.2f}")
    lines.append("sustained img/s per parallel call (img/s / N at the highest N; ~ per core while N <= cores):")
    for size in dict.fromkeys(r["size"] for r in results):
        top = max((r for r in results if r["size"] == size), key=lambda r: r["parallel"])
        lines.append(f"{size:>6} px: {top['images_per_s'] / top['parallel']:.1f} img/s per call (N={top['parallel']})")
    lines.append("cores for data ~= train-step images/s per host / img/s per call.")
    lines.append(f"These figures are for this machine's {usable} cores; load = 1-minute load average after each "
                 f"row (counts this benchmark's threads too; well above {usable}, other work shared the cores). "
                 "Rerun on the training host.")
    return "\n".join(lines)


def _load_1m() -> float:
    """The 1-minute load average (runnable threads; above the core count, other work slowed the figures)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _check_data_args(sizes: list[int], parallel: list[int], batch_size: int, seconds: float, num_images: int) -> None:
    if not sizes or min(sizes) < 1 or not parallel or min(parallel) < 1:
        raise ValueError(f"sizes ({sizes}) and parallel ({parallel}) must be non-empty lists of positive integers")
    if batch_size < 1 or num_images < 1 or not seconds > 0:
        raise ValueError(f"--batch_size ({batch_size}) and --num_images ({num_images}) must be >= 1 and "
                         f"--seconds ({seconds}) > 0")


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="model mode: the config whose train step is timed")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step; 0 = FLOPs only (allocates nothing)")
    parser.add_argument("--text_dim", type=int, default=64, help="width of the stand-in T5 (4096 = T5-XXL)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak, for MFU (e.g. 989 H100 bf16)")
    parser.add_argument("--data", action="store_true", help="data mode: time the input pipeline instead")
    parser.add_argument("--sizes", default="64,256,1024", help="data: output sizes, comma-separated")
    parser.add_argument("--parallel", default="1,2,4", help="data: num_parallel_calls values, comma-separated")
    parser.add_argument("--batch_size", type=int, default=64, help="data: per-host batch size")
    parser.add_argument("--seconds", type=float, default=10.0, help="data: timed wall seconds per (size, N)")
    parser.add_argument("--shards", default=None, help="data: read these shards instead of synthetic ones")
    parser.add_argument("--num_images", type=int, default=256, help="data: distinct synthetic records per size")
    args, overrides = parser.parse_known_args(argv)

    def fail(message: str) -> None:
        parser.exit(2, f"bench: error: {message}\n")

    if args.data == bool(args.config):
        fail("give either --config FILE (model mode) or --data (data mode)")
    if args.data:
        if overrides:
            fail(f"unknown arguments for --data: {' '.join(overrides)}")
        try:
            sizes, parallel = _positive_ints(args.sizes, "--sizes"), _positive_ints(args.parallel, "--parallel")
            _check_data_args(sizes, parallel, args.batch_size, args.seconds, args.num_images)
            if args.shards is not None:
                from imagen_jax.data.shards import list_shards

                list_shards(args.shards)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        from imagen_jax.data.pipeline import NoExamplesError

        try:
            results = benchmark_data(sizes, parallel, args.batch_size, args.seconds, args.shards,
                                     num_images=args.num_images)
        except NoExamplesError as e:
            fail(f"{args.shards}: {e}")
        print(format_data_report(results, synthetic=args.shards is None))
        return
    if args.steps < 0:
        parser.error(f"--steps must be >= 0 (0 = FLOPs only), got {args.steps}")


    try:
        config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    except config_lib.ConfigError as e:
        fail(str(e))
    print(json.dumps(benchmark(config, steps=args.steps, text_dim=args.text_dim, peak_tflops=args.peak_tflops), indent=2))


if __name__ == "__main__":
    main()
