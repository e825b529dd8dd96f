"""Frozen T5 encoder in Flax NNX, loaded from Hugging Face checkpoints without torch.

Covers T5 v1.0 (ReLU feed-forward) and v1.1 / FLAN-T5 (gated GELU). The math follows Hugging
Face's `T5EncoderModel`: RMS layer norm without mean or bias (variance in float32), unscaled
dot-product attention, a bucketed relative position bias owned by the first layer and shared by
all layers, and a final layer norm. Inference only: no dropout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError
from imagen_jax.flax_settings import init_rngs
from imagen_jax.parallel import activations
from imagen_jax.parallel.activations import constrain
from imagen_jax.text import regions
from imagen_jax.text.tokenizer import VOCAB_FILES, Tokenizer
from imagen_jax.text.weight_files import WeightFolder

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a Hugging Face T5 config.json that the encoder uses."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self) -> None:
        _activation_name(self.feed_forward_proj)  # fail at load time, naming the bad value

    @classmethod
    def from_json(cls, path: str) -> T5Config:
        """Reads config.json, local or at a URL; the size fields are required, the rest default as in transformers."""
        fs = filesystem.for_path(path)
        if not fs.exists(path) or fs.isdir(path):
            raise MissingError(f"{path}: T5 config.json not found")
        try:
            with fs.GFile(path, "rb") as f:
                raw = json.loads(f.read())
        except (*fs.errors, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: T5 config.json cannot be read as JSON: {e}") from None
        if not isinstance(raw, dict):
            raise WeightsError(f"{path}: T5 config.json is not a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, field in fields.items():
            if field.default is dataclasses.MISSING and name not in raw:
                raise WeightsError(f"{path}: missing key '{name}'")
        return cls(**{k: v for k, v in raw.items() if k in fields})

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        return _ACTIVATIONS[_activation_name(self.feed_forward_proj)]


def _activation_name(feed_forward_proj: str) -> str:
    """Maps "ACT" or "gated-ACT" to ACT; as in transformers, "gated-gelu" is the tanh GELU."""
    if feed_forward_proj == "gated-gelu":
        return "gelu_new"
    name = feed_forward_proj.removeprefix("gated-")
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"unsupported feed_forward_proj '{feed_forward_proj}' "
            f"(expected ACT or gated-ACT, ACT in {sorted(_ACTIVATIONS)})"
        )
    return name


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query) for a length x length attention, int32 [L, L].

    Half of the buckets hold keys after the query. Within a half, distances below a quarter of the
    buckets are exact, larger ones are log-spaced up to `max_distance` and clamped beyond it.
    Computed in float32 like transformers so the bucket boundaries agree exactly.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int32) * half
    distance = np.abs(relative)
    max_exact = half // 2
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int32), half - 1)
    return buckets + np.where(distance < max_exact, distance, large).astype(np.int32)


def _param(shape: Sequence[int], names: tuple[str, ...], dtype: DTypeLike, init: jax.Array | None) -> nnx.Param:
    """A parameter with logical axis names; sharded later by the caller's rules, not eagerly."""
    value = jnp.ones(shape, dtype) if init is None else init.astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """T5 layer norm: scale * x / rms(x); no mean subtraction, no bias, variance in float32."""

    def __init__(self, dim: int, eps: float, dtype: DTypeLike) -> None:
        self.scale = _param((dim,), ("embed",), dtype, None)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return self.scale[...] * (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)


class Dense(nnx.Module):
    """Bias-free projection with kernel [in, out] (Hugging Face stores [out, in])."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], dtype: DTypeLike, rngs: nnx.Rngs) -> None:
        init = jax.random.normal(rngs.params(), (d_in, d_out)) / math.sqrt(d_in)
        self.kernel = _param((d_in, d_out), names, dtype, init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...]


class T5Block(nnx.Module):
    """Pre-norm self-attention and feed-forward sublayers with residual connections."""

    def __init__(self, cfg: T5Config, dtype: DTypeLike, rngs: nnx.Rngs) -> None:
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.dtype = dtype
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.q = Dense(cfg.d_model, inner, ("embed", "heads_x_dim"), dtype, rngs)
        self.k = Dense(cfg.d_model, inner, ("embed", "heads_x_dim"), dtype, rngs)
        self.v = Dense(cfg.d_model, inner, ("embed", "heads_x_dim"), dtype, rngs)
        self.o = Dense(inner, cfg.d_model, ("heads_x_dim", "embed"), dtype, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        if cfg.is_gated:
            self.wi_0 = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), dtype, rngs)
            self.wi_1 = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), dtype, rngs)
        else:
            self.wi = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), dtype, rngs)
        self.wo = Dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), dtype, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: [B, L, D]; bias: float32 [B or 1, H, L, L] position bias plus mask."""
        b, length, _ = x.shape
        heads = (b, length, self.cfg.num_heads, self.cfg.d_kv)
        h = self.attn_norm(x)
        q, k, v = (constrain(proj(h).reshape(heads), inner=2) for proj in (self.q, self.k, self.v))
        # T5 folds 1/sqrt(d_kv) into the q initialisation: no scaling here. Softmax in float32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attended = constrain(jnp.einsum("bhqk,bkhd->bqhd", weights, v), inner=2).reshape(b, length, -1)
        x = constrain(x + self.o(attended))
        h = self.ffn_norm(x)
        if self.cfg.is_gated:
            hidden = self.cfg.activation(self.wi_0(h)) * self.wi_1(h)
        else:
            hidden = self.cfg.activation(self.wi(h))
        return constrain(x + self.wo(constrain(hidden, inner=-1)))


