"""Bad input in the data pipeline: every case is converted or skipped, counted per reason, never a crash."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data.pipeline import NoExamplesError, Position, make_dataset, numpy_batches
from tests.shard_helpers import data_config, encode_image, read_epoch, solid, write_records

RED = (200, 40, 40)


def _good(n: int, prefix: str = "good") -> list[dict]:
    return [{"png": encode_image(solid(RED), "PNG"), "txt": f"{prefix} {i}".encode()} for i in range(n)]


def test_truncated_last_record_keeps_the_rest_and_reports_the_shard(tmp_path, capfd):
    path = write_records(tmp_path / "00000.tfrecord", _good(5))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])  # Cut inside the last record.
    other = write_records(tmp_path / "00001.tfrecord", _good(3, "other"))
    examples, stats = read_epoch(data_config([path, other]))
    assert sorted(e["caption"] for e in examples) == sorted(
        [f"good {i}" for i in range(4)] + [f"other {i}" for i in range(3)]
    )
    assert (stats["shards_read"], stats["shards_damaged"], stats["delivered"]) == (2, 1, 7)
    out = capfd.readouterr().out
    assert "00000.tfrecord is truncated or has a corrupt record" in out and "00001" not in out


def test_corrupt_record_in_the_middle_ends_that_shard_only(tmp_path):
    path = write_records(tmp_path / "a.tfrecord", _good(6))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # Breaks the CRC of a record in the middle.
    open(path, "wb").write(bytes(data))
    other = write_records(tmp_path / "b.tfrecord", _good(2, "other"))
    examples, stats = read_epoch(data_config([path, other]))
    good = [e for e in examples if e["caption"].startswith("good")]
    assert 1 <= len(good) < 6 and stats["shards_damaged"] == 1
    assert sum(e["caption"].startswith("other") for e in examples) == 2


def test_a_file_that_is_not_tfrecord_is_skipped_and_counted(tmp_path):
    bad = tmp_path / "00000.tfrecord"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    good = write_records(tmp_path / "00001.tfrecord", _good(3))
    examples, stats = read_epoch(data_config([str(bad), good]))
    assert len(examples) == 3 and stats["shards_damaged"] == 1


def test_an_unreadable_shard_is_skipped_and_the_stream_goes_on(tmp_path, capfd):
    gone = write_records(tmp_path / "00000.tfrecord", _good(2, "gone"))
    kept = write_records(tmp_path / "00001.tfrecord", _good(3))
    ds, stats = make_dataset(data_config([gone, kept]), batch_size=1, seed=0)  # Endless stream.
    os.remove(gone)  # Listed at start, vanished before it is read (a GCS object deleted mid-run).
    iterator = ds.as_numpy_iterator()
    captions = [next(iterator)["caption"][0].decode() for _ in range(9)]  # Three epochs of the kept file.
    assert sorted(set(captions)) == [f"good {i}" for i in range(3)]
    counts = stats.read()
    assert counts["shards_unreadable"] >= 2 and counts["delivered"] >= 9
    assert f"cannot read shard {gone}" in capfd.readouterr().out


def test_unparsable_and_undecodable_records_are_counted_by_reason(tmp_path):
    records = _good(3) + [
        b"this is not a tf.train.Example at all \xff\x00",
        {"jpg": b"\xff\xd8 truncated jpeg", "txt": b"bad image"},
        {"txt": b"no image"},
        {"png": encode_image(solid(RED), "PNG")[:60], "txt": b"cut png"},
    ]
    examples, stats = read_epoch(data_config(write_records(tmp_path / "s.tfrecord", records)))
    assert sorted(e["caption"] for e in examples) == [f"good {i}" for i in range(3)]
    assert (stats["records"], stats["skipped_unparsable"], stats["skipped_undecodable"]) == (7, 1, 3)


def test_cmyk_16_bit_palette_and_gray_alpha_images_are_converted(tmp_path):
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 180, 90, 30
    gray16 = np.full((24, 24), 40000, np.uint16)  # 16-bit PNG: 40000 / 65535 of full scale.
    gray_alpha = Image.fromarray(
        np.stack([np.full((24, 24), 50, np.uint8), np.full((24, 24), 255, np.uint8)], -1), "LA"
    )
    records = [
        {"jpg": encode_image(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=98), "txt": b"cmyk"},
        {"png": encode_image(Image.fromarray(gray16), "PNG"), "txt": b"gray16"},
        {"png": encode_image(Image.fromarray(rgb).quantize(colors=4), "PNG"), "txt": b"palette"},
        {"png": encode_image(gray_alpha, "PNG"), "txt": b"gray alpha"},
    ]
    examples, stats = read_epoch(data_config(write_records(tmp_path / "s.tfrecord", records), image_size=8))
    by_caption = {e["caption"]: (e["image"] + 1) * 127.5 for e in examples}
    assert sorted(by_caption) == ["cmyk", "gray alpha", "gray16", "palette"]
    np.testing.assert_allclose(by_caption["cmyk"], np.broadcast_to((180, 90, 30), (8, 8, 3)), atol=8)
    np.testing.assert_allclose(by_caption["gray16"], np.full((8, 8, 3), 40000 / 65535 * 255), atol=1.5)
    np.testing.assert_allclose(by_caption["palette"], np.broadcast_to((180, 90, 30), (8, 8, 3)), atol=1e-3)
    np.testing.assert_allclose(by_caption["gray alpha"], np.full((8, 8, 3), 50.0), atol=1e-3)
    assert (stats["converted_grayscale"], stats["converted_alpha"], stats["converted_high_bit_depth"]) == (2, 1, 1)


def test_non_utf8_captions_get_replacement_characters(tmp_path):
    records = [{"png": encode_image(solid(RED), "PNG"), "txt": b"caf\xe9 au lait"}] + _good(1)
    examples, stats = read_epoch(data_config(write_records(tmp_path / "s.tfrecord", records)))
    assert sorted(e["caption"] for e in examples) == ["caf\ufffd au lait", "good 0"]
    assert stats["converted_caption_not_utf8"] == 1


def test_filters_status_size_aspect_and_caption_length(tmp_path):
    image = encode_image(solid(RED, 20, 20), "PNG")
    wide = encode_image(solid(RED, 10, 40), "PNG")

    def record(caption: bytes, status: bytes = b"success", size: tuple | None = (512, 512), img: bytes = image) -> dict:
        out = {"png": img, "txt": caption, "status": status}
        if size:
            out["original_width"], out["original_height"] = size
        return out

    records = [
        record(b"kept"),
        record(b"failed download", status=b"failed_to_download"),
        record(b"too small originally", size=(512, 100)),  # The original size counts, not the stored one.
        record(b"stored small, no original size", size=None),  # Falls back to the decoded 20 x 20.
        record(b"too wide", size=(1200, 400)),
        record(b"wide stored, no original size", size=None, img=wide),
        record(b"x" * 300),
        record(b""),
    ]
    cfg = data_config(
        write_records(tmp_path / "s.tfrecord", records), min_image_size=128, max_aspect_ratio=2.0, max_caption_chars=200
    )
    examples, stats = read_epoch(cfg)
    assert [e["caption"] for e in examples] == ["kept"]
    assert (
        stats["skipped_status"],
        stats["skipped_image_size"],
        stats["skipped_aspect_ratio"],
        stats["skipped_caption_length"],
    ) == (1, 3, 1, 2)
    # Defaults: only the failed status and the empty caption go.
    examples, stats = read_epoch(data_config(cfg.train_shards))
    assert len(examples) == 6 and (stats["skipped_status"], stats["skipped_caption_length"]) == (1, 1)
    examples, _ = read_epoch(data_config(cfg.train_shards, require_success_status=False, min_caption_chars=0))
    assert len(examples) == 8


def test_an_endless_stream_outlives_a_dataset_that_is_entirely_bad_except_one_record(tmp_path):
    bad = [{"jpg": b"junk", "txt": b"x"}] * 20
    shard = write_records(tmp_path / "s.tfrecord", bad + _good(1))
    ds, stats = make_dataset(data_config(shard), batch_size=4, seed=0)
    batch = next(ds.as_numpy_iterator())  # Four epochs' worth of the one good record, no stall, no crash.
    assert [c.decode() for c in batch["caption"]] == ["good 0"] * 4
    assert sorted(set(batch["epoch"].tolist())) == [0, 1, 2, 3]
    assert stats.read()["skipped_undecodable"] >= 60


@pytest.mark.parametrize("bad_value, match", [(-1, "crop_size"), (5, "crop_size")])
def test_crop_size_errors(tmp_path, bad_value, match):
    shard = write_records(tmp_path / "s.tfrecord", _good(1))
    with pytest.raises(ValueError, match=match):
        make_dataset(data_config(shard, image_size=4, crop_size=bad_value), batch_size=1, seed=0)


def test_an_epoch_that_delivers_nothing_is_an_error_naming_the_counters(tmp_path):
    """An endless stream with nothing in it would block training forever without a word."""
    shards = [write_records(tmp_path / f"{i}.tfrecord", _good(3)) for i in range(2)]
    ds, stats = make_dataset(data_config(shards, min_caption_chars=100), batch_size=2, seed=0)
    with pytest.raises(NoExamplesError) as error:
        next(numpy_batches(ds, stats))
    message = str(error.value)
    assert message.startswith("data: epoch 0 of this process (2 shard files) delivered no example (counters: records=")
    assert "skipped_caption_length=" in message and "delivered=" not in message and "\n" not in message


def test_the_partial_epoch_a_resume_starts_in_may_deliver_nothing(tmp_path):
    """Resumed after the only good records of epoch 0: the rest of it is empty, epoch 1 is not."""
    shard = write_records(tmp_path / "s.tfrecord", _good(2) + [{"jpg": b"junk", "txt": b"x"}] * 6)
    cfg = data_config(shard, shuffle_buffer=1)  # No shuffle: records in the order written.
    ds, stats = make_dataset(cfg, batch_size=2, seed=0, start=Position(0, 2))
    batch = next(numpy_batches(ds, stats))
    assert [c.decode() for c in batch["caption"]] == ["good 0", "good 1"] and batch["epoch"].tolist() == [1, 1]
