"""Continuous-time Gaussian diffusion: log-SNR schedules, training loss, guidance, DDPM, DDIM and DPM-Solver++."""

from imagen_jax.diffusion.denoiser import Denoiser, fused
from imagen_jax.diffusion.guidance import (
    THRESHOLD_MODES,
    dynamic_threshold,
    guided_prediction,
    static_clip,
    threshold,
)
from imagen_jax.diffusion.losses import (
    OBJECTIVES,
    diffusion_loss,
    pred_to_eps,
    pred_to_x0,
    q_sample,
    target,
    x0_to_pred,
)
from imagen_jax.diffusion.sampler import sample
from imagen_jax.diffusion.schedule import SCHEDULES, alpha_sigma, log_snr
from imagen_jax.diffusion.solvers import SAMPLERS

__all__ = [
    "Denoiser",
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "THRESHOLD_MODES",
    "alpha_sigma",
    "diffusion_loss",
    "dynamic_threshold",
    "fused",
    "guided_prediction",
    "log_snr",
    "pred_to_eps",
    "pred_to_x0",
    "q_sample",
    "sample",
    "static_clip",
    "target",
    "threshold",
    "x0_to_pred",
]
