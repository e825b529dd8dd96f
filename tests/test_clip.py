"""CLIP (towers, tokenizer, preprocessing, score) against transformers 5.24 / torchvision / torchmetrics goldens
(tests/fixtures/make_clip_fixtures.py); inputs are rebuilt here from the seeds the fixture script used."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.errors import WeightsError
from imagen_jax.eval.clip import CLIP, CLIPConfig, CLIPModule
from imagen_jax.eval.clip_preprocess import ImageProcessing, resize_uint8
from imagen_jax.eval.clip_score import clip_score, mean_score, pair_scores
from imagen_jax.eval.clip_tiny import make_tiny_clip
from imagen_jax.eval.clip_tokenizer import CLIPTokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "clip")
MODEL = os.path.join(FIXTURES, "model")
GOLDEN = np.load(os.path.join(FIXTURES, "golden.npz"))
TEXTS = [str(t) for t in GOLDEN["texts"]]
# As in the fixture script:
TRAIN_CAPTIONS = [
    "a red circle on the left",
    "a blue square at the bottom",
    "a photo of a cat sitting on a mat",
    "the quick brown fox jumps over the lazy dog",
    "two dogs playing in the snow",
    "a painting of a house by the river at sunset",
] * 3
IMAGE_SIZES = [(48, 48), (20, 30), (64, 40)]
RESIZE_CASES = [
    ((32, 32), (28, 28)),
    ((16, 16), (56, 56)),
    ((20, 30), (28, 42)),
    ((96, 64), (42, 28)),
    ((70, 90), (28, 36)),
]
SCORE_CAPTIONS = ["a red circle on the left", "a photo of a cat", "two dogs in the snow", "a house at sunset"]
TINY_TEXTS = ["a red circle", "a blue square at the bottom"]
# Embeddings: float32 sums over a few hundred terms, reordered by XLA; the goldens reach ~1e-6.
ATOL, RTOL = 1e-5, 1e-4


def seeded_image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    ramps = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 127 / (height + width)], -1)
    return np.clip(ramps + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def features(clip: CLIP, kind: str, x: np.ndarray) -> np.ndarray:
    """The unnormalised projections (transformers' get_*_features), jitted: compiling beats running eagerly."""
    method = {"text": CLIPModule.text_features, "image": CLIPModule.image_features}[kind]
    return np.asarray(jax.jit(lambda state, x: method(nnx.merge(clip.graphdef, state), x))(clip.state, x))


@pytest.fixture(scope="module")
def clip():
    return CLIP.from_pretrained(MODEL)


def _copy_model(tmp_path, name: str = "clip") -> str:
    folder = tmp_path / name
    shutil.copytree(MODEL, folder)
    return str(folder)


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        value = json.load(f)
    edit(value)
    with open(path, "w") as f:
        json.dump(value, f)


def test_tokenizer_matches_torchmetrics(clip):
    """torchmetrics' ids: BOS, tokens, EOS, pad; cut to max_position_embeddings (16) with no EOS kept when longer."""
    ids = clip.tokenize(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 16) and clip.dim == 24
    np.testing.assert_array_equal(ids, GOLDEN["ids"])
    eos = clip.tokenizer.pad_id  # CLIP pads with its EOS token
    assert (ids[0, 1:] == eos).all()  # "" -> BOS, EOS, padding
    assert (ids[-1] != eos).all()  # the over-long caption lost its EOS, as in torchmetrics
    full = GOLDEN["full_ids"]  # the whole tokenisation, padded to the longest: the tokenizer itself
    np.testing.assert_array_equal(CLIPTokenizer(MODEL, length=full.shape[1])(TEXTS), full)
    assert CLIPTokenizer(MODEL, length=4)([]).shape == (0, 4)
    with pytest.raises(TypeError, match="single str"):
        clip.tokenize("a red circle")


@pytest.mark.parametrize("pooling", ["eos", "legacy"])
def test_text_features_match_hugging_face(clip, tmp_path, pooling):
    """Pooled at the first EOS, or (config eos_token_id 2, pre-#24773 checkpoints) at the largest id; a row without
    EOS (a cut caption) at position 0 in the first case and at its largest id in the second. On tokenizer output
    both agree (BOS is the largest id after EOS), so made-up ids without BOS tell them apart."""
    if pooling == "legacy":
        folder = _copy_model(tmp_path)
        _edit_json(os.path.join(folder, "config.json"), lambda c: c["text_config"].update(eos_token_id=2))
        clip = CLIP.from_pretrained(folder)
    suffix = "" if pooling == "eos" else "_legacy"
    golden = GOLDEN[f"text_features{suffix}"]
    np.testing.assert_allclose(np.asarray(clip.embed_texts(TEXTS)), unit(golden), atol=ATOL, rtol=RTOL)
    ids = np.concatenate([GOLDEN["ids"], GOLDEN["pool_ids"]])  # made-up rows where the two poolings differ
    want = np.concatenate([golden, GOLDEN[f"pool_features{suffix}"]])
    np.testing.assert_allclose(features(clip, "text", ids), want, atol=ATOL, rtol=RTOL)
    assert np.abs(GOLDEN["pool_features"][1] - GOLDEN["pool_features_legacy"][1]).max() > 0.1


def test_image_features_match_hugging_face(clip):
    pixels = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(features(clip, "image", pixels), GOLDEN["image_features"], atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="takes 32x32 images, got 30x32"):
        clip.module.image_features(jnp.zeros((1, 30, 32, 3)))


def test_preprocessing_matches_the_processor_bit_for_bit(clip):
    """uint8 images of three shapes (down, up, non-square; resize to 36, crop 32): transformers' (torchvision)
    processor's pixel values exactly; then uint8 in, embedding out, as transformers embeds its pixel values."""
    for i, (h, w) in enumerate(IMAGE_SIZES):
        image = jnp.asarray(seeded_image(i, h, w)[None])
        np.testing.assert_array_equal(np.asarray(jax.jit(clip.processing)(image)), GOLDEN[f"pixel_values_{i}"])
    embeds = clip.embed_images(seeded_image(2, *IMAGE_SIZES[2])[None])
    np.testing.assert_allclose(np.asarray(embeds), unit(GOLDEN["image_features_2"]), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        clip.embed_images(np.zeros((1, 32, 32, 3), np.float32))


def test_resize_matches_torchvision():
    """Antialiased bicubic on uint8, every value, at the scale factors CLIP preprocessing meets (256->224,
    64->224, non-square up, tall and wide down); a float resize would miss by a level on many pixels."""
    for i, ((h, w), (oh, ow)) in enumerate(RESIZE_CASES):
        image = jnp.asarray(seeded_image(100 + i, h, w)[None])
        np.testing.assert_array_equal(np.asarray(resize_uint8(image, oh, ow)[0]), GOLDEN[f"resize_{i}"])
    rounded = np.clip(
        np.round(np.asarray(jax.image.resize(image.astype(jnp.float32), (1, oh, ow, 3), "cubic"))), 0, 255
    )
    assert (rounded[0] != GOLDEN[f"resize_{i}"]).mean() > 0.01


def test_clip_score_matches_torchmetrics(clip):
    """Per-pair 100 cos and torchmetrics' clip_score, which clamps the mean at 0 (not each pair)."""
    images = np.stack([seeded_image(10 + i, 40, 40) for i in range(len(SCORE_CAPTIONS))])
    score, pairs = clip_score(clip, images, SCORE_CAPTIONS)
    np.testing.assert_allclose(pairs, GOLDEN["clip_pair_scores"], atol=1e-3, rtol=1e-3)
    assert score == pytest.approx(float(GOLDEN["clip_score"]), rel=1e-3, abs=1e-6)
    subset = GOLDEN["clip_score_subset"]
    assert pairs[subset[1]] < 0 < pairs[subset].mean()  # a negative pair in a positive mean
    want = float(GOLDEN["clip_score_of_subset"])
    assert mean_score(pairs[subset].sum(), len(subset)) == pytest.approx(want, rel=1e-3)
    assert np.maximum(pairs[subset], 0).mean() > want * 1.5  # clamping each pair would score higher
    jitted = jax.jit(pair_scores)(clip.embed_images(images), clip.embed_texts(SCORE_CAPTIONS))
    np.testing.assert_allclose(np.asarray(jitted), pairs, atol=1e-4)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(clip, images, SCORE_CAPTIONS[:2])
    with pytest.raises(ValueError, match="no pairs"):
        mean_score(0.0, 0)


def test_embeds_are_unit_vectors_compiled_once_per_shape(clip):
    """embed_* jit the pure image_embeds/text_embeds (parameters passed as an argument, so a caller can place them)
    once per input shape; the embeddings are unit vectors."""
    images = np.stack([seeded_image(i, 40, 40) for i in range(4)])  # the shapes test_clip_score compiles too
    for embed, inputs, jitted in (
        (clip.embed_images, images, clip._images),
        (clip.embed_texts, SCORE_CAPTIONS, clip._texts),
    ):
        first = np.asarray(embed(inputs))
        np.testing.assert_allclose(np.linalg.norm(first, axis=-1), 1.0, atol=1e-6)
        before = jitted._cache_size()
        np.testing.assert_allclose(np.asarray(embed(inputs[::-1])), first[::-1], rtol=0, atol=1e-6)  # per example
        assert jitted._cache_size() == before


def test_sharded_checkpoint_loads_the_same(clip, tmp_path):
    """A model.safetensors.index.json over two files (big checkpoints are sharded) gives the same parameters."""
    folder = _copy_model(tmp_path)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(folder, file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    for a, b in zip(jax.tree.leaves(CLIP.from_pretrained(folder).state), jax.tree.leaves(clip.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_defaults_and_old_sub_config_dicts(tmp_path):
    """As transformers: missing keys take CLIPTextConfig/CLIPVisionConfig defaults (openai/clip-vit-base-patch32)
    and an old checkpoint's `text_config_dict` replaces `text_config` (its keys over the defaults)."""
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        json.dump({"text_config": {"hidden_size": 512, "vocab_size": 100}, "text_config_dict": {"hidden_size": 768}}, f)
    cfg = CLIPConfig.from_json(path)
    assert (cfg.text.hidden_size, cfg.text.vocab_size, cfg.text.eos_token_id) == (768, 49408, 49407)
    assert (cfg.vision.hidden_size, cfg.vision.patch_size, cfg.vision.hidden_act, cfg.projection_dim) == (
        768, 32, "quick_gelu", 512
    )  # fmt: skip


def test_missing_and_misshaped_inputs_are_named(tmp_path):
    folder = _copy_model(tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json: CLIP config.json not found"):
        CLIP.from_pretrained(folder)
    folder = _copy_model(tmp_path, "b")
    os.remove(os.path.join(folder, "processor_config.json"))
    with pytest.raises(FileNotFoundError, match="no CLIP image processor settings"):
        CLIP.from_pretrained(folder)
    folder = _copy_model(tmp_path, "c")
    os.remove(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer in the CLIP folder"):
        CLIP.from_pretrained(folder)
    folder = _copy_model(tmp_path, "d")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        CLIP.from_pretrained(folder)

    folder = _copy_model(tmp_path, "e")
    config = os.path.join(folder, "config.json")
    _edit_json(config, lambda c: c["vision_config"].update(hidden_act="mish"))
    with pytest.raises(WeightsError, match="unsupported vision_config hidden_act 'mish'"):
        CLIP.from_pretrained(folder)
    _edit_json(config, lambda c: c["vision_config"].update(hidden_act="gelu", image_size=64))
    with pytest.raises(WeightsError, match="crops 32x32 images but the image tower takes 64x64"):
        CLIP.from_pretrained(folder)
    _edit_json(config, lambda c: c["vision_config"].update(image_size=32, patch_size=4))
    with pytest.raises(WeightsError, match=r"'vision_model.embeddings.patch_embedding.weight' has shape .48, 3, 8, 8."):
        CLIP.from_pretrained(folder)
    _edit_json(config, lambda c: c["vision_config"].update(patch_size=8) or c["text_config"].update(eos_token_id=[1]))
    with pytest.raises(WeightsError, match="text_config 'eos_token_id' is .1., expected a positive integer"):
        CLIP.from_pretrained(folder)
    _edit_json(config, lambda c: c["text_config"].update(eos_token_id=599))

    weights = os.path.join(folder, "model.safetensors")
    tensors = load_file(weights)
    missing = "text_model.encoder.layers.1.mlp.fc2.bias"
    save_file({k: v for k, v in tensors.items() if k != missing}, weights)
    with pytest.raises(WeightsError, match=f"model.safetensors: missing tensor '{missing}'"):
        CLIP.from_pretrained(folder)
    save_file({**tensors, "text_projection.weight": tensors["text_projection.weight"].T.copy()}, weights)
    with pytest.raises(WeightsError, match=r"'text_projection.weight' has shape \(32, 24\), expected \(24, 32\)"):
        CLIP.from_pretrained(folder)

    processor = os.path.join(folder, "processor_config.json")
    _edit_json(processor, lambda c: c["image_processor"].update(resample=2))
    with pytest.raises(WeightsError, match="'resample' is 2; only bicubic"):
        ImageProcessing.from_folder(folder)
    _edit_json(processor, lambda c: c["image_processor"].update(resample=3, crop_size={"height": 40, "width": 32}))
    with pytest.raises(WeightsError, match="larger than the resized shortest edge 36"):
        ImageProcessing.from_folder(folder)


def test_make_tiny_clip_loads_as_transformers_loads_it(tmp_path):
    """A make_tiny_clip folder (same seed and captions as the fixture script) gives transformers' ids and features:
    tokenizer.json, config.json, preprocessor_config.json and tensor names all read as transformers reads them."""
    folder = make_tiny_clip(str(tmp_path / "tiny"), seed=3, captions=TRAIN_CAPTIONS)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(folder))
    clip = CLIP.from_pretrained(folder)
    ids = clip.tokenize(TINY_TEXTS)
    want = GOLDEN["tiny_ids"]  # transformers pads to the longest row, torchmetrics-style; we pad to 77
    assert ids.shape == (2, 77) and (ids[:, want.shape[1] :] == clip.tokenizer.pad_id).all()
    np.testing.assert_array_equal(ids[:, : want.shape[1]], want)
    assert (ids[:, 1:5] < 512).sum() < 8  # merges learnt from the captions: whole words, not only bytes
    texts = np.asarray(clip.embed_texts(TINY_TEXTS))
    np.testing.assert_allclose(texts, unit(GOLDEN["tiny_text_features"]), atol=ATOL, rtol=RTOL)
    images = np.asarray(clip.embed_images(seeded_image(20, 50, 40)[None]))
    np.testing.assert_allclose(images, unit(GOLDEN["tiny_image_features"]), atol=ATOL, rtol=RTOL)
    plain = CLIP.from_pretrained(make_tiny_clip(str(tmp_path / "bytes"), seed=0, max_position_embeddings=8))
    ids = plain.tokenize(["hi there", "a much longer caption than eight tokens"])
    assert ids.shape == (2, 8) and ids[0, 1:3].tolist() == [ord("h") - 33, ord("i") - 33 + 256]  # byte level