class T5EncoderModule(nnx.Module):
    """Token embedding, T5 blocks sharing one relative position bias, final layer norm."""

    def __init__(self, cfg: T5Config, *, dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.dtype = dtype
        embed = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
        self.embed = _param((cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, embed)
        bias = jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads))
        self.relative_bias = _param(bias.shape, ("relpos_buckets", "heads"), dtype, bias)
        self.blocks = nnx.List([T5Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids int [B, L], attention_mask bool/int [B, L] -> hidden states [B, L, d_model]."""
        length = input_ids.shape[1]
        x = constrain(jnp.take(self.embed[...], input_ids, axis=0))
        buckets = relative_position_buckets(
            length, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance
        )
        position_bias = jnp.take(self.relative_bias[...], buckets, axis=0).transpose(2, 0, 1)[None]
        key_mask = jnp.asarray(attention_mask, jnp.bool_)[:, None, None, :]
        bias = position_bias.astype(jnp.float32) + jnp.where(key_mask, 0.0, jnp.finfo(jnp.float32).min)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)


def hf_tensor_names(cfg: T5Config) -> dict[tuple, tuple[str, bool]]:
    """Maps each parameter path of T5EncoderModule to (Hugging Face tensor name, transpose?)."""
    names: dict[tuple, tuple[str, bool]] = {
        ("embed",): ("encoder.embed_tokens.weight", False),
        ("relative_bias",): ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
        ("final_norm", "scale"): ("encoder.final_layer_norm.weight", False),
    }
    ffn = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    for i in range(cfg.num_layers):
        prefix = f"encoder.block.{i}.layer"
        names[("blocks", i, "attn_norm", "scale")] = (f"{prefix}.0.layer_norm.weight", False)
        names[("blocks", i, "ffn_norm", "scale")] = (f"{prefix}.1.layer_norm.weight", False)
        for proj in ("q", "k", "v", "o"):
            names[("blocks", i, proj, "kernel")] = (f"{prefix}.0.SelfAttention.{proj}.weight", True)
        for proj in ffn:
            names[("blocks", i, proj, "kernel")] = (f"{prefix}.1.DenseReluDense.{proj}.weight", True)
    return names


def stored_name(key: str, reader: WeightFolder) -> str:
    """The name a checkpoint stores tensor `key` under: seq2seq checkpoints tie the encoder embedding to `shared`."""
    return "shared.weight" if key == "encoder.embed_tokens.weight" and key not in reader else key


def _load_params(
    folder: str, cfg: T5Config, abstract: nnx.State, dtype: DTypeLike, shardings: nnx.State | None
) -> tuple[list[tuple], tuple[int, int]]:
    """(path, Param with the checkpoint's value) for every parameter of the module, each placed in its sharding
    (when given) as soon as it is read, and (bytes read, bytes the tensors have in the files). A process reads
    from the files only the box of each tensor that its own devices' slices cover (regions.host_region: on a pod
    host, a few slices of each, not the checkpoint) and drops it before the next tensor is read."""
    names = hf_tensor_names(cfg)
    where = {} if shardings is None else {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}
    stored, params = 0, []
    with contextlib.ExitStack() as stack:
        reader = WeightFolder(folder, stack)
        for path, variable in nnx.to_flat_state(abstract):
            key, transpose = names[path]
            key = stored_name(key, reader)
            shape = reader.shape(key)
            if (shape[::-1] if transpose else shape) != variable.shape:
                raise WeightsError(f"{reader.source}: tensor '{key}' has shape {shape}, expected {variable.shape}")
            region = regions.whole(variable.shape)
            if path in where:
                slices = where[path].addressable_devices_indices_map(variable.shape).values()
                region = regions.host_region(slices, variable.shape)
            array = reader.get(key, region[::-1] if transpose else region)
            stored += math.prod(shape) * array.dtype.itemsize
            array = (array.T if transpose else array).astype(jnp.dtype(dtype), copy=False)
            if path in where:
                local = lambda index, a=array, r=region, n=variable.shape: a[regions.local_index(index, r, n)]  # noqa: E731
                placed = jax.make_array_from_callback(variable.shape, where[path], local)
            else:
                placed = jnp.asarray(array)
            del array
            params.append((path, variable.replace(placed)))
        return params, (reader.bytes_read, stored)


def tokenizer_folder(path: str) -> str:
    """Where the tokenizer of the T5 folder `path` lives: `path` itself, unless it has none of the tokenizer's
    vocabulary files and a diffusers pipeline's sibling `tokenizer/` folder has them."""
    fs = filesystem.for_path(path)
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer")
    has_vocab = lambda folder: any(fs.exists(os.path.join(folder, n)) for n in VOCAB_FILES)  # noqa: E731
    return sibling if not has_vocab(path) and has_vocab(sibling) else path


class T5Encoder:
    """Frozen T5 text encoder: tokenizer + NNX module + a jitted pure forward.

    Separate from anything trained: its state is never handed to an optimizer, and `encode`
    applies `stop_gradient`, so callers may treat the embeddings as constants.
    """

    def __init__(self, module: T5EncoderModule, tokenizer: Tokenizer | None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.graphdef, self.state = nnx.split(module)
        self._forward = activations.jit(self.apply)
        self.bytes_read = self.bytes_stored = 0  # weight bytes this process read, of those in the files

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: DTypeLike = jnp.float32,
        place: Callable[[nnx.State], nnx.State] | None = None,
        *,
        lowercase: bool = False,
    ) -> T5Encoder:
        """Loads a Hugging Face T5 folder (config.json, spiece.model or tokenizer.json, and safetensors or
        pytorch_model.bin weights, single or sharded: text/weight_files.py), local or at a URL (gs://...): a URL
        folder's tokenizer files and the weight files the encoder reads are copied to a local cache once
        (filesystem.local_copy), since safetensors and transformers read local files.

        Reads only the encoder tensors, one at a time: a full T5ForConditionalGeneration checkpoint works and
        its decoder and lm_head are never touched. `dtype` is the parameter and compute dtype. `place` maps
        the abstract state to each parameter's sharding; each tensor then goes straight to its devices as it
        is read (host memory holds about one tensor, never the model, and no whole copy lands on a device).
        The tokenizer comes from the same folder or, in a diffusers pipeline's `text_encoder/` (DeepFloyd IF's),
        from its sibling `tokenizer/` (`tokenizer_folder`); `lowercase`: see `Tokenizer`.
        """
        cfg = T5Config.from_json(os.path.join(path, "config.json"))
        tokenizer = Tokenizer(tokenizer_folder(path), lowercase=lowercase)
        abstract = nnx.eval_shape(lambda: T5EncoderModule(cfg, dtype=dtype, rngs=init_rngs(0)))
        graphdef, state = nnx.split(abstract)
        shardings = None if place is None else place(state)
        params, (read, stored) = _load_params(path, cfg, state, dtype, shardings)
        encoder = cls(nnx.merge(graphdef, nnx.from_flat_state(params)), tokenizer)
        encoder.bytes_read, encoder.bytes_stored = read, stored
        return encoder

    @classmethod
    def abstract(cls, config_json: str, dtype: DTypeLike = jnp.float32) -> T5Encoder:
        """The encoder's structure and parameter shapes from a config.json alone (no weights, no tokenizer):
        what ahead-of-time compiles (tools.plan) lower against. Its `state` holds ShapeDtypeStructs."""
        cfg = T5Config.from_json(config_json)
        return cls(nnx.eval_shape(lambda: T5EncoderModule(cfg, dtype=dtype, rngs=init_rngs(0))), tokenizer=None)

    def with_state(self, state: nnx.State) -> T5Encoder:
        """The same encoder over other parameter arrays (e.g. sharded copies), so that the old ones can be freed."""
        return T5Encoder(nnx.merge(self.graphdef, state), self.tokenizer)

    @property
    def dim(self) -> int:
        return self.module.cfg.d_model

    @property
    def dtype(self) -> DTypeLike:
        return self.module.dtype

    def apply(self, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Pure function of the parameters: pass `self.state` as a jit argument (e.g. sharded)
        instead of letting a large encoder be captured as a constant of the caller's program."""
        return jax.lax.stop_gradient(nnx.merge(self.graphdef, state)(input_ids, attention_mask))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Forward pass [B, L] -> [B, L, d_model] with the loaded parameters; traceable."""
        return self._forward(self.state, input_ids, attention_mask)

    def encode(self, texts: list[str], max_length: int) -> tuple[jax.Array, jax.Array]:
        """Texts -> (embeddings [B, max_length, d_model] in `dtype`, mask bool [B, max_length]).

        Always pads to `max_length`, so the jitted forward compiles once per (batch, length).
        """
        ids, mask = self.tokenizer(texts, max_length)
        mask = jnp.asarray(mask)
        return self._forward(self.state, jnp.asarray(ids), mask), mask
