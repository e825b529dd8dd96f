"""config.eval during training: FID, KID and CLIP score of the EMA weights' samples, beside the loss.

Every process takes part in sampling and scoring (the weights and each sampled batch span the mesh); process 0
alone, the loop's writer, reduces the features to FID, KID and precision/recall (float64 NumPy, a minute for a
30k reference: the other hosts would only repeat it) and logs eval/fid_g<scale>, eval/kid_g<scale>,
eval/clip_score_g<scale>. The captions and seeds are the same at every evaluation, so the curve shows the
model changing, not the sample. Inception and CLIP are on the devices only while evaluating (`Scorer.loaded`),
and a batch is a whole multiple of the data-parallel width, so only the last one carries padding rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import images as images_lib
from imagen_jax.diffusion import Denoiser
from imagen_jax.eval import evaluation, reference_stats
from imagen_jax.eval import scorer as scorer_lib
from imagen_jax.eval.sources import read_captions
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import sampling


class PeriodicEval:
    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        encoder: Any,
        denoiser: Denoiser,
        log: Callable[[str], None],
    ):
        self.config, self.mesh, self.encoder, self.denoiser, self.log = config, mesh, encoder, denoiser, log
        settings = config.eval
        self.captions = read_captions(settings.captions, int(settings.num_images), int(settings.seed))
        self.reference = reference_stats.load(settings.reference)
        self.scorer = scorer_lib.Scorer(settings.inception, mesh, settings.clip or None, resident=False)
        # e.g. eval.batch_size 64 on 256 chips: 256 images a batch, not 64 padded to 256 rows
        self.batch_size = mesh_lib.padded_rows(int(settings.batch_size), mesh)
        evaluation.check_reference(self.reference, self.scorer, int(config.data.image_size))

    def due(self, step: int) -> bool:
        return step % int(self.config.eval.every) == 0

    def __call__(self, ema: Any) -> dict[str, float]:
        """The figures for the EMA parameters `ema`, keyed for TensorBoard, on process 0 (others: {})."""
        config = self.config
        steps = int(config.eval.steps) or int(config.train.sample_steps)

        def sample(chunk: list[str], seeds: list[int], scale: float) -> np.ndarray:
            ids, mask = self.encoder.tokenizer(chunk, config.text.max_length)
            text, mask = sampling.encode(self.encoder, ids, mask, self.mesh)
            x = sampling.sample(
                config, self.denoiser, ema, text, mask, seeds, mesh=self.mesh, steps=steps, guidance_scale=scale
            )
            return images_lib.to_uint8(x)

        scales = [float(scale) for scale in config.eval.guidance_scales]
        with self.scorer.loaded():
            scored = {
                scale: evaluation.score_scale(
                    sample,
                    self.scorer,
                    self.captions,
                    scale,
                    batch_size=self.batch_size,
                    seed=int(config.eval.seed),
                    log=lambda _: None,
                )
                for scale in scales
            }
        if jax.process_index() != 0:
            return {}
        figures: dict[str, float] = {}
        for scale, (features, clip) in scored.items():
            result = evaluation.summarise(features, clip, self.reference)
            for name in ("fid", "kid", "clip_score", "precision", "recall"):
                if name in result:
                    figures[f"eval/{name}_g{scale:g}"] = float(result[name])
        return figures
