"""Precomputed T5 embeddings: the encode_text tool and the text_records format it writes."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from imagen_jax.data import demo, encode_text, text_records
from imagen_jax.text import T5Encoder, make_tiny_t5
from imagen_jax.tools import encode_text as encode_text_cli

MAX_LENGTH = 8
LONG_CAPTION = " ".join(["a red circle on the left"] * 4)  # far more than MAX_LENGTH tokens


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _edge_records() -> list[tuple[bytes, str | None]]:
    """(serialized record, the caption the tool must encode; None: not an Example, must be skipped)."""

    def example(**features: bytes) -> bytes:
        feats = {
            "key": _bytes(b"edge"),
            "jpg": _bytes(b"\xff\xd8 not really a jpeg"),
            "url": _bytes(b"x://y"),
            "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
        }
        feats.update({k: _bytes(v) for k, v in features.items()})
        return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()

    return [
        (example(txt=b""), ""),
        (example(txt=b"", caption=b"a blue square at the top"), "a blue square at the top"),
        (b"\x0a\x05ab", None),  # truncated protobuf: not a tf.train.Example
        (example(txt=b"a green \xff\xfe triangle"), "a green \ufffd\ufffd triangle"),
        (example(txt=LONG_CAPTION.encode()), LONG_CAPTION),
        (example(caption=b"a cyan circle in the middle"), "a cyan circle in the middle"),
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode_text")
    t5 = make_tiny_t5(str(root / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    inputs = root / "in"
    demo.write_demo_shards(str(inputs), num_examples=15, image_size=8, num_shards=3)
    with tf.io.TFRecordWriter(str(inputs / "00003.tfrecord")) as writer:
        for record, _ in _edge_records():
            writer.write(record)
    summary = encode_text.encode_shards(
        t5, str(inputs / "*.tfrecord"), str(root / "out"), max_length=MAX_LENGTH, batch_size=4, log=lambda line: None
    )
    return {
        "root": root,
        "t5": t5,
        "inputs": inputs,
        "out": root / "out",
        "summary": summary,
        "encoder": T5Encoder.from_pretrained(t5),
    }


def _examples(path) -> list[tf.train.Example | None]:
    out = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        try:
            out.append(tf.train.Example.FromString(raw))
        except Exception:
            out.append(None)
    return out


def _expected_captions(path) -> list[str]:
    if path.name == "00003.tfrecord":
        return [caption for _, caption in _edge_records() if caption is not None]
    return [e.features.feature["txt"].bytes_list.value[0].decode() for e in _examples(path)]


def _decoded(path, dim: int, dtype: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads the embeddings back the way a training pipeline would: parse + decode_embedding in tf.data."""

    def decode(record):
        features = tf.io.parse_single_example(record, text_records.FEATURE_SPEC)
        embedding, mask = text_records.decode_embedding(
            features[text_records.EMBEDDING_FEATURE], features[text_records.LENGTH_FEATURE], dim, dtype, max_length
        )
        assert embedding.dtype == {"bfloat16": tf.bfloat16, "float16": tf.float16}[dtype]
        return tf.cast(embedding, tf.float32), mask

    batches = list(tf.data.TFRecordDataset(str(path)).map(decode).batch(100).as_numpy_iterator())
    return batches[0]


def _input_shards(data) -> list:
    return sorted(data["inputs"].glob("*.tfrecord"))


def test_records_keep_every_input_feature_and_add_the_lengths(data):
    tokenizer = data["encoder"].tokenizer
    for src in _input_shards(data):
        inputs = [e for e in _examples(src) if e is not None]
        outputs = _examples(data["out"] / src.name)
        assert len(outputs) == len(inputs) > 0
        _, mask = tokenizer(_expected_captions(src), MAX_LENGTH)
        for before, after, real in zip(inputs, outputs, mask.sum(axis=1)):
            added = {text_records.EMBEDDING_FEATURE, text_records.LENGTH_FEATURE}
            assert set(after.features.feature) == set(before.features.feature) | added
            for name, feature in before.features.feature.items():
                assert after.features.feature[name].SerializeToString() == feature.SerializeToString(), name
            assert list(after.features.feature[text_records.LENGTH_FEATURE].int64_list.value) == [real]
            assert 1 <= real <= MAX_LENGTH


