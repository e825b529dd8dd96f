"""A tiny random T5 checkpoint folder, in Hugging Face's layout, for demos and tests.

No model hub is reachable here, so the demo trains a SentencePiece model on its own captions and
writes random weights under the tensor names transformers uses. The folder loads through
`T5Encoder.from_pretrained` exactly like a real checkpoint (and through transformers too).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

from imagen_jax.text.tokenizer import NUM_EXTRA_IDS


def _train_sentencepiece(captions: list[str], vocab_size: int) -> bytes:
    """Unigram model (as T5's) with T5's special ids (pad 0, eos 1, unk 2, no bos).

    On a small, repetitive caption set the unigram trainer finds too few seed pieces and stops at ~35
    nearly character-level pieces; adding seeded random sequences of the captions' words gives it the
    variety to keep whole words, so a caption is a handful of tokens. `vocab_size` is an upper bound:
    the trainer's soft limit (hard_vocab_limit=False) settles for what the text allows.
    """
    texts = [c for c in captions if c.strip()]
    if not texts:
        raise ValueError("make_tiny_t5 needs at least one non-empty caption to train a tokenizer")
    words = sorted({word for text in texts for word in text.split()})
    rng = np.random.default_rng(0)
    texts += [" ".join(rng.choice(words, size=rng.integers(2, 9))) for _ in range(3000)]
    required = len({ch for text in texts for ch in text if not ch.isspace()}) + 4  # chars, ▁, specials
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="unigram",
        vocab_size=max(vocab_size, required),
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _random_weights(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random encoder tensors ([out, in] like torch Linear) with transformers' T5 init scales."""
    d, h, kv, ff = cfg["d_model"], cfg["num_heads"], cfg["d_kv"], cfg["d_ff"]

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    embed = normal((cfg["vocab_size"], d), 1.0)
    tensors = {
        "shared.weight": embed,
        "encoder.embed_tokens.weight": embed.copy(),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": normal(
            (cfg["relative_attention_num_buckets"], h), d**-0.5
        ),
        "encoder.final_layer_norm.weight": np.ones(d, np.float32),
    }
    ffn_in = ("wi_0", "wi_1") if cfg["feed_forward_proj"].startswith("gated-") else ("wi",)
    for i in range(cfg["num_layers"]):
        layer = f"encoder.block.{i}.layer"
        tensors[f"{layer}.0.SelfAttention.q.weight"] = normal((h * kv, d), (d * kv) ** -0.5)
        tensors[f"{layer}.0.SelfAttention.k.weight"] = normal((h * kv, d), d**-0.5)
        tensors[f"{layer}.0.SelfAttention.v.weight"] = normal((h * kv, d), d**-0.5)
        tensors[f"{layer}.0.SelfAttention.o.weight"] = normal((d, h * kv), (h * kv) ** -0.5)
        tensors[f"{layer}.0.layer_norm.weight"] = np.ones(d, np.float32)
        for name in ffn_in:
            tensors[f"{layer}.1.DenseReluDense.{name}.weight"] = normal((ff, d), d**-0.5)
        tensors[f"{layer}.1.DenseReluDense.wo.weight"] = normal((d, ff), ff**-0.5)
        tensors[f"{layer}.1.layer_norm.weight"] = np.ones(d, np.float32)
    return tensors


def make_tiny_t5(
    folder: str,
    captions: list[str],
    *,
    vocab_size: int = 256,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 16,
    d_ff: int = 128,
    feed_forward_proj: str = "gated-gelu",
    seed: int = 0,
) -> str:
    """Writes spiece.model, config.json, tokenizer_config.json and model.safetensors; returns folder.

    `vocab_size` caps the SentencePiece vocabulary; the model's vocabulary is the trained pieces
    plus T5's 100 sentinel ids, as in real T5 checkpoints.
    """
    os.makedirs(folder, exist_ok=True)
    model_proto = _train_sentencepiece(captions, vocab_size)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model_proto)
    pieces = spm.SentencePieceProcessor(model_proto=model_proto).get_piece_size()
    cfg = {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": pieces + NUM_EXTRA_IDS,
        "d_model": d_model,
        "d_kv": d_kv,
        "d_ff": d_ff,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": feed_forward_proj,
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": False,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tokenizer_cfg = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": NUM_EXTRA_IDS,
        "model_max_length": 512,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_cfg, f, indent=2)
    weights = _random_weights(cfg, np.random.default_rng(seed))
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder
