"""The dense and convolution layers' custom VJP (models/layers.py `_project`): the gradients autodiff gives in
float32, and under bfloat16 compute the weight gradients in float32 (summed over the batch before any rounding),
which autodiff would round to bfloat16 (issue 29, point 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import layers

CASES = [("conv", 3, 1, 8), ("conv", 3, 2, 8), ("conv", 3, 2, 7), ("conv", 1, 1, 5), ("dense", None, 1, None)]


def _case(kind, size, stride, width, dtype):
    rng = np.random.default_rng(0)
    if kind == "conv":
        x = rng.normal(size=(4, width, width, 8))
        w = rng.normal(size=(size, size, 8, 6)) / np.sqrt(9 * 8)
        how = layers._Projection(kind, dtype, None, None, stride, size // 2)
    else:
        x, w = rng.normal(size=(4, 5, 8)), rng.normal(size=(8, 6)) / np.sqrt(8)
        how = layers._Projection(kind, dtype, None, None)
    b = rng.normal(size=(6,))
    return [jnp.asarray(a, jnp.float32) for a in (x, w, b)], how


def _loss(project):
    return lambda x, w, b: jnp.sum(jnp.sin(project(x, w, b)).astype(jnp.float32))


@pytest.mark.parametrize("kind,size,stride,width", CASES)
def test_gradients_equal_autodiffs_in_float32(kind, size, stride, width):
    (x, w, b), how = _case(kind, size, stride, width, jnp.float32)
    ours = jax.grad(_loss(lambda x, w, b: layers._project(x, w, b, how)), (0, 1, 2))(x, w, b)
    autodiff = jax.grad(_loss(lambda x, w, b: how.apply(x, w) + b), (0, 1, 2))(x, w, b)
    for a, r in zip(ours, autodiff, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,size,stride,width", CASES)
def test_bfloat16_compute_gives_float32_weight_gradients(kind, size, stride, width):
    """The kernel and bias gradients are float32 sums of bfloat16 products: within float32 rounding of the same sum
    computed from the bfloat16 operands in float32, where autodiff's are rounded to bfloat16 (2^-9 relative)."""
    (x, w, b), how = _case(kind, size, stride, width, jnp.bfloat16)
    ours = jax.grad(_loss(lambda x, w, b: layers._project(x, w, b, how)), (1, 2))(x, w, b)
    assert all(g.dtype == jnp.float32 for g in ours)
    # the same bfloat16 forward and output cotangent, with the weight-gradient products summed in float32
    x16, w16, b16 = (a.astype(jnp.bfloat16) for a in (x, w, b))
    y, vjp = jax.vjp(lambda w, b: how.apply(x16, w) + b, w16, b16)
    g = jax.grad(lambda y: jnp.sum(jnp.sin(y).astype(jnp.float32)))(y)
    exact = jax.vjp(
        lambda w, b: how.apply(x16.astype(jnp.float32), w) + b, w16.astype(jnp.float32), b16.astype(jnp.float32)
    )[1](g.astype(jnp.float32))
    autodiff = vjp(g)
    for a, e, r in zip(ours, exact, autodiff, strict=True):
        scale = float(jnp.abs(e).max())
        ours_error, autodiff_error = float(jnp.abs(a - e).max()) / scale, float(jnp.abs(r - e).max()) / scale
        assert ours_error < 1e-5, ours_error
        assert autodiff_error > 10 * ours_error, (ours_error, autodiff_error)
