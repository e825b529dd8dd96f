"""Tests for imagen_jax.data: shard listing, the tf.data pipeline, and the synthetic demo dataset."""

from __future__ import annotations

import io
import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imagen_jax.data import demo
from imagen_jax.data.pipeline import make_dataset
from imagen_jax.data.shards import expand_braces, list_shards
from tests.shard_helpers import data_config, encode_image, read_epoch, solid, write_records


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.write_demo_shards(str(out), num_examples=90, image_size=32, num_shards=5, seed=1)


# ----------------------------------------------------------------------------------------------- shards


def test_expand_braces_ranges_alternatives_and_nesting():
    assert expand_braces("d/{00000..00012}.tfrecord") == [f"d/{i:05d}.tfrecord" for i in range(13)]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{a,{b,c}d}") == ["xa", "xbd", "xcd"]
    assert expand_braces("gs://bucket/plain.tfrecord") == ["gs://bucket/plain.tfrecord"]
    for bad in ("d/{0..3.tfrecord", "d/0..3}.tfrecord", "d/{solo}.tfrecord"):
        with pytest.raises(ValueError, match="shard pattern"):
            expand_braces(bad)


def test_list_shards_glob_brace_list_and_comma_string(tmp_path):
    files = [str(tmp_path / f"{i:05d}.tfrecord") for i in range(4)]
    for f in files:
        open(f, "wb").close()
    assert list_shards(str(tmp_path / "*.tfrecord")) == files
    assert list_shards(str(tmp_path / "{00001..00003}.tfrecord")) == files[1:]
    assert list_shards([files[2], files[0], files[0]]) == [files[0], files[2]]
    assert list_shards(f"{files[3]},{tmp_path}/{{00000,00001}}.tfrecord") == [files[0], files[1], files[3]]


def test_list_shards_reads_list_files(tmp_path):
    (tmp_path / "cc").mkdir()
    files = [str(tmp_path / "cc" / f"{i:05d}.tfrecord") for i in range(3)]
    for f in files:
        open(f, "wb").close()
    listing = tmp_path / "cc" / "clean.txt"
    listing.write_text(f"# kept after cleaning\n00002.tfrecord\n\n{files[0]}\n")  # Relative and absolute.
    assert list_shards(str(listing)) == [files[0], files[2]]
    assert list_shards([str(listing), files[1]]) == files
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt' lists no files"):
        list_shards(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="cannot read shard list file .*missing.txt"):
        list_shards(str(tmp_path / "missing.txt"))
    (tmp_path / "typo.txt").write_text("cc/0000X.tfrecord\n")
    with pytest.raises(FileNotFoundError, match="0000X"):  # An entry that matches nothing names itself.
        list_shards(str(tmp_path / "typo.txt"))


