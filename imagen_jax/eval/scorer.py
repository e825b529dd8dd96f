"""Inception features and CLIP scores of image batches, each batch split over a mesh's devices.

One object for what every evaluation computes per image, so tools.fid_reference, tools.evaluate and the
training loop's periodic evaluation make their features the same way (weights, resize) and say how
(`resize`, `weights_id`, `weights_sha256`: what reference statistics are checked against).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from imagen_jax.eval import clip as clip_lib
from imagen_jax.eval import inception as inception_lib
from imagen_jax.parallel import mesh as mesh_lib

RESIZE = "tf1_bilinear_299"  # torch-fidelity's TF1-exact bilinear resize to 299x299 (eval/inception.py)
FEATURE_LAYER = "pool3_2048"


class Scorer:
    """`features(images)`: Inception pool3 features; `clip_scores(images, captions)`: torchmetrics' CLIP score
    per pair (needs a CLIP folder). Images are uint8 [N, H, W, 3] held whole by every process; results are
    NumPy, whole on every process. Weights are replicated over `mesh`, the batch split over its devices."""

    def __init__(self, inception_path: str, mesh: Mesh, clip_folder: str | None = None):
        self.mesh = mesh
        model = inception_lib.load_inception(inception_path)
        self.weights_id, self.weights_sha256 = model.weights_id, model.source_sha256
        graphdef, state = nnx.split(model)
        replicated = mesh_lib.replicated(mesh)
        self._inception_state = jax.device_put(state, replicated)
        self._inception = jax.jit(
            lambda s, x: inception_lib.inception_features(graphdef, s, x), out_shardings=mesh_lib.batch_sharding(mesh)
        )
        self.clip = None if clip_folder is None else clip_lib.CLIP.load(clip_folder, mesh=mesh)

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, 2048]."""
        rows = mesh_lib.padded_rows(len(images), self.mesh)
        x = mesh_lib.place_rows(np.asarray(images, np.uint8), rows, self.mesh)
        return mesh_lib.gather_rows(self._inception(self._inception_state, x), len(images), self.mesh)

    def clip_scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """float32 [N]: max(100 * cos(image, caption), 0) per pair."""
        if self.clip is None:
            raise ValueError("no CLIP model: pass clip_folder")
        return self.clip.scores(images, list(captions))
