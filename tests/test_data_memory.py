"""The pipeline's memory does not grow with the dataset: at most MAX_OPEN_FILES shard files are open at once,
and streaming 48x more data (more and bigger shards) raises the peak memory by a small fraction of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imagen_jax.data.reader import MAX_OPEN_FILES
from tests.shard_helpers import encode_image, write_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One fresh process per measurement, so the peak RSS (ru_maxrss) is that stream's alone. A thread samples
# /proc/self/fd for open shard files while one epoch is read.
STREAM = textwrap.dedent("""
    import json, os, resource, sys, threading, time
    import ml_collections
    from imagen_jax.data.pipeline import make_dataset

    folder = sys.argv[1]
    cfg = ml_collections.ConfigDict(dict(train_shards=folder + "/*.tfrecord", format="tfrecord", image_size=32,
                                         shuffle_buffer=8, num_parallel_calls=2))
    ds, stats = make_dataset(cfg, batch_size=4, seed=0, repeat=False)
    most_open, done = 0, False

    def watch():
        global most_open
        while not done:
            names = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    names.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            most_open = max(most_open, sum(n.endswith(".tfrecord") for n in names))
            time.sleep(0.002)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    batches = sum(1 for _ in ds.as_numpy_iterator())
    done = True
    watcher.join()
    print(json.dumps({"batches": batches, "most_open": most_open, "delivered": stats.read()["delivered"],
                      "rss_before_kb": rss_before, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def _write_shards(folder, num_shards: int, records_per_shard: int, images: list[bytes]) -> int:
    """Shards of incompressible JPEGs (~230 KB each, CC12M-like); returns their total bytes."""
    os.makedirs(folder)
    for s in range(num_shards):
        write_records(
            os.path.join(folder, f"{s:05d}.tfrecord"),
            [
                {"jpg": images[(s + r) % len(images)], "txt": f"shard {s} record {r}".encode()}
                for r in range(records_per_shard)
            ],
        )
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _stream(folder) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", STREAM, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_open_shards_and_peak_memory_do_not_grow_with_the_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = [encode_image(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8), "JPEG") for _ in range(5)]
    small_bytes = _write_shards(tmp_path / "small", 4, 8, images)  # ~7 MB
    large_bytes = _write_shards(tmp_path / "large", 64, 24, images)  # ~355 MB, more files than may be open
    small, large = _stream(tmp_path / "small"), _stream(tmp_path / "large")

    assert (small["delivered"], large["delivered"]) == (4 * 8, 64 * 24)
    assert small["batches"] * 4 == small["delivered"] and large["batches"] * 4 == large["delivered"]
    assert 1 <= large["most_open"] <= MAX_OPEN_FILES, large
    extra_data_kb = (large_bytes - small_bytes) / 1024
    extra_peak_kb = large["peak_rss_kb"] - small["peak_rss_kb"]
    # Measured: ~0.15 (the extra open readers' buffers and records in flight). Holding the whole dataset would
    # be ~1; holding every open shard whole, ~0.75.
    assert extra_peak_kb < 0.35 * extra_data_kb, (small, large, extra_data_kb)
