"""T5 tokenizer: Hugging Face's own fast tokenizer (the Rust `tokenizers` library, through transformers'
`T5Tokenizer`), so ids are transformers' by construction rather than by emulation.

The folder's `tokenizer.json` is used when present; otherwise transformers converts `spiece.model` (that
conversion reads the SentencePiece protobuf, hence the `sentencepiece` and `protobuf` dependencies). Only the
folder is read, never the Hugging Face hub, and torch is never imported. A URL folder's (gs://...) tokenizer
files are copied to the local cache first (filesystem.local_copy), as transformers reads local files. Calls return
`padding="max_length", truncation=True` ids: at most `max_length - 1` tokens, EOS, then pad id 0. The Rust
encoder releases the GIL, so a background thread can tokenise while another thread runs.

Fast vs slow: transformers 5's sentencepiece-backed tokenizer (`SentencePieceBackend`, legacy: transformers
4's T5Tokenizer) runs SentencePiece's own normaliser where the fast one applies the model's character map, splits
on Unicode whitespace and puts "▁" before each word. They agree on the golden texts, on the special tokens and
on 6,000 random strings of hard characters (NBSP, U+3000, U+2028, \x1c, ZWSP, soft hyphen, BOM, ligatures,
emoji, Hangul) and differ only (tests/test_t5.py, test_fast_and_slow_tokenizers_differ_only_where_known) for:
- U+0085 (NEL): whitespace to the fast tokenizer, an unknown character to the slow one;
- a grapheme cluster (a character + combining marks, ZWJ or skin tone): under 6 UTF-8 bytes, when the map
  rewrites its first character (NBSP, U+3000, "ﬁ", "①"), the fast tokenizer keeps that rewrite alone and drops
  the marks, which the slow one keeps (an <unk>); from 6 bytes on, the fast tokenizer maps each character alone,
  so a letter + 3 accents is not composed as the slow one composes it.
The goldens come from the fast tokenizer, which is what transformers users get.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tokenizers

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError

PAD_ID = 0
EOS_ID = 1
NUM_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, placed after the SentencePiece vocab.
VOCAB_FILES = ("tokenizer.json", "spiece.model")  # either suffices; tokenizer.json is used first
TOKENIZER_FILES = (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """Callable tokenizer: texts -> (ids int32 [B, L], mask bool [B, L]), padded to `max_length`."""

    def __init__(self, folder: str, *, lowercase: bool = False) -> None:
        """`lowercase`: each text is lower-cased and stripped first (DeepFloyd IF's prompt preprocessing when its
        caption cleaner's optional packages are absent, which is what its models see from diffusers by default)."""
        self.lowercase = lowercase
        fs = filesystem.for_path(folder)
        present = [os.path.join(folder, name) for name in TOKENIZER_FILES if fs.exists(os.path.join(folder, name))]
        if not any(os.path.basename(path) in VOCAB_FILES for path in present):
            # transformers would build a tokenizer with an empty vocabulary from a folder without either
            raise MissingError(f"{folder}: no tokenizer in the T5 folder (looked for {', '.join(VOCAB_FILES)})")
        local = os.path.dirname(filesystem.local_copy(present[0]))  # the URL folder's files share one local one
        for path in present[1:]:
            filesystem.local_copy(path)
        # transformers warns at import that PyTorch is missing; tokenizers need no torch.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import T5Tokenizer  # here, not at module level: importing transformers takes ~1 s

        hf = T5Tokenizer.from_pretrained(local, local_files_only=True)
        if hf.pad_token_id != PAD_ID or hf.eos_token_id != EOS_ID:
            raise WeightsError(
                f"{folder}: T5 needs pad id {PAD_ID} and eos id {EOS_ID}, "
                f"got pad {hf.pad_token_id} and eos {hf.eos_token_id}"
            )
        # transformers' call sets truncation and padding on its one Rust tokenizer before encoding, so calls from
        # two threads with different lengths could mix. Instead each length gets its own copy, configured as
        # transformers would (`padding="max_length", truncation=True`), whose calls hold the GIL only to copy ids.
        self._json, self._pad_token = hf.backend_tokenizer.to_str(), hf.pad_token
        self._by_length: dict[int, tokenizers.Tokenizer] = {}
        self._lock = threading.Lock()

    def _for_length(self, max_length: int) -> tokenizers.Tokenizer:
        with self._lock:
            if max_length not in self._by_length:
                tok = tokenizers.Tokenizer.from_str(self._json)
                tok.enable_truncation(max_length, strategy="longest_first", direction="right")
                tok.enable_padding(direction="right", pad_id=PAD_ID, pad_token=self._pad_token, length=max_length)
                self._by_length[max_length] = tok
            return self._by_length[max_length]

    def __call__(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize, truncate to `max_length - 1` tokens, append EOS and pad with id 0."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str")
        texts = [text.lower().strip() for text in texts] if self.lowercase else list(texts)
        encodings = self._for_length(max_length).encode_batch(texts)  # releases the GIL while it encodes
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), max_length)
        mask = np.array([e.attention_mask for e in encodings], np.bool_).reshape(len(texts), max_length)
        return ids, mask
