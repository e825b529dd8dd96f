"""Low-res conditioning for SR stages: antialiased downsampling and noise conditioning augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import augment
from imagen_jax.diffusion.schedule import alpha_sigma, log_snr


def test_downsample_averages_and_keeps_constants():
    const = jnp.full((2, 16, 16, 3), 0.25)
    np.testing.assert_allclose(augment.downsample(const, 4), 0.25, atol=1e-6)
    # A checkerboard (highest frequency) averages out instead of aliasing into a pattern.
    board = jnp.asarray(np.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0)[None, :, :, None]
    small = augment.downsample(board, 4)
    assert small.shape == (1, 4, 4, 1) and float(jnp.abs(small).max()) < 0.05


@pytest.mark.parametrize("level", [0.0, 0.3, 0.9])
def test_sampling_augmentation_matches_forward_process_statistics(level):
    lowres = jnp.full((4000, 2, 2, 1), 0.5)
    z, aug_t = augment.sampling_augmentation(lowres, level, jax.random.key(0), "cosine")
    alpha, sigma = (float(v) for v in alpha_sigma(log_snr(jnp.float32(level), "cosine")))
    np.testing.assert_allclose(np.asarray(aug_t), level)
    assert abs(float(z.mean()) - 0.5 * alpha) < 4 * sigma / np.sqrt(z.size) + 1e-6
    assert abs(float(z.std()) - sigma) < 0.03 * sigma + 1e-6


def test_per_example_keys_and_training_levels():
    lowres = jnp.zeros((3, 4, 4, 3))
    keys = jax.vmap(jax.random.key)(jnp.arange(3, dtype=jnp.uint32))
    z, _ = augment.sampling_augmentation(lowres, 0.5, keys, "cosine")
    z1, _ = augment.sampling_augmentation(lowres[1:2], 0.5, keys[1:2], "cosine")
    np.testing.assert_array_equal(np.asarray(z[1]), np.asarray(z1[0]))
    _, aug_t = augment.training_augmentation(jnp.zeros((20000, 1, 1, 1)), jax.random.key(1), "cosine")
    assert 0.0 <= float(aug_t.min()) and float(aug_t.max()) <= 1.0 and abs(float(aug_t.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="must be in \\[0, 1\\], got 1.5"):
        augment.sampling_augmentation(lowres, 1.5, jax.random.key(0), "cosine")
