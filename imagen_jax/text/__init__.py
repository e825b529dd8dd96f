"""Frozen T5 text encoder: Hugging Face checkpoints in Flax NNX, with a matching tokenizer."""

from imagen_jax import flax_settings  # noqa: F401  (before any variable is built)
from imagen_jax.text.t5 import T5Config, T5Encoder, T5EncoderModule
from imagen_jax.text.tiny import make_tiny_t5
from imagen_jax.text.tokenizer import Tokenizer

__all__ = ["T5Config", "T5Encoder", "T5EncoderModule", "Tokenizer", "make_tiny_t5"]
