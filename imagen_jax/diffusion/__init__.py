"""Gaussian diffusion in log-SNR: continuous and discrete (DeepFloyd IF) schedules, training loss, guidance, DDPM,
DDIM and DPM-Solver++."""

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
    VARIANCE_LOSSES,
    diffusion_loss,
    pred_to_eps,
    pred_to_x0,
    q_sample,
    target,
    vlb_terms,
    x0_to_pred,
)
from imagen_jax.diffusion.sampler import sample
from imagen_jax.diffusion.schedule import (
    DISCRETE_SCHEDULES,
    SCHEDULES,
    alpha_sigma,
    is_discrete,
    log_snr,
    sample_times,
)
from imagen_jax.diffusion.solvers import SAMPLERS, VARIANCES
from imagen_jax.diffusion.timesteps import NAMED_TIMESTEPS, discrete_timesteps

__all__ = [
    "DISCRETE_SCHEDULES",
    "Denoiser",
    "NAMED_TIMESTEPS",
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "THRESHOLD_MODES",
    "VARIANCES",
    "VARIANCE_LOSSES",
    "alpha_sigma",
    "diffusion_loss",
    "discrete_timesteps",
    "dynamic_threshold",
    "fused",
    "guided_prediction",
    "is_discrete",
    "log_snr",
    "pred_to_eps",
    "pred_to_x0",
    "q_sample",
    "sample",
    "sample_times",
    "static_clip",
    "target",
    "threshold",
    "vlb_terms",
    "x0_to_pred",
]
