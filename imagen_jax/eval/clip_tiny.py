"""A tiny random CLIP folder in Hugging Face's CLIPModel layout, for demos and CI (no hub is reachable).

Writes config.json, model.safetensors (random weights at transformers' initialisation scales),
preprocessor_config.json (CLIP's preprocessing at the tiny image size) and the tokenizer files transformers saves
for a CLIP byte-level BPE trained on the given captions. The folder loads through `CLIP.from_pretrained` and
through transformers' `CLIPModel` / `CLIPProcessor` alike. Imports neither JAX nor torch, so the fixture script
(tests/fixtures/make_clip_fixtures.py) reuses `train_clip_bpe` from the reference environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from safetensors.numpy import save_file

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# transformers' CLIPTokenizer normaliser and pre-tokeniser (NFC, whitespace runs to one space, lower case; words,
# single digits, punctuation runs, English contractions), so trained merges fit what the tokenizer will split.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_bpe(captions: Sequence[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) laid out as OpenAI's CLIP vocabulary: the 256 byte symbols, the same with "</w>" (end of
    word), one token per merge in merge order, then <|startoftext|> and <|endoftext|> (the largest ids, as the
    text tower's legacy pooling expects). Every byte sequence is covered, so no text maps to the unknown token."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # by code point: GPT-2's bytes_to_unicode order
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + num_merges,
        min_frequency=2,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(captions), trainer)
    merges = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]][:num_merges]
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _random_weights(text: dict, vision: dict, projection_dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random tensors ([out, in] like torch Linear) at transformers' CLIP initialisation scales."""

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {"logit_scale": np.array(2.6592, np.float32)}
    d_text, d_vision = text["hidden_size"], vision["hidden_size"]
    grid = vision["image_size"] // vision["patch_size"]
    p = vision["patch_size"]
    tensors |= {
        "text_model.embeddings.token_embedding.weight": normal((text["vocab_size"], d_text), 0.02),
        "text_model.embeddings.position_embedding.weight": normal((text["max_position_embeddings"], d_text), 0.02),
        "vision_model.embeddings.class_embedding": normal((d_vision,), d_vision**-0.5),
        "vision_model.embeddings.patch_embedding.weight": normal((d_vision, 3, p, p), 0.02),
        "vision_model.embeddings.position_embedding.weight": normal((grid * grid + 1, d_vision), 0.02),
        "text_projection.weight": normal((projection_dim, d_text), d_text**-0.5),
        "visual_projection.weight": normal((projection_dim, d_vision), d_vision**-0.5),
    }
    norms = ["text_model.final_layer_norm", "vision_model.pre_layrnorm", "vision_model.post_layernorm"]
    for prefix, cfg in (("text_model", text), ("vision_model", vision)):
        d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        for i in range(layers):
            layer = f"{prefix}.encoder.layers.{i}"
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                std = d**-0.5 if name == "out_proj" else d**-0.5 * (2 * layers) ** -0.5
                tensors[f"{layer}.self_attn.{name}.weight"] = normal((d, d), std)
                tensors[f"{layer}.self_attn.{name}.bias"] = np.zeros(d, np.float32)
            tensors[f"{layer}.mlp.fc1.weight"] = normal((ff, d), (2 * d) ** -0.5)
            tensors[f"{layer}.mlp.fc1.bias"] = np.zeros(ff, np.float32)
            tensors[f"{layer}.mlp.fc2.weight"] = normal((d, ff), d**-0.5 * (2 * layers) ** -0.5)
            tensors[f"{layer}.mlp.fc2.bias"] = np.zeros(d, np.float32)
            norms += [f"{layer}.layer_norm1", f"{layer}.layer_norm2"]
    for norm in norms:
        d = d_text if norm.startswith("text_model") else d_vision
        tensors[f"{norm}.weight"] = np.ones(d, np.float32)
        tensors[f"{norm}.bias"] = np.zeros(d, np.float32)
    return tensors


def make_tiny_clip(
    folder: str,
    seed: int = 0,
    captions: Sequence[str] = (),
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 77,
    projection_dim: int = 32,
    num_merges: int = 256,
    hidden_act: str = "quick_gelu",
) -> str:
    """Writes a random CLIPModel folder (both towers `hidden_size` wide, `num_layers` deep) and returns `folder`.

    The tokenizer's merges are learnt from `captions` (at most `num_merges`; none without captions, which leaves
    a byte-level tokenizer); captions reach `max_position_embeddings` tokens like real CLIP's 77.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import CLIPTokenizer  # here: importing transformers takes ~1 s

    os.makedirs(folder, exist_ok=True)
    vocab, merges = train_clip_bpe(captions, num_merges)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_position_embeddings)
    tokenizer.save_pretrained(folder)
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
    }
    text = {
        **tower,
        "model_type": "clip_text_model",
        "vocab_size": len(vocab),
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
    }
    vision = {**tower, "model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size}
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": projection_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": text,
        "vision_config": vision,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,  # with CLIPImageProcessor's default (OpenAI's) mean and std
        "do_convert_rgb": True,
    }
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    weights = _random_weights(text, vision, projection_dim, np.random.default_rng(seed))
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder
