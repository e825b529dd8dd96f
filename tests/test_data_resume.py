"""Determinism and resumption of the data stream, and the file split over processes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from imagen_jax.data.pipeline import Position, make_dataset, position_after
from imagen_jax.data.resume import start_position
from tests.shard_helpers import data_config, encode_image, read_epoch, write_records

NUM_FILES, PER_FILE = 6, 7


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Six shards of seven records; each record's caption names its file and record; one record per shard is
    bad, so positions count records the consumer never sees. Images differ, so crops can be compared."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    for f in range(NUM_FILES):
        records = [
            {
                "png": encode_image(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "PNG"),
                "txt": f"f{f} r{r}".encode(),
            }
            for r in range(PER_FILE - 1)
        ]
        records.insert(3, {"jpg": b"not an image", "txt": b"bad"})
        write_records(root / f"{f:05d}.tfrecord", records)
    return str(root / "*.tfrecord")


def _batches(cfg, n: int, start: Position = Position(0, 0), **kwargs) -> list[dict]:
    ds, _ = make_dataset(cfg, batch_size=5, seed=11, start=start, **kwargs)
    return list(itertools.islice(ds.as_numpy_iterator(), n))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("crop_size", [0, 6])
def test_resume_after_n_batches_yields_exactly_the_next_batches(shards, crop_size):
    cfg = data_config(shards, image_size=12, crop_size=crop_size, shuffle_buffer=10)
    straight = _batches(cfg, 24)  # 24 x 5 = 120 examples: more than three epochs of 36.
    assert len({int(e) for b in straight for e in b["epoch"]}) >= 3
    for n in (1, 7, 8, 15):  # Resume points inside epochs and right after epoch boundaries.
        resumed = _batches(cfg, 24 - n, start=position_after(straight[n - 1]))
        _assert_same(resumed, straight[n:])


def test_same_seed_same_stream_and_epochs_are_reshuffled(shards):
    cfg = data_config(shards, image_size=12, shuffle_buffer=10)
    a, b = _batches(cfg, 16), _batches(cfg, 16)  # 80 examples: two whole epochs of 36.
    _assert_same(a, b)
    captions = [c.decode() for batch in a for c in batch["caption"]]
    epochs = [int(e) for batch in a for e in batch["epoch"]]
    first = [c for c, e in zip(captions, epochs) if e == 0]
    second = [c for c, e in zip(captions, epochs) if e == 1]
    assert sorted(first) == sorted(second) and len(first) == NUM_FILES * (PER_FILE - 1)  # Each example once per epoch.
    assert first != second  # ... in a new order.


def test_each_file_is_read_by_exactly_one_process_per_epoch(shards):
    cfg = data_config(shards, image_size=12)
    seen: list[str] = []
    for index in range(4):
        examples, _ = read_epoch(cfg, process_index=index, process_count=4)
        files = {e["caption"].split()[0] for e in examples}
        assert len(examples) == len(files) * (PER_FILE - 1)  # Whole files, never split by record.
        seen += sorted(files)
    assert sorted(seen) == [f"f{f}" for f in range(NUM_FILES)]  # Every file once, no file twice.


def test_processes_with_unequal_file_counts_never_run_dry(shards):
    cfg = data_config(shards, image_size=12, shuffle_buffer=4)
    for index in range(4):  # Processes 0, 1 get two files, processes 2, 3 one: all streams keep going.
        batches = _batches(cfg, 6, process_index=index, process_count=4)
        assert len(batches) == 6 and max(int(b["epoch"][-1]) for b in batches) >= 2


def test_processes_resume_independently(shards):
    cfg = data_config(shards, image_size=12, shuffle_buffer=4)
    for index in range(2):
        straight = _batches(cfg, 10, process_index=index, process_count=2)
        resumed = _batches(cfg, 6, start=position_after(straight[3]), process_index=index, process_count=2)
        _assert_same(resumed, straight[4:])


def test_start_position_rules():
    saved = {"process_count": 2, "positions": [[3, 17], [4, 2]]}
    assert start_position(None, 0, 1)[0] == Position(0, 0)
    assert start_position(saved, 1, 2)[0] == Position(4, 2)
    position, message = start_position(saved, 0, 4)  # Another process count: a fresh epoch for everyone.
    assert position == Position(5, 0) and "written by 2 processes and this run has 4" in message
    with pytest.raises(ValueError, match="lacks 'positions'"):
        start_position({"batches_consumed": 4}, 0, 1)
    with pytest.raises(ValueError, match="2 positions for 3 processes"):
        start_position({"process_count": 3, "positions": [[0, 0], [0, 0]]}, 0, 3)


def test_bad_start_position_is_an_error(shards):
    with pytest.raises(ValueError, match="must be non-negative"):
        make_dataset(data_config(shards), batch_size=1, seed=0, start=Position(0, -1))
