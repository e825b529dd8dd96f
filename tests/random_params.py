"""Random nonzero U-Net parameters for behaviour tests (the real init zeroes output convs, which would hide
every effect of an input on the output)."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def random_state(abstract_state, seed=0):
    """Fills an abstract nnx.State: kernels ~ N(0, 1/fan_in), norm scales ~ 1, everything else small."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name.endswith("['scale'].value"):
            return jnp.asarray(1.0 + 0.1 * noise)
        if leaf.ndim >= 2 and "kernel" in name:
            return jnp.asarray(noise / math.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(0.1 * noise)

    return jax.tree_util.tree_map_with_path(fill, abstract_state)
