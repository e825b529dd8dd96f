"""The activation layout is part of what jit sees (issue 29, point 6): a program traced outside
`activation_layout` is never reused inside it (where it would run without its sharding constraints and weight
placements, the partitioning that computed wrong tensor-parallel numbers), nor the reverse."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imagen_jax.diffusion import sample
from imagen_jax.parallel import activations
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel.mesh import AXES


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), AXES)


def test_each_layout_gets_its_own_trace():
    seen = []

    @activations.jit(static_argnums=(1,))
    def scaled(x, factor):
        seen.append(activations._LAYOUT.get())
        return activations.constrain(x * factor)

    x, mesh = jnp.ones((4, 3)), _mesh()
    scaled(x, 2.0)
    with activations.activation_layout(mesh):
        np.testing.assert_array_equal(scaled(x, 2.0), 2 * np.ones((4, 3)))
        assert "sharding_constraint" in str(scaled.trace(x, 2.0).jaxpr)
    rules = mesh_lib.Rules((("channels_out", "fsdp"),))
    with activations.activation_layout(mesh, rules):
        scaled(x, 2.0)
    scaled(x, 2.0)  # outside again: the first trace, reused
    assert "sharding_constraint" not in str(scaled.trace(x, 2.0).jaxpr)
    assert [None if s is None else s.rules for s in seen] == [None, None, rules]
    assert seen[1].mesh is mesh


def _model(params, x, t, text, mask, drop_text):
    """A denoiser that records, when traced, whether it ran under a layout."""
    _model.layouts.append(activations._LAYOUT.get() is not None)
    return activations.constrain(x * params["w"])


_model.layouts = []


def test_the_sampler_traced_outside_a_layout_is_not_reused_inside_it():
    """sampling.sample runs diffusion.sample inside the layout; a call of the same shapes outside it (a test, an
    evaluation script) must not hand its constraint-free program to the layout's calls."""
    kwargs = dict(shape=(2, 4, 4, 3), steps=3, guidance_scale=1.0, sampler="ddim", schedule="cosine")
    text, mask, key = jnp.zeros((2, 5, 8)), jnp.ones((2, 5), bool), jax.random.key(0)
    params = {"w": jnp.float32(0.5)}
    outside = sample(_model, params, text, mask, key, **kwargs)
    traced_outside = list(_model.layouts)
    with activations.activation_layout(_mesh()):
        inside = sample(_model, params, text, mask, key, **kwargs)
    assert traced_outside and not any(traced_outside)
    assert _model.layouts[len(traced_outside) :] and all(_model.layouts[len(traced_outside) :])
    np.testing.assert_allclose(inside, outside, rtol=1e-6)
