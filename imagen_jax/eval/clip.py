"""Frozen CLIP (ViT image tower, causal text transformer, projections) in Flax NNX, loaded without torch.

The math is transformers 5.24's `CLIPModel.get_image_features` / `get_text_features`:
- image: a stride-`patch_size` patch convolution (no bias), the class embedding prepended, position embeddings,
  `pre_layrnorm`, pre-norm encoder layers, `post_layernorm` of the class token, `visual_projection`;
- text: token + position embeddings, the same encoder layers under a causal mask, `final_layer_norm`, the state
  at the end-of-text token, `text_projection`. Which token: with the config's `eos_token_id == 2` (the value of
  configs written before transformers PR #24773, the OpenAI checkpoints among them) the position of the largest
  id in each row (CLIP's end-of-text id is its largest), otherwise the first position holding `eos_token_id`
  (position 0 when a row holds none: torchmetrics cuts over-long captions before their end-of-text token).
The padding mask transformers also applies never reaches the pooled token: attention is causal and padding
follows the end-of-text token, so the text tower takes token ids alone. All matmuls run at HIGHEST precision
(float32, not TF32 or one bfloat16 pass): a metric must not depend on the accelerator it runs on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, WeightsError
from imagen_jax.eval.clip_preprocess import ImageProcessing
from imagen_jax.eval.clip_tokenizer import CLIPTokenizer
from imagen_jax.flax_settings import init_rngs  # importing flax_settings: before any variable is built
from imagen_jax.text.weight_files import WeightFolder

_HIGHEST = jax.lax.Precision.HIGHEST

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (openai/clip-vit-base-patch32), for keys a config omits.
_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
}
LEGACY_EOS_TOKEN_ID = 2  # pre-#24773 configs: pool at the largest id (transformers keeps this branch)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One tower's encoder; `image_size`/`patch_size`/`num_channels` for the image tower, the rest for text."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    vocab_size: int = 0
    max_position_embeddings: int = 0
    eos_token_id: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """The fields of a Hugging Face CLIPModel config.json that the two towers and projections use."""

    text: TowerConfig
    vision: TowerConfig
    projection_dim: int

    @classmethod
    def from_json(cls, path: str) -> CLIPConfig:
        """Reads config.json, local or at a URL. As transformers does, a sub-config missing a key takes the default
        and a `text_config_dict`/`vision_config_dict` (old checkpoints) replaces `text_config`/`vision_config`."""
        fs = filesystem.for_path(path)
        if not fs.exists(path) or fs.isdir(path):
            raise MissingError(f"{path}: CLIP config.json not found")
        try:
            with fs.GFile(path, "rb") as f:
                raw = json.loads(f.read())
        except (*fs.errors, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: CLIP config.json cannot be read as JSON: {e}") from None
        if not isinstance(raw, dict):
            raise WeightsError(f"{path}: CLIP config.json is not a JSON object")
        if raw.get("model_type", "clip") != "clip":
            raise WeightsError(f"{path}: model_type is '{raw['model_type']}', expected 'clip' (a CLIPModel folder)")
        towers = {}
        for name, defaults in (("text", _TEXT_DEFAULTS), ("vision", _VISION_DEFAULTS)):
            given = raw.get(f"{name}_config_dict") or raw.get(f"{name}_config") or {}
            if not isinstance(given, dict):
                raise WeightsError(f"{path}: '{name}_config' is not a JSON object")
            values = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
            for key, value in values.items():
                if key == "hidden_act":
                    ok, expected = isinstance(value, str), "a string"
                elif key == "layer_norm_eps":
                    ok, expected = isinstance(value, int | float) and value > 0, "a positive number"
                else:
                    ok, expected = isinstance(value, int) and value > 0, "a positive integer"
                if not ok or isinstance(value, bool):
                    raise WeightsError(f"{path}: {name}_config '{key}' is {value!r}, expected {expected}")
            if values["hidden_act"] not in _ACTIVATIONS:
                raise WeightsError(
                    f"{path}: unsupported {name}_config hidden_act '{values['hidden_act']}' "
                    f"(supported: {', '.join(sorted(_ACTIVATIONS))})"
                )
            if values["hidden_size"] % values["num_attention_heads"]:
                raise WeightsError(f"{path}: {name}_config hidden_size is not a multiple of num_attention_heads")
            towers[name] = TowerConfig(**values)
        projection_dim = raw.get("projection_dim", 512)
        if not isinstance(projection_dim, int) or projection_dim <= 0:
            raise WeightsError(f"{path}: 'projection_dim' is {projection_dim!r}, expected a positive integer")
        return cls(text=towers["text"], vision=towers["vision"], projection_dim=projection_dim)


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), tuple(shape)) * std)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: biased variance, eps inside the square root, scale and bias."""

    def __init__(self, dim: int, eps: float) -> None:
        self.scale = nnx.Param(jnp.ones(dim))
        self.bias = nnx.Param(jnp.zeros(dim))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + self.eps) * self.scale[...] + self.bias[...]


