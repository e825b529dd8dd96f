"""Editing an image with a text-to-image sampler: inpainting (with RePaint resampling) and image-to-image (SDEdit).

Inpainting (Lugmayr et al. 2022, arXiv 2201.09865; imagen-pytorch's `inpaint_images`): a mask m (1 = regenerate,
0 = keep) splits the image. After every sampler step to time s the kept pixels are replaced by the input
forward-noised to s, so the model denoises the masked region in the context of the real surroundings; the last
evaluation's x0 is composed with the input itself, so kept pixels come back exactly. The masked region only sees
its surroundings through the model, a step at a time, which leaves a visible seam; RePaint's resampling
repairs it: after every `jump_length` steps the sampler noises x back up by those steps (a draw from the forward
process, `forward_jump`) and denoises them again, `resample` times in all, so the two regions harmonise.

Image-to-image (Meng et al. 2021, SDEdit, arXiv 2108.01073; diffusers' img2img): with strength S the sampler
starts from the input noised to where the last floor(S * steps) of its `steps` evaluations begin and runs those.
S = 0 returns the input; S = 1 starts from pure noise (the same draw text-to-image makes from the seed), so it
is text-to-image.

Both work for every sampler and schedule: they only change where the loop starts, which evaluation indices it
visits (`evaluation_order`) and what it does to x between evaluations (sampler.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.solvers import step_alpha_sigma


def check_strength(strength: float) -> None:
    """Raises ValueError unless 0 <= strength <= 1."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0: the input unchanged, 1: text-to-image), got {strength}")


def check_resampling(resample: int, jump_length: int) -> None:
    """Raises ValueError unless both are integers >= 1."""
    for name, value in (("inpaint_resample", resample), ("inpaint_jump", jump_length)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def first_evaluation(steps: int, strength: float) -> int:
    """The index of the first of `steps` evaluations that image-to-image at `strength` runs: steps - floor(S steps).
    `steps` when nothing runs (the input is returned)."""
    check_strength(strength)
    return steps - int(np.floor(strength * steps + 1e-6))


def evaluation_order(steps: int, first: int = 0, resample: int = 1, jump_length: int = 1) -> np.ndarray:
    """The evaluation indices the sampler visits, in order, from `first` to steps - 1: each once without
    resampling; with `resample` r > 1, the evaluations before the last are cut into blocks of `jump_length` j,
    counted back from the last (the first block may be shorter), and after each block the sampler jumps back up
    to the block's start and repeats it, r - 1 times (RePaint's schedule with one jump size). Counting from the
    end resamples the low-noise steps too, where the regenerated region settles its details against the kept
    one. The last evaluation is visited once, last."""
    check_resampling(resample, jump_length)
    order: list[int] = []
    block: list[int] = []
    for index in range(first, steps):
        order.append(index)
        block.append(index)
        if index + 1 < steps and (steps - 2 - index) % jump_length == 0:
            order += block * (resample - 1)
            block = []
    return np.asarray(order, np.int32)


def forward_jump(x: jax.Array, lsnr_from: jax.Array, lsnr_to: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw of x at the noisier log-SNR `lsnr_to` given x at `lsnr_from` (the forward process q(x_to | x_from)):
    (alpha_to / alpha_from) x + sigma_to sqrt(1 - SNR_to / SNR_from) noise."""
    alpha_from, _ = step_alpha_sigma(lsnr_from)
    alpha_to, sigma_to = step_alpha_sigma(lsnr_to)
    c = -jnp.expm1(lsnr_to - lsnr_from)
    return (alpha_to / alpha_from) * x + sigma_to * jnp.sqrt(jnp.maximum(c, 0.0)) * noise


def keep_known(x: jax.Array, image: jax.Array, mask: jax.Array, lsnr: jax.Array, noise: jax.Array) -> jax.Array:
    """x where `mask` is 1 (regenerated), and `image` forward-noised to `lsnr` where it is 0 (kept)."""
    alpha, sigma = step_alpha_sigma(lsnr)
    return mask * x + (1.0 - mask) * (alpha * image + sigma * noise)


def compose(x0: jax.Array, image: jax.Array, mask: jax.Array) -> jax.Array:
    """The final image: the sample where `mask` is 1, the input exactly where it is 0."""
    return jnp.where(mask > 0.5, x0, image)
