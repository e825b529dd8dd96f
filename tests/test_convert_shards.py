"""Tests for the webdataset -> TFRecord converter (imagen_jax.tools.convert_shards) and its record layout
(imagen_jax.data.records), on tiny tar shards written here the way img2dataset writes them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imagen_jax.data import convert_shards as cs
from imagen_jax.data.pipeline import make_dataset
from imagen_jax.data.records import example_from_sample, sample_from_example
from imagen_jax.tools import convert_shards as convert_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _image(fmt: str, seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=PIL_FORMATS[fmt])
    return buffer.getvalue()


def _meta(key: str, i: int) -> dict:
    """img2dataset-like metadata with every value type: int, float, str, bool, None, nested."""
    return {
        "url": f"http://example.com/{i}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 12,
        "height": 10,
        "original_width": 640 + i,
        "original_height": 480,
        "score": 0.3125 + i,
        "nsfw": False,
        "sha256": "ab" * 32,
        "caption": f"caption {i}",
        "tags": ["a", i, None],
        "exif": {"Image Make": "Canon", "depth": [1, 2.5]},
    }


def _sample(i: int, fmt: str = "jpg", caption: bytes | None = b"", meta: bool = True) -> tuple[str, dict]:
    key = f"{i:09d}"
    members = {fmt: _image(fmt, i)}
    if caption is not None:
        members["txt"] = caption or f"caption {i}".encode()
    if meta:
        members["json"] = json.dumps(_meta(key, i), indent=4).encode()
    return key, members


def _write_tar(path, samples: list[tuple[str, dict]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _read_examples(path) -> list[tf.train.Example]:
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def _expected_meta(meta: dict) -> dict:
    """What the record layout promises for each value type, written out independently of records.py."""
    out = {}
    for name, value in meta.items():
        if value is None or name in ("key", "txt", "jpg", "png", "webp"):
            continue
        if isinstance(value, bool):
            out[name] = int(value)
        elif isinstance(value, float):
            out[name] = float(np.float32(value))
        elif isinstance(value, (int, str)):
            out[name] = value
        else:
            out[name] = ("json", value)
    return out


def _decoded_meta(meta: dict, expected: dict) -> dict:
    return {k: ("json", json.loads(v)) if isinstance(expected.get(k), tuple) else v for k, v in meta.items()}


def test_records_match_inputs_for_every_format_and_type(tmp_path):
    samples = [_sample(0, "jpg"), _sample(1, "png", caption=b"caf\xe9 \xff"), _sample(2, "webp", caption=None)]
    _write_tar(tmp_path / "00000.tar", samples)
    totals = cs.convert(str(tmp_path / "*.tar"), str(tmp_path / "out"), workers=1)
    assert totals["samples"] == 3 and totals["converted"] == 1 and totals["bad_meta"] == 0

    examples = _read_examples(tmp_path / "out" / "00000.tfrecord")
    assert len(examples) == len(samples)
    for example, (key, members) in zip(examples, samples):
        fmt = next(f for f in ("jpg", "png", "webp") if f in members)
        got = sample_from_example(example)
        assert (got["key"], got["image_format"], got["image"]) == (key, fmt, members[fmt])
        assert got["caption"] == members.get("txt")  # raw bytes, non-UTF-8 included; None: no txt feature
        meta = json.loads(members["json"])
        expected = _expected_meta(meta)
        assert _decoded_meta(got["meta"], expected) == expected
        # The proto types the training pipeline relies on.
        features = example.features.feature
        assert features["width"].int64_list.value == [12] and features["nsfw"].int64_list.value == [0]
        assert features["status"].bytes_list.value == [b"success"]
        assert features["score"].float_list.value == pytest.approx([meta["score"]])
        assert "error_message" not in features and ("txt" in features) == ("txt" in members)
        parsed = tf.io.parse_single_example(
            example.SerializeToString(),
            {
                fmt: tf.io.FixedLenFeature([], tf.string),
                "status": tf.io.FixedLenFeature([], tf.string),
                **{
                    n: tf.io.FixedLenFeature([], tf.int64)
                    for n in ("width", "height", "original_width", "original_height")
                },
            },
        )
        assert int(parsed["original_width"]) == meta["original_width"]


def test_explicit_sample_fields_win_over_metadata():
    meta = {"key": "other", "txt": "meta caption", "png": "not an image", "width": 3}
    got = sample_from_example(example_from_sample("k1", b"JPEG", "jpg", None, meta))
    assert (got["key"], got["image_format"], got["image"], got["caption"]) == ("k1", "jpg", b"JPEG", None)
    assert got["meta"] == {"width": 3}
    with pytest.raises(ValueError, match="'bmp'"):
        example_from_sample("k1", b"BMP", "bmp", None, {})
    with pytest.raises(ValueError, match="'big'"):
        example_from_sample("k1", b"JPEG", "jpg", None, {"big": 2**70})


def test_pipeline_reads_converted_shards(tmp_path):
    _write_tar(tmp_path / "00000.tar", [_sample(i, fmt) for i, fmt in enumerate(["jpg", "png", "webp", "jpg"])])
    cs.convert([str(tmp_path / "00000.tar")], str(tmp_path / "out"), workers=1)
    config = ml_collections.ConfigDict(
        {
            "train_shards": str(tmp_path / "out" / "*.tfrecord"),
            "image_size": 8,
            "shuffle_buffer": 4,
            "num_parallel_calls": 1,
        }
    )
    ds, stats = make_dataset(config, batch_size=4, seed=0, repeat=False)
    (batch,) = list(ds.as_numpy_iterator())
    assert batch["image"].shape == (4, 8, 8, 3)
    assert sorted(batch["caption"].tolist()) == [f"caption {i}".encode() for i in range(4)]
    assert stats.read()["skipped_undecodable"] == 0 and stats.read()["delivered"] == 4


def test_skips_and_counters(tmp_path):
    no_image = ("000000009", {"txt": b"orphan caption", "json": b"{}"})
    two_images = ("000000010", {"png": _image("png", 10), "jpg": _image("jpg", 10), "cls": b"3"})
    bad_utf8 = ("000000011", {"jpg": _image("jpg", 11), "json": b'{"url": "\xff"}'})
    unstorable = ("000000012", {"jpg": _image("jpg", 12), "json": b'{"big": 100000000000000000000}'})
    _write_tar(tmp_path / "00000.tar", [_sample(0), no_image, two_images, bad_utf8, unstorable])
    totals = cs.convert(str(tmp_path / "00000.tar"), str(tmp_path / "out"), workers=1)
    assert totals["samples"] == 4
    assert totals["skipped"] == {"no_image": 1, "incomplete": 0}
    assert totals["bad_meta"] == 2 and totals["ignored_members"] == 2  # png and cls of sample 10

    got = {s["key"]: s for s in map(sample_from_example, _read_examples(tmp_path / "out" / "00000.tfrecord"))}
    assert set(got) == {"000000000", "000000010", "000000011", "000000012"}
    assert got["000000010"]["image_format"] == "jpg" and got["000000010"]["image"] == two_images[1]["jpg"]
    assert got["000000011"]["meta"] == {} and got["000000012"]["meta"] == {}


def _tar_with_offsets(path, n: int) -> tuple[str, list[tarfile.TarInfo]]:
    _write_tar(path, [_sample(i) for i in range(n)])
    with tarfile.open(path) as tar:
        return str(path), tar.getmembers()


@pytest.mark.parametrize(
    "damage, kept",
    [
        ("mid_member", 2),  # cut inside sample 2's image: samples 0 and 1 are complete
        ("at_boundary", 1),  # cut right before sample 2's first header: sample 1 may have lost members, dropped
        ("bad_header", 1),  # garbage in sample 2's first header
    ],
)
def test_damaged_tar_keeps_earlier_samples_and_names_the_shard(tmp_path, capsys, damage, kept):
    path, infos = _tar_with_offsets(tmp_path / "00007.tar", 4)
    first_of_2 = next(i for i in infos if i.name.startswith("000000002."))
    data = bytearray(open(path, "rb").read())
    if damage == "mid_member":
        data = data[: first_of_2.offset_data + 10]
    elif damage == "at_boundary":
        data = data[: first_of_2.offset]
    else:
        data[first_of_2.offset : first_of_2.offset + 100] = b"x" * 100
    open(path, "wb").write(bytes(data))

    totals = cs.convert(path, str(tmp_path / "out"), workers=1)
    assert (totals["damaged"], totals["samples"], totals["skipped"]["incomplete"]) == (1, kept, 1)
    keys = [sample_from_example(e)["key"] for e in _read_examples(tmp_path / "out" / "00007.tfrecord")]
    assert keys == [f"{i:09d}" for i in range(kept)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "damaged after" in err[0]
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]


def test_unreadable_shard_fails_without_output_and_others_go_on(tmp_path, capsys):
    _write_tar(tmp_path / "00000.tar", [_sample(0)])
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar file" * 50)
    totals = cs.convert(str(tmp_path / "*.tar"), str(tmp_path / "out"), workers=1)
    assert (totals["converted"], totals["failed"], totals["samples"]) == (1, 1, 1)
    assert sorted(os.listdir(tmp_path / "out")) == ["00000.tfrecord"]
    assert "00001.tar" in capsys.readouterr().err
    # Exit status 1 only when every shard failed.
    assert (
        convert_cli.main(["--input", str(tmp_path / "00001.tar"), "--output", str(tmp_path / "out2"), "--workers", "1"])
        == 1
    )
    assert (
        convert_cli.main(["--input", str(tmp_path / "*.tar"), "--output", str(tmp_path / "out3"), "--workers", "1"])
        == 0
    )


class _OneWayReader(io.RawIOBase):
    """A non-seekable byte source that counts what was read: a stand-in for a network stream."""

    def __init__(self, data: bytes):
        self._data, self.read_bytes = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data[self.read_bytes : self.read_bytes + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.read_bytes += len(chunk)
        return len(chunk)


def test_tar_is_read_as_a_stream(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"{i:04d}", {"jpg": rng.bytes(2000), "txt": b"t", "json": b"{}"}) for i in range(40)]
    data = open(_write_tar(tmp_path / "s.tar", samples), "rb").read()
    reader = _OneWayReader(data)
    stream = cs.iter_samples(reader)
    assert next(stream) == samples[0]
    assert reader.read_bytes < len(data) / 4  # the first sample arrives long before the shard is read
    assert list(stream) == samples[1:]


def test_resume_skips_existing_outputs_and_overwrite_redoes_them(tmp_path, capsys):
    for s in range(2):
        _write_tar(tmp_path / f"0000{s}.tar", [_sample(s)])
    out = tmp_path / "out"
    cs.convert(str(tmp_path / "*.tar"), str(out), workers=1)
    (out / "00000.tfrecord").write_bytes(b"marker")  # a stand-in for an output of an earlier run
    (out / "00001.tfrecord").unlink()  # as if the run had been interrupted before this shard
    capsys.readouterr()

    totals = cs.convert(str(tmp_path / "*.tar"), str(out), workers=1)
    assert (totals["existing"], totals["converted"]) == (1, 1)
    assert (out / "00000.tfrecord").read_bytes() == b"marker" and (out / "00001.tfrecord").exists()
    assert "skipping 1 of 2 shards" in capsys.readouterr().out

    totals = cs.convert(str(tmp_path / "*.tar"), str(out), workers=1, overwrite=True)
    assert (totals["existing"], totals["converted"]) == (0, 2)
    assert sample_from_example(_read_examples(out / "00000.tfrecord")[0])["key"] == "000000000"


def test_output_appears_only_when_complete(tmp_path, monkeypatch):
    _write_tar(tmp_path / "00000.tar", [_sample(i) for i in range(3)])
    out = tmp_path / "out"
    seen = []
    real = cs.record_from_members

    def watching(key, members, counts):
        seen.append(sorted(os.listdir(out)))
        if key == "000000002" and fail:
            raise OSError("disk full")
        return real(key, members, counts)

    monkeypatch.setattr(cs, "record_from_members", watching)
    fail = True
    totals = cs.convert(str(tmp_path / "00000.tar"), str(out), workers=1)
    assert totals["failed"] == 1 and os.listdir(out) == []  # neither the output nor its temporary file
    assert seen[-1] == [f"00000.tfrecord.tmp-{os.getpid()}"]

    fail, seen[:] = False, []
    cs.convert(str(tmp_path / "00000.tar"), str(out), workers=1)
    assert all(listing == [f"00000.tfrecord.tmp-{os.getpid()}"] for listing in seen)
    assert os.listdir(out) == ["00000.tfrecord"] and len(_read_examples(out / "00000.tfrecord")) == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagen_jax.tools.convert_shards", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_with_workers_prints_progress_and_summary(tmp_path):
    for s in range(3):
        _write_tar(tmp_path / f"0000{s}.tar", [_sample(10 * s + i) for i in range(s + 1)])
    run = _cli("--input", str(tmp_path / "{00000..00002}.tar"), "--output", str(tmp_path / "out"), "--workers", "2")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    progress = sorted(lines[:-1], key=lambda line: line.split("] ")[1])
    assert [line.split("] ")[1] for line in progress] == [
        f"0000{s}.tar -> 0000{s}.tfrecord: {s + 1} samples (0 skipped)" for s in range(3)
    ]
    assert sorted(line.split("]")[0] for line in progress) == ["[1/3", "[2/3", "[3/3"]
    assert lines[-1].startswith("done: 3 shards (3 converted, 0 existing, 0 damaged, 0 failed); 6 samples")
    assert sorted(os.listdir(tmp_path / "out")) == [f"0000{s}.tfrecord" for s in range(3)]


def test_cli_input_matching_nothing_is_a_one_line_error(tmp_path):
    run = _cli("--input", str(tmp_path / "nothing_*.tar"), "--output", str(tmp_path / "out"))
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        f"convert_shards: error: no shard files match {str(tmp_path / 'nothing_*.tar')!r}"
    ]
    assert not (tmp_path / "out").exists()


def test_non_tar_inputs_are_rejected(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="00000.parquet.*not a .tar"):
        cs.convert(str(tmp_path / "*"), str(tmp_path / "out"), workers=1)
