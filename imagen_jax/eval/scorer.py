"""Inception features and CLIP scores of image batches, each batch split over a mesh's devices.

One object for what every evaluation computes per image, so tools.fid_reference, tools.evaluate and the
training loop's periodic evaluation make their features the same way (weights, resize) and say how
(`resize`, `weights_id`, `weights_sha256`: what reference statistics are checked against).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from imagen_jax.eval import clip as clip_lib
from imagen_jax.eval import clip_score
from imagen_jax.eval import inception as inception_lib
from imagen_jax.flax_settings import init_rngs
from imagen_jax.parallel import mesh as mesh_lib

RESIZE = "tf1_bilinear_299"  # torch-fidelity's TF1-exact bilinear resize to 299x299 (eval/inception.py)
FEATURE_LAYER = "pool3_2048"


class Scorer:
    """`features(images)`: Inception pool3 features; `clip_scores(images, captions)`: 100 cos(image, caption) per
    pair, unclamped (eval/clip_score.py; needs a CLIP folder). Images are uint8 [N, H, W, 3] held whole by every
    process; results are NumPy, whole on every process. Weights are replicated over `mesh`, the batch split over
    its devices.

    `resident` False (training's periodic evaluation): the weights wait in host memory and are on the devices
    only inside `with scorer.loaded():`, so CLIP ViT-L/14 and Inception (~1.8 GB in float32) do not sit on every
    chip for the whole run beside the train state. True: on the devices from the start (the evaluation tools)."""

    def __init__(self, inception_path: str, mesh: Mesh, clip_folder: str | None = None, *, resident: bool = True):
        self.mesh = mesh
        model = inception_lib.load_inception(inception_path)
        self.weights_id, self.weights_sha256 = model.weights_id, model.source_sha256
        self._inception_graphdef, state = nnx.split(model)
        self._host = {"inception": jax.device_get(state)}
        self._clip: tuple[nnx.GraphDef, Any, Callable[[list[str]], np.ndarray]] | None = None
        if clip_folder:  # what scoring needs of the model; its loaded arrays go once copied to the host
            clip = clip_lib.CLIP.from_pretrained(clip_folder)
            self._clip = (clip.graphdef, clip.processing, clip.tokenizer)  # not bound methods: they keep `clip`
            self._host["clip"] = jax.device_get(clip.state)
            del clip
        del model, state
        self._on_devices: dict[str, Any] | None = None
        if resident:
            self._place()

    def _place(self) -> None:
        replicated = mesh_lib.replicated(self.mesh)
        self._on_devices = {name: jax.device_put(state, replicated) for name, state in self._host.items()}

    @contextlib.contextmanager
    def loaded(self) -> Iterator[None]:
        """Within the block the weights are on the devices (already there for a resident scorer); after it, a
        non-resident scorer's device copies are freed."""
        if self._on_devices is not None:
            yield
            return
        self._place()
        try:
            yield
        finally:
            self._on_devices = None

    @property
    def has_clip(self) -> bool:
        return self._clip is not None

    def _weights(self, name: str) -> Any:
        if self._on_devices is None:
            raise RuntimeError("the scorer's weights are not on the devices: score inside `with scorer.loaded():`")
        return self._on_devices[name]

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, 2048]."""
        rows = mesh_lib.padded_rows(len(images), self.mesh)
        x = mesh_lib.place_rows(np.asarray(images, np.uint8), rows, self.mesh)
        features = _inception(self._inception_graphdef, self._weights("inception"), x)
        return mesh_lib.gather_rows(features, len(images), self.mesh)

    def clip_scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """float32 [N]: max(100 * cos(image, caption), 0) per pair."""
        if self._clip is None:
            raise ValueError("no CLIP model: pass clip_folder")
        graphdef, processing, tokenize = self._clip
        if len(images) != len(captions):
            raise ValueError(f"CLIP score needs one caption per image, got {len(images)} and {len(captions)}")
        rows = mesh_lib.padded_rows(len(images), self.mesh)
        x = mesh_lib.place_rows(np.asarray(images, np.uint8), rows, self.mesh)
        ids = mesh_lib.place_rows(tokenize(list(captions)), rows, self.mesh)
        scores = _clip_scores(graphdef, processing, self._weights("clip"), x, ids)
        return mesh_lib.gather_rows(scores, len(images), self.mesh)


def device_bytes(clip_folder: str | None) -> dict[str, int]:
    """The bytes a Scorer places on each device (float32, replicated): Inception's and, with a CLIP folder (its
    config.json alone is read), CLIP's; from the models' shapes, nothing loaded (the planner counts them)."""

    def float32_bytes(build: Callable[[], nnx.Module]) -> int:
        return sum(4 * math.prod(x.shape) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param)))

    sizes = {"inception": float32_bytes(lambda: inception_lib.InceptionV3("shapes", ""))}
    if clip_folder:
        cfg = clip_lib.CLIPConfig.from_json(os.path.join(clip_folder, "config.json"))
        sizes["clip"] = float32_bytes(lambda: clip_lib.CLIPModule(cfg, init_rngs(0)))
    return sizes


# Module-level jits keyed by the (static) graph: every Scorer of the same weights' shapes reuses one compile.
_inception = jax.jit(inception_lib.inception_features, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _clip_scores(
    graphdef: nnx.GraphDef, processing: Any, state: nnx.State, images: jax.Array, ids: jax.Array
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    image_embeds = clip_lib.unit(model.image_features(processing(images)))
    return clip_score.pair_scores(image_embeds, clip_lib.unit(model.text_features(ids)))