class Linear(nnx.Module):
    """Kernel [in, out] (Hugging Face stores [out, in]) and an optional bias."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, *, bias: bool = True) -> None:
        self.kernel = _normal(rngs, (d_in, d_out), d_in**-0.5)
        self.bias = nnx.Param(jnp.zeros(d_out)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.matmul(x, self.kernel[...], precision=_HIGHEST)
        return y if self.bias is None else y + self.bias[...]


class EncoderLayer(nnx.Module):
    """Pre-norm multi-head self-attention and MLP, each with a residual connection."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs) -> None:
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.activation = cfg.hidden_act
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps)
        self.q = Linear(d, d, rngs)
        self.k = Linear(d, d, rngs)
        self.v = Linear(d, d, rngs)
        self.out = Linear(d, d, rngs)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps)
        self.fc1 = Linear(d, cfg.intermediate_size, rngs)
        self.fc2 = Linear(cfg.intermediate_size, d, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """x [B, L, D]; bias: additive attention bias [L, L] (the causal mask) or None."""
        b, length, d = x.shape
        heads = (b, length, self.num_heads, d // self.num_heads)
        h = self.norm1(x)
        q, k, v = (proj(h).reshape(heads) for proj in (self.q, self.k, self.v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) * (heads[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=_HIGHEST).reshape(b, length, d)
        x = x + self.out(attended)
        return x + self.fc2(_ACTIVATIONS[self.activation](self.fc1(self.norm2(x))))


class ImageTower(nnx.Module):
    """Patches, class token, positions, pre-norm, encoder; returns the post-normed class token [B, D]."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs) -> None:
        d, p = cfg.hidden_size, cfg.patch_size
        self.image_size = cfg.image_size
        self.patch_size = p
        self.grid = cfg.image_size // p
        self.patch_kernel = _normal(rngs, (p, p, cfg.num_channels, d), 0.02)  # HWIO
        self.class_embedding = _normal(rngs, (d,), d**-0.5)
        self.position_embedding = _normal(rngs, (self.grid**2 + 1, d), 0.02)
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: normalised float32 [B, image_size, image_size, C]."""
        b, height, width, c = pixels.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP image tower takes {self.image_size}x{self.image_size} images, got {height}x{width}")
        g, p = self.grid, self.patch_size
        patches = pixels[:, : g * p, : g * p].reshape(b, g, p, g, p, c)  # a stride-p convolution drops the rest
        x = jnp.einsum("byixjc,ijcd->byxd", patches, self.patch_kernel[...], precision=_HIGHEST)
        x = x.reshape(b, g * g, -1)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x, None)
        return self.post_norm(x[:, 0])


class TextTower(nnx.Module):
    """Token and position embeddings, causal encoder, final norm; returns the end-of-text token's state [B, D]."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs) -> None:
        d = cfg.hidden_size
        self.eos_token_id = cfg.eos_token_id
        self.token_embedding = _normal(rngs, (cfg.vocab_size, d), 0.02)
        self.position_embedding = _normal(rngs, (cfg.max_position_embeddings, d), 0.01)
        self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """token_ids: int [B, L], L <= max_position_embeddings."""
        b, length = token_ids.shape
        if length > self.position_embedding.shape[0]:
            raise ValueError(f"CLIP text tower takes at most {self.position_embedding.shape[0]} tokens, got {length}")
        x = jnp.take(self.token_embedding[...], token_ids, axis=0) + self.position_embedding[...][:length]
        causal = jnp.where(jnp.tril(jnp.ones((length, length), jnp.bool_)), 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, causal)
        x = self.final_norm(x)
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            pooled_at = jnp.argmax(token_ids, axis=-1)
        else:
            pooled_at = jnp.argmax(token_ids == self.eos_token_id, axis=-1)
        return x[jnp.arange(b), pooled_at]


class CLIPModule(nnx.Module):
    """Both towers and their projections into the shared embedding space (unnormalised)."""

    def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.image = ImageTower(cfg.vision, rngs)
        self.text = TextTower(cfg.text, rngs)
        self.visual_projection = Linear(cfg.vision.hidden_size, cfg.projection_dim, rngs, bias=False)
        self.text_projection = Linear(cfg.text.hidden_size, cfg.projection_dim, rngs, bias=False)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """Normalised pixels [B, S, S, C] -> [B, projection_dim]: transformers' `get_image_features`."""
        return self.visual_projection(self.image(pixels))

    def text_features(self, token_ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> [B, projection_dim]: transformers' `get_text_features`."""
        return self.text_projection(self.text(token_ids))


_LINEAR_T = (1, 0)
_CONV_TO_HWIO = (2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]


def hf_tensor_names(cfg: CLIPConfig) -> dict[tuple, tuple[str, tuple[int, ...] | None]]:
    """Maps each parameter path of CLIPModule to (Hugging Face tensor name, axis permutation or None)."""
    names: dict[tuple, tuple[str, tuple[int, ...] | None]] = {
        ("image", "patch_kernel"): ("vision_model.embeddings.patch_embedding.weight", _CONV_TO_HWIO),
        ("image", "class_embedding"): ("vision_model.embeddings.class_embedding", None),
        ("image", "position_embedding"): ("vision_model.embeddings.position_embedding.weight", None),
        ("text", "token_embedding"): ("text_model.embeddings.token_embedding.weight", None),
        ("text", "position_embedding"): ("text_model.embeddings.position_embedding.weight", None),
        ("visual_projection", "kernel"): ("visual_projection.weight", _LINEAR_T),
        ("text_projection", "kernel"): ("text_projection.weight", _LINEAR_T),
    }
    norms = {
        ("image", "pre_norm"): "vision_model.pre_layrnorm",  # sic: transformers' spelling
        ("image", "post_norm"): "vision_model.post_layernorm",
        ("text", "final_norm"): "text_model.final_layer_norm",
    }
    linears = {}
    parts = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "out": "self_attn.out_proj"}
    parts |= {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for tower, prefix, layers in (("image", "vision_model", cfg.vision), ("text", "text_model", cfg.text)):
        for i in range(layers.num_hidden_layers):
            layer = f"{prefix}.encoder.layers.{i}"
            norms[(tower, "layers", i, "norm1")] = f"{layer}.layer_norm1"
            norms[(tower, "layers", i, "norm2")] = f"{layer}.layer_norm2"
            linears |= {(tower, "layers", i, part): f"{layer}.{hf}" for part, hf in parts.items()}
    for path, hf in norms.items():
        names[(*path, "scale")] = (f"{hf}.weight", None)
        names[(*path, "bias")] = (f"{hf}.bias", None)
    for path, hf in linears.items():
        names[(*path, "kernel")] = (f"{hf}.weight", _LINEAR_T)
        names[(*path, "bias")] = (f"{hf}.bias", None)
    return names


def _load_params(folder: str, cfg: CLIPConfig, abstract: nnx.State) -> Iterator[tuple]:
    """Yields (path, Param holding the checkpoint's tensor as float32), reading one tensor at a time."""
    names = hf_tensor_names(cfg)
    with contextlib.ExitStack() as stack:
        reader = WeightFolder(folder, stack)
        for path, variable in nnx.to_flat_state(abstract):
            key, permutation = names[path]
            array = reader.get(key)
            stored = tuple(variable.shape)  # the shape Hugging Face stores: ours with the permutation undone
            if permutation is not None:
                stored = tuple(variable.shape[permutation.index(axis)] for axis in range(len(permutation)))
            if array.shape != stored:
                raise WeightsError(f"{reader.source}: tensor '{key}' has shape {array.shape}, expected {stored}")
            if permutation is not None:
                array = array.transpose(permutation)
            yield path, variable.replace(jnp.asarray(array.astype(np.float32)))


class CLIP:
    """Frozen CLIP for scoring: tokenizer, image preprocessing and the NNX module, with pure forward functions.

    `image_embeds(state, images)` and `text_embeds(state, token_ids)` are pure functions of the parameters (pass
    `self.state`, possibly replicated over a mesh, as a jit argument) and return **unit-length** float32
    embeddings [B, projection_dim], the vectors whose dot product is the cosine CLIP score uses. The unnormalised
    projections are `module.image_features` / `module.text_features`.
    """

    def __init__(self, module: CLIPModule, tokenizer: CLIPTokenizer, processing: ImageProcessing) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.processing = processing
        self.graphdef, self.state = nnx.split(module)
        self._images = jax.jit(self.image_embeds)
        self._texts = jax.jit(self.text_embeds)

    @classmethod
    def from_pretrained(cls, path: str) -> CLIP:
        """Loads a Hugging Face CLIPModel folder, local or at a URL: config.json, the image processor settings
        (preprocessor_config.json or processor_config.json), the tokenizer (tokenizer.json, or vocab.json and
        merges.txt) and safetensors or pytorch_model.bin weights, single or sharded (text/weight_files.py). Only
        the two towers and projections are read (not logit_scale). Images are preprocessed as transformers 5's
        torchvision-backed CLIPImageProcessor does, which torchmetrics' CLIPScore uses (eval/clip_preprocess.py).
        """
        cfg = CLIPConfig.from_json(os.path.join(path, "config.json"))
        processing = ImageProcessing.from_folder(path)
        if (processing.crop_height, processing.crop_width) != (cfg.vision.image_size,) * 2:
            raise WeightsError(
                f"{path}: the image processor crops {processing.crop_height}x{processing.crop_width} images but the "
                f"image tower takes {cfg.vision.image_size}x{cfg.vision.image_size}"
            )
        tokenizer = CLIPTokenizer(path, length=cfg.text.max_position_embeddings)
        abstract = nnx.eval_shape(lambda: CLIPModule(cfg, init_rngs(0)))
        graphdef, state = nnx.split(abstract)
        loaded = nnx.from_flat_state(list(_load_params(path, cfg, state)))
        return cls(nnx.merge(graphdef, loaded), tokenizer, processing)

    @property
    def dim(self) -> int:
        """The embedding width (projection_dim)."""
        return self.module.cfg.projection_dim

    def image_embeds(self, state: nnx.State, images: jax.Array) -> jax.Array:
        """uint8 RGB images [B, H, W, 3] (any H, W) -> unit-length float32 [B, projection_dim]: the folder's
        preprocessing (resize the shortest side, centre crop, normalise), the image tower and projection."""
        if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"CLIP images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        features = nnx.merge(self.graphdef, state).image_features(self.processing(images))
        return unit(jax.lax.stop_gradient(features))

    def text_embeds(self, state: nnx.State, token_ids: jax.Array) -> jax.Array:
        """Token ids [B, L] from `tokenize` -> unit-length float32 [B, projection_dim]."""
        features = nnx.merge(self.graphdef, state).text_features(token_ids)
        return unit(jax.lax.stop_gradient(features))

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int32 [B, max_position_embeddings], cut and padded as torchmetrics' CLIPScore does
        (eval/clip_tokenizer.py)."""
        return self.tokenizer(texts)

    def embed_images(self, images: np.ndarray | jax.Array) -> jax.Array:
        """`image_embeds` with the loaded parameters, jitted (compiles once per image batch shape)."""
        return self._images(self.state, jnp.asarray(images))

    def embed_texts(self, texts: Sequence[str]) -> jax.Array:
        """Tokenise and embed with the loaded parameters, jitted (compiles once per batch size)."""
        return self._texts(self.state, jnp.asarray(self.tokenize(texts)))


def unit(x: jax.Array) -> jax.Array:
    """x / ||x||, as torchmetrics normalises both embeddings before their dot product."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
