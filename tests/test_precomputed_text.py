"""Training batches from precomputed T5 embeddings equal the on-the-fly ones, and training needs no T5."""

from __future__ import annotations

import itertools
import os

import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.data import demo
from imagen_jax.data.encode_text import encode_shards
from imagen_jax.data.pipeline import make_dataset
from imagen_jax.text import T5Encoder, make_tiny_t5
from tests.shard_helpers import data_config

MAX_LENGTH = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precomputed")
    demo.write_demo_shards(str(root / "raw"), num_examples=40, image_size=8, num_shards=3, seed=0)
    t5 = make_tiny_t5(str(root / "t5"), demo.all_captions(), d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    encode_shards(
        t5,
        str(root / "raw" / "*.tfrecord"),
        str(root / "t5_shards"),
        max_length=MAX_LENGTH,
        batch_size=8,
        log=lambda _: None,
    )
    return root


def test_precomputed_batches_match_on_the_fly_encoding(assets):
    encoder = T5Encoder.from_pretrained(str(assets / "t5"))
    raw_cfg = data_config(str(assets / "raw" / "*.tfrecord"), image_size=8)
    stored_cfg = data_config(str(assets / "t5_shards" / "*.tfrecord"), image_size=8, precomputed_text=True)
    raw, _ = make_dataset(raw_cfg, batch_size=6, seed=3)
    stored, _ = make_dataset(stored_cfg, batch_size=6, seed=3, text_max_length=MAX_LENGTH)
    for a, b in itertools.islice(zip(raw.as_numpy_iterator(), stored.as_numpy_iterator()), 8):
        np.testing.assert_array_equal(a["caption"], b["caption"])  # Same examples in the same order...
        np.testing.assert_array_equal(a["image"], b["image"])
        ids, mask = encoder.tokenizer([c.decode() for c in a["caption"]], MAX_LENGTH)
        reference = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_array_equal(b["mask"], mask)  # ... and the same text, up to bfloat16 storage.
        text = np.asarray(b["text"], np.float32)
        np.testing.assert_allclose(text[mask], reference[mask], rtol=2**-7, atol=1e-6)
        assert not text[~mask].any()


def test_max_length_mismatch_is_an_error(assets):
    cfg = data_config(str(assets / "t5_shards" / "*.tfrecord"), image_size=8, precomputed_text=True)
    with pytest.raises(ValueError, match=f"stored with max_length {MAX_LENGTH} but config.text.max_length is 16"):
        make_dataset(cfg, batch_size=2, seed=0, text_max_length=16)


def test_records_without_embeddings_are_counted(assets, tmp_path):
    os.symlink(assets / "t5_shards" / "text_embeddings.json", tmp_path / "text_embeddings.json")
    os.symlink(assets / "raw" / "00000.tfrecord", tmp_path / "00000.tfrecord")  # Raw shard, no embeddings.
    os.symlink(assets / "t5_shards" / "00001.tfrecord", tmp_path / "00001.tfrecord")
    cfg = data_config(str(tmp_path / "*.tfrecord"), image_size=8, precomputed_text=True)
    ds, stats = make_dataset(cfg, batch_size=1, seed=0, repeat=False, text_max_length=MAX_LENGTH)
    delivered = sum(1 for _ in ds.as_numpy_iterator())
    counts = stats.read()
    assert counts["skipped_no_text_embedding"] == 13 and delivered == counts["delivered"] == 14


@pytest.mark.slow
def test_training_on_precomputed_text_builds_no_encoder(assets, tmp_path, capsys):
    from imagen_jax.train.loop import run
    from tests.test_train import tiny_config

    config = tiny_config(assets, num_steps=2, checkpoint_every=2, log_every=1, sample_every=2)
    config.text.encoder = ""  # Nothing to build: the run must never need it.
    config.text.max_length = MAX_LENGTH
    config.data.train_shards = str(assets / "t5_shards" / "*.tfrecord")
    config.data.precomputed_text = True
    metrics = run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert np.isfinite(metrics["loss"]) and "no encoder built" in out
    assert os.path.exists(tmp_path / "run" / "samples" / "step_0000002.png")  # Grid from the batch's captions.
