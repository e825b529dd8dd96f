"""The optimizers move weights at the scale the learning rate says: configs/base64.py's Adafactor takes a first
step of the same size as AdamW's on a normally initialised and on a zero-initialised kernel (optax.adafactor's
defaults, which multiply by the parameter RMS, were ~70x and ~1000x smaller at lr 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagen_jax import config as config_lib
from imagen_jax.train import optimizer as optimizer_lib


def _first_update_rms(tx, params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return {k: float(jnp.sqrt(jnp.mean(jnp.square(u)))) for k, u in updates.items()}


def _base64_train_config(optimizer: str):
    c = config_lib.load_config_file("configs/base64.py")
    c.train.optimizer, c.train.warmup_steps, c.train.grad_clip_norm = optimizer, 0, 1e9  # peak lr from step 0
    return c.train


def test_base64_adafactor_first_step_matches_adamw_scale():
    rng = np.random.default_rng(0)
    shape = (3, 3, 512, 512)  # a base64 res-block conv
    params = {
        "normal": jnp.asarray(rng.normal(0, 1 / np.sqrt(9 * 512), shape), jnp.float32),
        "zero_init": jnp.zeros(shape, jnp.float32),
    }
    grads = {k: jnp.asarray(rng.normal(0, 1e-3, shape), jnp.float32) for k in params}  # identical gradient statistics
    adamw = _first_update_rms(optimizer_lib.make_optimizer(_base64_train_config("adamw")), params, grads)
    adafactor = _first_update_rms(optimizer_lib.make_optimizer(_base64_train_config("adafactor")), params, grads)
    lr = _base64_train_config("adafactor").learning_rate
    assert lr == 1e-4
    for name in params:  # Adam's first step is lr * sign(g): RMS = lr
        assert abs(adamw[name] / lr - 1) < 0.01, adamw
        assert 0.5 < adafactor[name] / adamw[name] < 2.0, (name, adafactor, adamw)
    # What optax.adafactor's defaults give on the same input: the bug this replaces.
    legacy = _first_update_rms(optax.chain(optax.adafactor(lr)), params, grads)
    assert legacy["normal"] < adamw["normal"] / 50 and legacy["zero_init"] < adamw["zero_init"] / 500


def test_weight_decay_is_decoupled_and_follows_the_schedule():
    c = _base64_train_config("adafactor")
    c.weight_decay, c.warmup_steps, c.num_steps = 0.1, 10, 100
    tx = optimizer_lib.make_optimizer(c)
    params = {"w": jnp.ones((4, 6))}
    zero = {"w": jnp.zeros((4, 6))}
    state = tx.init(params)
    updates, state = tx.update(zero, state, params)  # step 0 of the warm-up: lr 0, so no decay either
    assert float(jnp.abs(updates["w"]).max()) == 0.0
    for _ in range(9):
        updates, state = tx.update(zero, state, params)
    lr = optimizer_lib.learning_rate_schedule(c)(9)
    np.testing.assert_allclose(np.asarray(updates["w"]), -lr * 0.1 * np.ones((4, 6)), rtol=1e-5)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))


def _schedule_config(warmup: int, num_steps: int, end_fraction: float):
    c = _base64_train_config("adamw")
    c.learning_rate, c.warmup_steps, c.num_steps, c.end_lr_fraction = 2e-4, warmup, num_steps, end_fraction
    return c


def test_schedule_is_linear_warm_up_then_cosine_in_closed_form():
    peak, end, warmup, total = 2e-4, 2e-5, 10, 110
    lr = optimizer_lib.learning_rate_schedule(_schedule_config(warmup, total, 0.1))
    steps = np.array([0, 5, 10, 35, 60, 85, 110, 200])
    decay = np.clip((steps - warmup) / (total - warmup), 0, 1)
    expected = np.where(steps < warmup, peak * steps / warmup, end + (peak - end) * 0.5 * (1 + np.cos(np.pi * decay)))
    np.testing.assert_allclose([float(lr(s)) for s in steps], expected, rtol=1e-5, atol=1e-12)


def test_a_schedule_without_warm_up_or_decay_is_a_constant_that_num_steps_does_not_enter():
    """Same values as the warm-up + cosine form it stands for, and the same compiled program for any num_steps,
    so a run resumed with another num_steps loads its train step from the compilation cache."""
    constant = [optimizer_lib.learning_rate_schedule(_schedule_config(0, n, 1.0)) for n in (4, 6)]
    general = optax.warmup_cosine_decay_schedule(0.0, 2e-4, 0, 6, 2e-4)
    for step in (0, 1, 3, 5, 6, 100):  # in float32, as the step computes it
        assert np.float32(constant[0](step)) == np.float32(constant[1](step)) == general(step) == np.float32(2e-4)
    texts = [jax.jit(lambda s, f=f: f(s)).lower(jnp.int32(0)).as_text() for f in constant]
    assert texts[0] == texts[1]
    decaying = [optimizer_lib.learning_rate_schedule(_schedule_config(0, n, 0.5)) for n in (4, 6)]
    texts = [jax.jit(lambda s, f=f: f(s)).lower(jnp.int32(0)).as_text() for f in decaying]
    assert texts[0] != texts[1]  # with decay, num_steps is part of the program
