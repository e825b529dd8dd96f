"""init_rngs draws the keys nnx.Rngs draws (so a model's initial weights are unchanged), eagerly and under jit,
without flax's per-draw trace scan (what made building the 2B-parameter U-Net abstractly take ~10 s)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.flax_settings import init_rngs


def _draws(rngs: nnx.Rngs, n: int = 5) -> jax.Array:
    return jnp.stack([jax.random.key_data(rngs.params()) for _ in range(n)])


def test_init_rngs_draws_the_keys_of_nnx_rngs_eagerly_and_under_jit():
    for seed in (0, 7, jax.random.key(3, impl="rbg")):
        want = np.asarray(_draws(nnx.Rngs(seed)))
        np.testing.assert_array_equal(np.asarray(_draws(init_rngs(seed))), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda s=seed: _draws(init_rngs(s)))()), want)
        assert len(np.unique(want, axis=0)) == len(want)  # each draw a new key


def test_building_under_a_trace_never_asks_a_tracer_for_its_sharding(monkeypatch):
    """The quadratic cost came from `tracer.sharding` (an error message built by scanning the trace) at every
    draw; count those lookups while a model is built under eval_shape: none with init_rngs, one per draw or more
    with nnx.Rngs."""
    from jax._src import core

    lookups = []
    original = core.Tracer.sharding

    def counted(self):
        lookups.append(1)
        return original.fget(self)

    monkeypatch.setattr(core.Tracer, "sharding", property(counted))
    build = lambda rngs: nnx.Linear(4, 4, rngs=rngs(0))  # noqa: E731
    nnx.eval_shape(lambda: build(nnx.Rngs))
    assert len(lookups) >= 2  # kernel and bias keys: the old cost, still flax's (else this workaround can go)
    lookups.clear()
    nnx.eval_shape(lambda: build(init_rngs))
    assert lookups == []
