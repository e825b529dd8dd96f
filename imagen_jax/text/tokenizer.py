"""T5 tokenizer on SentencePiece that reproduces Hugging Face's T5Tokenizer.

Hugging Face (transformers 5) does not run SentencePiece's own encoder: it cuts special tokens
(`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) out of the raw text, splits the rest on Unicode
whitespace, prefixes every word with "▁" and segments each word with the same unigram model.
This module follows that recipe with the `sentencepiece` package so ids match exactly, then
truncates to `max_length - 1`, appends EOS and pads, as `padding="max_length", truncation=True`
does.
"""

from __future__ import annotations

import os
import re
import unicodedata

import numpy as np
import sentencepiece as spm

from imagen_jax.errors import MissingError, WeightsError

PAD_ID = 0
EOS_ID = 1
NUM_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, placed after the SentencePiece vocab.

# Rust's char::is_whitespace set, which the `tokenizers` WhitespaceSplit pre-tokenizer uses
# (Python's str.split would also split on \x1c-\x1f).
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def _extends_grapheme(ch: str) -> bool:
    """Characters that join the preceding one into a grapheme cluster (marks, ZWJ, skin tones)."""
    return unicodedata.category(ch) in ("Mn", "Me", "Mc") or ch == "\u200d" or 0x1F3FB <= ord(ch) <= 0x1F3FF


def _is_control(ch: str) -> bool:
    """Grapheme_Cluster_Break=Control: such a character never takes marks into its cluster."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cf") and ch not in "\u200c\u200d"


class Tokenizer:
    """Callable tokenizer: texts -> (ids int32 [B, L], mask bool [B, L]), padded to `max_length`."""

    def __init__(self, folder: str) -> None:
        path = os.path.join(folder, "spiece.model")
        if not os.path.isfile(path):
            raise MissingError(f"{path}: no SentencePiece model (spiece.model) in the T5 folder")
        self.sp = spm.SentencePieceProcessor(model_file=path)
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID:
            raise WeightsError(
                f"{path}: T5 needs pad id {PAD_ID} and eos id {EOS_ID}, "
                f"got pad {self.sp.pad_id()} and eos {self.sp.eos_id()}"
            )
        # Hugging Face always prefixes words with "▁"; add it ourselves if the model does not.
        dummy_prefix = spm.SentencePieceNormalizer(model_file=path).Normalize("a").startswith("▁")
        self._prefix = "" if dummy_prefix else "▁"
        # The model's character map alone (Hugging Face's `Precompiled` normalizer), applied before
        # splitting on whitespace: it deletes control characters and maps some to spaces.
        self._charsmap = spm.SentencePieceNormalizer(
            model_file=path, add_dummy_prefix=False, escape_whitespaces=False, remove_extra_whitespaces=False
        )
        n = self.sp.get_piece_size()
        specials = {self.sp.id_to_piece(i): i for i in (PAD_ID, EOS_ID, self.sp.unk_id())}
        specials.update({f"<extra_id_{i}>": n + NUM_EXTRA_IDS - 1 - i for i in range(NUM_EXTRA_IDS)})
        self._special_ids = specials
        alternatives = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    def token_ids(self, text: str) -> list[int]:
        """Ids of one text without EOS, truncation or padding."""
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # odd parts are the separators the split kept: special tokens
                ids.append(self._special_ids[part])
                continue
            normalized = self._charsmap.Normalize(self._drop_marks_after_rewritten(part))
            for word in _WHITESPACE.split(normalized):
                if word:
                    ids.extend(self.sp.encode(self._prefix + word))
        return ids

    def _drop_marks_after_rewritten(self, text: str) -> str:
        """Reproduce a quirk of `tokenizers`' Precompiled normalizer: a grapheme shorter than 6
        UTF-8 bytes whose first character the character map rewrites is replaced whole, so the
        combining marks after that character vanish (e.g. NBSP + U+0301 -> a space)."""
        out = []
        i = 0
        while i < len(text):
            j = i + 1
            while j < len(text) and not _is_control(text[i]) and _extends_grapheme(text[j]):
                j += 1
            cluster = text[i:j]
            short = len(cluster.encode("utf-8")) < 6
            rewritten = j > i + 1 and short and self._charsmap.Normalize(text[i]) != text[i]
            out.append(text[i] if rewritten else cluster)
            i = j
        return "".join(out)

    def __call__(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize, truncate to `max_length - 1` tokens, append EOS and pad with id 0."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str")
        ids = np.full((len(texts), max_length), PAD_ID, np.int32)
        mask = np.zeros((len(texts), max_length), np.bool_)
        for row, text in enumerate(texts):
            tokens = self.token_ids(text)[: max_length - 1] + [EOS_ID]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return ids, mask