def test_embeddings_equal_the_encoder_output_on_real_tokens(data):
    encoder = data["encoder"]
    for src in _input_shards(data):
        reference, mask = encoder.encode(_expected_captions(src), MAX_LENGTH)
        reference, mask = np.asarray(reference), np.asarray(mask)
        stored, stored_mask = _decoded(data["out"] / src.name, encoder.dim, "bfloat16", MAX_LENGTH)
        np.testing.assert_array_equal(stored_mask, mask)
        rounded = np.where(mask[..., None], reference, 0).astype(ml_dtypes.bfloat16).astype(np.float32)
        # Batched and single forwards agree to float32 round-off, so at most one bfloat16 ulp apart.
        np.testing.assert_allclose(stored, rounded, rtol=2**-7, atol=1e-6)
        assert np.mean(stored == rounded) > 0.95
        assert not stored[~mask].any()


def test_empty_caption_is_eos_alone(data):
    stored, mask = _decoded(data["out"] / "00003.tfrecord", data["encoder"].dim, "bfloat16", MAX_LENGTH)
    assert mask[0].tolist() == [True] + [False] * (MAX_LENGTH - 1)
    assert mask[3].all()  # the long caption fills max_length (truncated, EOS last)
    assert np.abs(stored[0, 0]).sum() > 0


def test_metadata_and_summary(data):
    with open(data["out"] / text_records.METADATA_FILE) as f:
        metadata = json.load(f)
    assert metadata == {
        "encoder": data["t5"],
        "dim": 16,
        "max_length": MAX_LENGTH,
        "dtype": "bfloat16",
        "compute_dtype": "float32",
        "lowercase": False,
        "num_shards": 4,
        "num_records": 20,
    }
    summary = data["summary"]
    assert (summary["written"], summary["existing"], summary["records"], summary["unparsable"]) == (4, 0, 20, 1)
    assert summary["damaged"] == [] and summary["metadata"] == metadata
    shards = [str(data["out"] / p.name) for p in _input_shards(data)]
    read = text_records.read_metadata(shards)
    assert read == {k: v for k, v in metadata.items() if k not in ("num_shards", "num_records")}
    assert not [p for p in os.listdir(data["out"]) if p.endswith(encode_text.TEMP_SUFFIX)]


def test_lowercase_encodes_lowered_captions_and_is_checked(data, tmp_path):
    """--lowercase (DeepFloyd IF's prompts): the stored embedding is the lowered, stripped caption's; a rerun into
    the folder and training (make_dataset) must agree with it, and a folder from before the field reads as False."""
    from imagen_jax.data.pipeline import make_dataset
    from tests.shard_helpers import data_config

    inputs, caption = tmp_path / "in", "  A Blue SQUARE at the Top "
    inputs.mkdir()
    with tf.io.TFRecordWriter(str(inputs / "00000.tfrecord")) as writer:
        features = tf.train.Features(feature={"txt": _bytes(caption.encode()), "key": _bytes(b"upper")})
        writer.write(tf.train.Example(features=features).SerializeToString())
    out = tmp_path / "out"
    encode = lambda **kw: encode_text.encode_shards(  # noqa: E731
        data["t5"], str(inputs / "*.tfrecord"), str(out), max_length=MAX_LENGTH, log=lambda line: None, **kw
    )
    assert encode(lowercase=True)["metadata"]["lowercase"] is True
    stored, mask = _decoded(out / "00000.tfrecord", 16, "bfloat16", MAX_LENGTH)
    for text, same in (("a blue square at the top", True), (caption, False)):
        ids, expected_mask = data["encoder"].tokenizer([text], MAX_LENGTH)
        reference = np.asarray(data["encoder"](ids, expected_mask))
        matches = np.array_equal(mask, expected_mask) and np.allclose(
            stored[mask], reference[expected_mask], rtol=2**-7, atol=1e-6
        )
        assert matches == same, text
    with pytest.raises(ValueError, match="says lowercase True but this run has False: pass --overwrite"):
        encode()
    config = data_config(str(out / "*.tfrecord"), image_size=8, precomputed_text=True)
    with pytest.raises(ValueError, match="stored with lowercase True but config.text.lowercase is False"):
        make_dataset(config, batch_size=1, seed=0, text_max_length=MAX_LENGTH, text_lowercase=False)
    make_dataset(config, batch_size=1, seed=0, text_max_length=MAX_LENGTH, text_lowercase=True)
    metadata = json.loads((out / text_records.METADATA_FILE).read_text())
    del metadata["lowercase"]  # as encode_text wrote it before --lowercase existed
    (out / text_records.METADATA_FILE).write_text(json.dumps(metadata))
    assert text_records.read_metadata([str(out / "00000.tfrecord")])["encoder"] == data["t5"]
    encode()  # the old folder is a run without --lowercase: nothing to redo, no error


