"""CLIP tokenizer: Hugging Face's own fast tokenizer (transformers' `CLIPTokenizer`, the Rust `tokenizers` core)
read from the model folder, giving the ids torchmetrics' CLIPScore feeds the text tower. No torch, no hub.

torchmetrics calls the processor with `padding=True` and no truncation, then keeps the first
`max_position_embeddings` ids of every row. A caption of more than `max_position_embeddings - 2` tokens therefore
loses its end-of-text token (and the text tower pools elsewhere, eval/clip.py); that is reproduced here, not
fixed, so that scores stay comparable with torchmetrics'. Rows are padded with the tokenizer's pad id to
`max_position_embeddings` (torchmetrics pads to the batch's longest row; the causal tower makes that invisible).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tokenizers

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class CLIPTokenizer:
    """Callable: texts -> int32 ids [B, length]: BOS, the text's tokens, EOS, cut to `length`, then pad ids."""

    def __init__(self, folder: str, length: int) -> None:
        fs = filesystem.for_path(folder)
        present = [name for name in TOKENIZER_FILES if fs.exists(os.path.join(folder, name))]
        if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= set(present):
            raise MissingError(
                f"{folder}: no tokenizer in the CLIP folder (looked for tokenizer.json, or vocab.json and merges.txt)"
            )
        local = os.path.dirname(filesystem.local_copy(os.path.join(folder, present[0])))
        for name in present[1:]:
            filesystem.local_copy(os.path.join(folder, name))
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import CLIPTokenizer as HFCLIPTokenizer  # here: importing transformers takes ~1 s

        hf = HFCLIPTokenizer.from_pretrained(local, local_files_only=True)
        if hf.pad_token_id is None:
            raise WeightsError(f"{folder}: the CLIP tokenizer has no pad token")
        self.pad_id = int(hf.pad_token_id)
        self.length = length
        # A private copy without padding or truncation: calls never change its settings, so threads may share it.
        self._tokenizer = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str")
        ids = np.full((len(texts), self.length), self.pad_id, np.int32)
        for row, encoding in zip(ids, self._tokenizer.encode_batch(list(texts))):  # releases the GIL
            kept = encoding.ids[: self.length]
            row[: len(kept)] = kept
        return ids
