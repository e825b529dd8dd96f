"""Evaluation captions (COCO JSON, text, shards) and reference images (folders, shards) for tools.evaluate."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import demo
from imagen_jax.errors import DataError, UsageError
from imagen_jax.eval import sources


def test_coco_captions_are_one_seeded_caption_per_image(tmp_path):
    annotations = [
        {"image_id": i, "id": 10 * i + k, "caption": f" image {i} caption {k} "} for i in range(20) for k in range(5)
    ]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": annotations, "images": []}))
    first = sources.read_captions(str(path), 8, seed=1)
    assert first == sources.read_captions(str(path), 8, seed=1) != sources.read_captions(str(path), 8, seed=2)
    images = [int(c.split()[1]) for c in first]
    assert len(set(images)) == 8 and images == sorted(images)  # distinct images, in the file's order
    assert all(c.startswith("image ") and not c.endswith(" ") for c in first)
    assert len(sources.read_captions(str(path), 20)) == 20
    with pytest.raises(UsageError, match=r"captions_val2014.json: asked for 21 captions but it has only 20 images"):
        sources.read_captions(str(path), 21)
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="other.json: not a COCO captions file"):
        sources.read_captions(str(bad), 1)


def test_text_and_shard_captions(tmp_path):
    (tmp_path / "prompts.txt").write_text("a\n\nb\nc\n  \nd\n", encoding="utf-8")
    assert sorted(sources.read_captions(str(tmp_path / "prompts.txt"), 4)) == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match="missing.txt: no such file"):
        sources.read_captions(str(tmp_path / "missing.txt"), 1)
    demo.write_demo_shards(str(tmp_path / "data"), num_examples=12, image_size=16, num_shards=2, seed=0)
    captions = sources.read_captions(str(tmp_path / "data" / "*.tfrecord"), 5, seed=0)
    assert len(captions) == 5 and all(c in demo.all_captions() for c in captions)


def test_reference_images_are_cropped_resized_and_bad_files_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.md").write_text("not listed")
    images = sources.ReferenceImages(str(folder), 16)
    batches = list(images.batches(2))
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (1, 16, 16, 3)] and batches[0].dtype == np.uint8
    assert (images.delivered, images.skipped) == (3, 1)
    assert [b.shape[0] for b in sources.ReferenceImages(str(folder), 16).batches(2, limit=1)] == [1]

    demo.write_demo_shards(str(tmp_path / "data"), num_examples=6, image_size=32, num_shards=1, seed=0)
    shards = sources.ReferenceImages(str(tmp_path / "data" / "*.tfrecord"), 16)
    assert sum(b.shape[0] for b in shards.batches(4)) == 6 and shards.skipped == 0
    with pytest.raises(DataError, match="no images"):
        list(sources.ReferenceImages(str(tmp_path), 16))