def test_list_shards_no_match_names_the_pattern(tmp_path):
    open(tmp_path / "00000.tfrecord", "wb").close()
    missing = str(tmp_path / "train-{00000..00003}.tfrecord")
    with pytest.raises(FileNotFoundError, match="train-"):
        list_shards(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\*"):  # One bad pattern among good ones still fails.
        list_shards([str(tmp_path / "*.tfrecord"), str(tmp_path / "nope*")])


# ---------------------------------------------------------------------------------------------- pipeline


def test_batches_have_shape_range_and_matching_captions(demo_shards):
    ds, stats = make_dataset(data_config(demo_shards, image_size=16), batch_size=8, seed=0)
    batches = list(itertools.islice(ds.as_numpy_iterator(), 12))  # > one epoch: the stream repeats.
    for batch in batches:
        assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8  # [-1,1] on the device
        assert batch["caption"].shape == (8,)
    captions = set(demo.all_captions())
    for batch in batches:
        for image, text in zip(batch["image"], batch["caption"]):
            text = text.decode()
            assert text in captions
            # The image decoded next to a caption shows what the caption says (pairing and RGB order).
            assert f"a {demo.classify_color(image)} " in text
    counts = stats.read()
    assert counts["delivered"] >= 96 and counts["records"] >= counts["delivered"]
    assert counts["shards_damaged"] == counts["shards_unreadable"] == 0 and counts["skipped_undecodable"] == 0


def test_resize_short_side_then_center_crop(tmp_path):
    stripes = np.zeros((40, 120, 3), np.uint8)  # Red | green | blue, 40 px each; output keeps the middle.
    stripes[:, :40, 0] = stripes[:, 40:80, 1] = stripes[:, 80:, 2] = 255
    shard = write_records(
        tmp_path / "s.tfrecord",
        [
            {"png": encode_image(stripes, "PNG"), "txt": b"wide"},
            {"png": encode_image(np.ascontiguousarray(stripes.transpose(1, 0, 2)), "PNG"), "txt": b"tall"},
            {"png": encode_image(solid((10, 130, 250), 7, 13), "PNG"), "txt": b"small"},  # Upsampled.
        ],
    )
    examples, _ = read_epoch(data_config(shard, image_size=10))
    by_caption = {e["caption"]: e["image"] for e in examples}
    green = np.array([-1.0, 1.0, -1.0])
    np.testing.assert_allclose(by_caption["wide"][:, 3:7], np.broadcast_to(green, (10, 4, 3)), atol=0.02)
    np.testing.assert_allclose(by_caption["tall"][3:7, :], np.broadcast_to(green, (4, 10, 3)), atol=0.02)
    expected = np.array([10, 130, 250]) / 127.5 - 1.0
    np.testing.assert_allclose(by_caption["small"], np.broadcast_to(expected, (10, 10, 3)), atol=1e-4)


def test_image_formats_and_channel_conversion(tmp_path):
    gray, rgba = solid((100,)), solid((10, 20, 30, 128))
    shard = write_records(
        tmp_path / "s.tfrecord",
        [
            {"jpg": encode_image(solid((200, 40, 40)), "JPEG"), "txt": b"jpg"},
            {"png": encode_image(solid((40, 200, 40)), "PNG"), "txt": b"png"},
            {"webp": encode_image(solid((40, 40, 200)), "WEBP"), "txt": b"webp"},
            {"png": encode_image(gray, "PNG"), "txt": b"gray png"},
            {"jpg": encode_image(gray, "JPEG"), "txt": b"gray jpg"},
            {"png": encode_image(rgba, "PNG"), "txt": b"rgba png"},
        ],
    )
    examples, stats = read_epoch(data_config(shard, image_size=8))
    assert stats["skipped_undecodable"] == 0
    assert (stats["converted_grayscale"], stats["converted_alpha"]) == (2, 1)
    # Alpha is composited onto white: 128/255 of the colour, the rest white.
    on_white = tuple(c * 128 / 255 + 255 * (1 - 128 / 255) for c in (10, 20, 30))
    expected = {
        "jpg": (200, 40, 40),
        "png": (40, 200, 40),
        "webp": (40, 40, 200),
        "gray png": (100,) * 3,
        "gray jpg": (100,) * 3,
        "rgba png": on_white,
    }
    assert sorted(e["caption"] for e in examples) == sorted(expected)
    for example in examples:
        want = np.broadcast_to(np.array(expected[example["caption"]]) / 127.5 - 1.0, (8, 8, 3))
        lossy = example["caption"] in ("jpg", "webp", "gray jpg")
        np.testing.assert_allclose(example["image"], want, atol=0.05 if lossy else 0.5 / 127.5)  # rounded to uint8


def test_caption_prefers_txt_then_caption_and_skips_empty(tmp_path):
    image = encode_image(solid((200, 40, 40)), "PNG")
    shard = write_records(
        tmp_path / "s.tfrecord",
        [
            {"png": image, "txt": b"from txt", "caption": b"not this"},
            {"png": image, "caption": b"from caption"},
            {"png": image, "txt": b"", "caption": b"empty txt falls back"},
            {"png": image},
        ],
    )
    examples, stats = read_epoch(data_config(shard))
    assert sorted(e["caption"] for e in examples) == ["empty txt falls back", "from caption", "from txt"]
    assert (stats["records"], stats["delivered"], stats["skipped_caption_length"]) == (4, 3, 1)
    kept, stats = read_epoch(data_config(shard, min_caption_chars=0))  # Empty captions kept when asked.
    assert len(kept) == 4 and stats["skipped_caption_length"] == 0


def test_undecodable_records_are_skipped_and_counted(tmp_path):
    good = encode_image(solid((40, 200, 40)), "JPEG")
    records = [{"jpg": good, "txt": f"good {i}".encode()} for i in range(6)]
    records[2:2] = [{"jpg": b"\xff\xd8 definitely not a jpeg", "txt": b"corrupt"}]
    records[5:5] = [{"txt": b"no image at all"}]
    shard = write_records(tmp_path / "s.tfrecord", records)
    examples, stats = read_epoch(data_config(shard))
    assert sorted(e["caption"] for e in examples) == [f"good {i}" for i in range(6)]
    assert (stats["records"], stats["delivered"], stats["skipped_undecodable"]) == (8, 6, 2)


def test_processes_read_disjoint_file_sets_covering_all(tmp_path):
    image = encode_image(solid((200, 40, 40)), "PNG")
    for f in range(5):
        write_records(tmp_path / f"{f:05d}.tfrecord", [{"png": image, "txt": f"f{f} r{r}".encode()} for r in range(3)])
    cfg = data_config(str(tmp_path / "*.tfrecord"))
    files_of = []
    for index in range(2):
        examples, _ = read_epoch(cfg, process_index=index, process_count=2)
        files_of.append({e["caption"].split()[0] for e in examples})
        assert len(examples) == 3 * len(files_of[-1])  # Whole files, never split by record.
    assert files_of[0].isdisjoint(files_of[1])
    assert files_of[0] | files_of[1] == {f"f{f}" for f in range(5)}
    with pytest.raises(ValueError, match="process 5 of 6 gets no shard files: only 5 files"):
        make_dataset(cfg, batch_size=1, seed=0, process_index=5, process_count=6)


def test_seed_fixes_the_order(demo_shards):
    def first_batches(seed):
        ds, _ = make_dataset(data_config(demo_shards), batch_size=8, seed=seed)
        return list(itertools.islice(ds.as_numpy_iterator(), 3))

    a, b, c = first_batches(3), first_batches(3), first_batches(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["caption"], y["caption"])
    assert [list(x["caption"]) for x in a] != [list(z["caption"]) for z in c]


def test_config_errors_name_the_problem(demo_shards):
    with pytest.raises(ValueError, match="'webdataset' is not supported.*convert_shards"):
        make_dataset(data_config(demo_shards, format="webdataset"), batch_size=1, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(ml_collections.ConfigDict(dict(train_shards=demo_shards)), batch_size=1, seed=0)


# ------------------------------------------------------------------------------------------------- demo


def test_demo_shards_are_img2dataset_records_covering_every_caption(demo_shards):
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(demo_shards)]
    assert [p.rsplit("/", 1)[1] for p in demo_shards] == [f"{i:05d}.tfrecord" for i in range(5)]
    assert len(records) == 90
    features = records[0].features.feature
    assert features["status"].bytes_list.value == [b"success"]
    assert features["width"].int64_list.value == [32] and features["original_height"].int64_list.value == [32]
    assert Image.open(io.BytesIO(features["jpg"].bytes_list.value[0])).size == (32, 32)
    keys = {r.features.feature["key"].bytes_list.value[0] for r in records}
    assert len(keys) == 90
    # 90 examples = one full cycle through the 6 x 3 x 5 combinations: each caption exactly once.
    captions = sorted(r.features.feature["txt"].bytes_list.value[0].decode() for r in records)
    assert captions == sorted(demo.all_captions()) and len(set(captions)) == 90


def test_caption_text_and_bad_names():
    assert demo.caption("red", "circle", "left") == "a red circle on the left"
    assert demo.caption("blue", "square", "top") == "a blue square at the top"
    assert demo.caption("green", "triangle", "middle") == "a green triangle in the middle"
    with pytest.raises(ValueError, match="'mauve'"):
        demo.caption("mauve", "circle", "left")


@pytest.mark.parametrize("size", [16, 32])
def test_classifiers_recover_every_rendered_combination(size):
    rng = np.random.default_rng(size)
    for color, shape, position in itertools.product(demo.COLORS, demo.SHAPES, demo.POSITIONS):
        image = demo.render(color, shape, position, size, rng)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        jpeg = np.asarray(Image.open(io.BytesIO(demo._encode_jpeg(image))))  # As the training shards store it.
        for version in (image, jpeg):
            assert demo.classify_color(version) == color, (color, shape, position)
            assert demo.classify_shape(version) == shape, (color, shape, position)
            assert demo.classify_position(version) == position, (color, shape, position)
        as_float = image.astype(np.float32) / 127.5 - 1.0  # Model space gives the same answer.
        assert demo.classify_color(as_float) == color
        assert demo.classify_shape(as_float) == shape


def test_renders_vary_with_jitter():
    rng = np.random.default_rng(0)
    first, second = (demo.render("red", "circle", "left", 32, rng) for _ in range(2))
    assert not np.array_equal(first, second)


def test_classifiers_give_a_valid_answer_for_noise_and_blank_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blank = np.zeros((32, 32, 3), np.float32)
    for image in (noise, blank, rng.uniform(-1, 1, (16, 16, 3))):
        assert demo.classify_color(image) in demo.COLORS
        assert demo.classify_position(image) in demo.POSITIONS
        assert demo.classify_shape(image) in demo.SHAPES
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        demo.classify_color(np.zeros((32, 32)))


def test_cli_writes_and_reports(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--num_examples", "7", "--image_size", "16", "--num_shards", "2"])
    printed = capsys.readouterr().out
    assert "wrote 7 examples of 16x16 in 2 shards" in printed and "00001.tfrecord" in printed
    assert sum(1 for _ in tf.data.TFRecordDataset(list_shards(str(tmp_path / "*.tfrecord")))) == 7


def test_random_crops_are_seeded_windows_of_the_resized_image(tmp_path):
    gradient = np.zeros((32, 32, 3), np.uint8)
    gradient[..., 0] = np.arange(32)[None, :] * 8  # red encodes x, green encodes y
    gradient[..., 1] = np.arange(32)[:, None] * 8
    shard = write_records(tmp_path / "g.tfrecord", [{"png": encode_image(gradient, "PNG"), "txt": b"g"}] * 12)
    full, _ = read_epoch(data_config(shard, image_size=32))
    crops, _ = read_epoch(data_config(shard, image_size=32, crop_size=8))
    again, _ = read_epoch(data_config(shard, image_size=32, crop_size=8))
    reference = full[0]["image"]
    offsets = set()
    for example in crops:
        crop = example["image"]
        assert crop.shape == (8, 8, 3)
        y, x = round((crop[0, 0, 1] + 1) * 127.5 / 8), round((crop[0, 0, 0] + 1) * 127.5 / 8)
        np.testing.assert_allclose(crop, reference[y : y + 8, x : x + 8], atol=1e-5)
        offsets.add((y, x))
    assert len(offsets) > 3  # different windows per example
    np.testing.assert_array_equal(np.stack([e["image"] for e in crops]), np.stack([e["image"] for e in again]))
    with pytest.raises(ValueError, match="crop_size \\(40\\) must be 0"):
        make_dataset(data_config(shard, image_size=32, crop_size=40), batch_size=1, seed=0)


def test_an_image_stored_at_the_size_arrives_unchanged(tmp_path):
    """img2dataset --image_size stores images at the training size: they skip the resize, pixel for pixel."""
    from imagen_jax.data.pipeline import make_dataset

    noise = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    shard = write_records(tmp_path / "s.tfrecord", [{"png": encode_image(noise, "PNG"), "txt": b"noise"}])
    ds, _ = make_dataset(data_config(shard, image_size=10), batch_size=1, seed=0, repeat=False)
    (batch,) = list(ds.as_numpy_iterator())
    assert batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][0], noise)