def test_float16_and_shorter_reader_truncates(data, tmp_path):
    src = data["inputs"] / "00003.tfrecord"
    summary = encode_text.encode_shards(
        data["t5"],
        str(src),
        str(tmp_path / "f16"),
        max_length=MAX_LENGTH,
        dtype="float16",
        batch_size=2,
        log=lambda line: None,
    )
    assert summary["metadata"]["dtype"] == "float16" and summary["metadata"]["num_records"] == 5
    reference, mask = (np.asarray(a) for a in data["encoder"].encode(_expected_captions(src), MAX_LENGTH))
    reference = np.where(mask[..., None], reference, 0)
    stored, stored_mask = _decoded(tmp_path / "f16" / src.name, 16, "float16", MAX_LENGTH)
    np.testing.assert_array_equal(stored_mask, mask)
    np.testing.assert_allclose(stored, reference, rtol=2**-10, atol=1e-6)
    short, short_mask = _decoded(tmp_path / "f16" / src.name, 16, "float16", 3)
    np.testing.assert_array_equal(short_mask, mask[:, :3])
    np.testing.assert_array_equal(short, stored[:, :3])


def test_encode_embedding_round_trip_and_errors():
    rng = np.random.default_rng(0)
    array = rng.standard_normal((3, 5)).astype(np.float32)
    raw = text_records.encode_embedding(array, "bfloat16")
    assert raw == array.astype(ml_dtypes.bfloat16).tobytes() and len(raw) == 30
    with pytest.raises(ValueError, match="not finite in float16"):
        text_records.encode_embedding(np.full((1, 2), 1e5, np.float32), "float16")
    with pytest.raises(ValueError, match="'float32' is not supported"):
        text_records.encode_embedding(array, "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="does not match t5_length"):
        text_records.decode_embedding(tf.constant(raw), tf.constant(2, tf.int64), 5, "bfloat16", 4)


def test_read_metadata_errors_name_the_folder(data, tmp_path):
    shard = str(data["out"] / "00000.tfrecord")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bare'}: no text_embeddings.json"):
        text_records.read_metadata([shard, str(tmp_path / "bare" / "00000.tfrecord")])
    other = tmp_path / "other"
    other.mkdir()
    with open(data["out"] / text_records.METADATA_FILE) as f:
        metadata = json.load(f)
    for key, value in (("max_length", 16), ("dtype", "float16"), ("encoder", "/models/t5-v1_1-xxl")):
        (other / text_records.METADATA_FILE).write_text(json.dumps({**metadata, key: value}))
        with pytest.raises(ValueError, match=f"^{other}: text_embeddings.json has {key} "):
            text_records.read_metadata([shard, str(other / "00000.tfrecord")])
    # The same encoder at another path, and different counts, still agree.
    moved = {**metadata, "encoder": "/elsewhere/t5", "num_records": 3, "num_shards": 1}
    (other / text_records.METADATA_FILE).write_text(json.dumps(moved))
    assert text_records.read_metadata([shard, str(other / "00000.tfrecord")])["dim"] == 16


def test_resume_skips_existing_outputs(data, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(data["inputs"], inputs)
    out = tmp_path / "out"
    args = (data["t5"], str(inputs / "*.tfrecord"), str(out))
    encode_text.encode_shards(*args, max_length=MAX_LENGTH, batch_size=4, log=lambda line: None)
    kept = (out / "00001.tfrecord").read_bytes()
    (out / "00001.tfrecord").write_bytes(kept[:0])  # a marker: a skipped shard is not rewritten
    os.remove(out / "00002.tfrecord")
    (out / ("00002.tfrecord" + encode_text.TEMP_SUFFIX)).write_bytes(b"left by a killed run")
    lines = []
    summary = encode_text.encode_shards(*args, max_length=MAX_LENGTH, batch_size=4, log=lines.append)
    assert (summary["written"], summary["existing"]) == (1, 3)
    assert (out / "00001.tfrecord").read_bytes() == b""
    assert (out / "00002.tfrecord").read_bytes() == (data["out"] / "00002.tfrecord").read_bytes()
    assert not (out / ("00002.tfrecord" + encode_text.TEMP_SUFFIX)).exists()
    assert any("00001.tfrecord: exists" in line for line in lines)
    assert summary["metadata"]["num_records"] == 20 - 5  # the emptied shard counts 0
    with pytest.raises(ValueError, match="says max_length 8 but this run has 16: pass --overwrite"):
        encode_text.encode_shards(*args, max_length=16, batch_size=4, log=lambda line: None)


def test_damaged_shard_is_reported_and_the_rest_encoded(data, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("00000.tfrecord", "00001.tfrecord"):
        shutil.copy(data["inputs"] / name, inputs / name)
    whole = (inputs / "00000.tfrecord").read_bytes()
    (inputs / "00000.tfrecord").write_bytes(whole[: len(whole) // 2])  # cut inside the 3rd of 5 records
    lines = []
    summary = encode_text.encode_shards(
        data["t5"],
        str(inputs / "*.tfrecord"),
        str(tmp_path / "out"),
        max_length=MAX_LENGTH,
        batch_size=2,
        log=lines.append,
    )
    kept = len(_examples(tmp_path / "out" / "00000.tfrecord"))
    assert 0 < kept < 5 and len(_examples(tmp_path / "out" / "00001.tfrecord")) == 5
    assert [src for src, _ in summary["damaged"]] == [str(inputs / "00000.tfrecord")]
    report = [line for line in lines if "kept the records before it" in line]
    assert len(report) == 1 and "\n" not in report[0]
    assert report[0].startswith(f"{inputs / '00000.tfrecord'}: damaged after record {kept} (truncated record at ")
    reference, _ = data["encoder"].encode(_expected_captions(data["inputs"] / "00000.tfrecord")[:kept], MAX_LENGTH)
    stored, _ = _decoded(tmp_path / "out" / "00000.tfrecord", 16, "bfloat16", MAX_LENGTH)
    np.testing.assert_allclose(stored[:, 0], np.asarray(reference)[:, 0], rtol=2**-7, atol=1e-6)
    assert summary["metadata"]["num_records"] == kept + 5


@pytest.mark.parametrize("case", ["encoder", "input", "output", "max_length"])
def test_cli_errors_are_one_line(data, tmp_path, capsys, case):
    argv = {
        "encoder": str(data["t5"]),
        "input": str(data["inputs"] / "*.tfrecord"),
        "output": str(tmp_path / "o"),
        "max_length": "8",
    }
    bad = {
        "encoder": str(tmp_path / "missing_t5"),
        "input": str(tmp_path / "nothing*.tfrecord"),
        "output": str(data["inputs"]),
        "max_length": "0",
    }
    expected = {
        "encoder": "missing_t5/config.json: T5 config.json not found",
        "input": "no shard files match",
        "output": "is the folder of input shard",
        "max_length": "--max_length must be >= 1, got 0",
    }
    argv[case] = bad[case]
    status = encode_text_cli.main([arg for key, value in argv.items() for arg in (f"--{key}", value)])
    assert status == (2 if case in ("output", "max_length") else 1)  # bad arguments exit 2, as sample.py's
    err = capsys.readouterr().err
    assert err.startswith("encode_text: error: ") and expected[case] in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_processes_split_the_files_and_only_process_0_writes_metadata(data, tmp_path):
    out = tmp_path / "out"
    spec = str(data["inputs"] / "*.tfrecord")
    second = encode_text.encode_shards(
        data["t5"],
        spec,
        str(out),
        max_length=MAX_LENGTH,
        batch_size=4,
        process_index=1,
        process_count=2,
        log=lambda line: None,
    )
    assert sorted(os.listdir(out)) == ["00001.tfrecord", "00003.tfrecord"] and second["metadata"] is None
    first = encode_text.encode_shards(
        data["t5"],
        spec,
        str(out),
        max_length=MAX_LENGTH,
        batch_size=4,
        process_index=0,
        process_count=2,
        log=lambda line: None,
    )
    assert [os.path.basename(f) for f in first["shards"]] == ["00000.tfrecord", "00002.tfrecord"]
    assert first["metadata"]["num_shards"] == 4 and "num_records" not in first["metadata"]
    for name in ("00000.tfrecord", "00003.tfrecord"):
        assert (out / name).read_bytes() == (data["out"] / name).read_bytes()
