"""Inception features and CLIP scores of image batches, each batch split over a mesh's devices.

One object for what every evaluation computes per image, so tools.fid_reference, tools.evaluate and the
training loop's periodic evaluation make their features the same way (weights, resize) and say how
(`resize`, `weights_id`, `weights_sha256`: what reference statistics are checked against).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from imagen_jax.eval import clip as clip_lib
from imagen_jax.eval import clip_score
from imagen_jax.eval import inception as inception_lib
from imagen_jax.parallel import mesh as mesh_lib

RESIZE = "tf1_bilinear_299"  # torch-fidelity's TF1-exact bilinear resize to 299x299 (eval/inception.py)
FEATURE_LAYER = "pool3_2048"


class Scorer:
    """`features(images)`: Inception pool3 features; `clip_scores(images, captions)`: 100 cos(image, caption) per
    pair, unclamped (eval/clip_score.py; needs a CLIP folder). Images are uint8 [N, H, W, 3] held whole by every
    process; results are NumPy, whole on every process. Weights are replicated over `mesh`, the batch split over
    its devices."""

    def __init__(self, inception_path: str, mesh: Mesh, clip_folder: str | None = None):
        self.mesh = mesh
        model = inception_lib.load_inception(inception_path)
        self.weights_id, self.weights_sha256 = model.weights_id, model.source_sha256
        self._inception_graphdef, state = nnx.split(model)
        replicated = mesh_lib.replicated(mesh)
        self._inception_state = jax.device_put(state, replicated)
        self.clip = None
        if clip_folder:
            self.clip = clip_lib.CLIP.from_pretrained(clip_folder)
            self._clip_state = jax.device_put(self.clip.state, replicated)

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, 2048]."""
        rows = mesh_lib.padded_rows(len(images), self.mesh)
        x = mesh_lib.place_rows(np.asarray(images, np.uint8), rows, self.mesh)
        features = _inception(self._inception_graphdef, self._inception_state, x)
        return mesh_lib.gather_rows(features, len(images), self.mesh)

    def clip_scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """float32 [N]: max(100 * cos(image, caption), 0) per pair."""
        if self.clip is None:
            raise ValueError("no CLIP model: pass clip_folder")
        if len(images) != len(captions):
            raise ValueError(f"CLIP score needs one caption per image, got {len(images)} and {len(captions)}")
        rows = mesh_lib.padded_rows(len(images), self.mesh)
        x = mesh_lib.place_rows(np.asarray(images, np.uint8), rows, self.mesh)
        ids = mesh_lib.place_rows(self.clip.tokenize(list(captions)), rows, self.mesh)
        scores = _clip_scores(self.clip.graphdef, self.clip.processing, self._clip_state, x, ids)
        return mesh_lib.gather_rows(scores, len(images), self.mesh)


# Module-level jits keyed by the (static) graph: every Scorer of the same weights' shapes reuses one compile.
_inception = jax.jit(inception_lib.inception_features, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _clip_scores(
    graphdef: nnx.GraphDef, processing: Any, state: nnx.State, images: jax.Array, ids: jax.Array
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    image_embeds = clip_lib.unit(model.image_features(processing(images)))
    return clip_score.pair_scores(image_embeds, clip_lib.unit(model.text_features(ids)))
