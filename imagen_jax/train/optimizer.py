"""The optimizer: linear warm-up + cosine decay, gradient-norm clipping, AdamW or Adafactor (paper: base).

Both put updates on the same scale: a unit-RMS direction times the learning rate, with weight decay decoupled
and scaled by the schedule (AdamW's -lr * (m / sqrt(v) + wd * w)). Adafactor here is not optax.adafactor's
default: with multiply_by_parameter_scale it scales every update by its parameter's RMS, so at the paper's lr
1e-4 a 3x3x512x512 kernel moved ~70x less than with AdamW, and a zero-initialised kernel (every residual
block's second conv, every attention output) ~1000x less (tests/test_optimizer.py measures both).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adamw", "adafactor")


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine to end_lr_fraction * learning_rate at num_steps.

    Without warm-up or decay it is a constant, the same values, and the compiled step then does not depend on
    num_steps: a run resumed with another num_steps reuses the compilation cache instead of compiling again."""
    warmup = min(int(train_cfg.warmup_steps), int(train_cfg.num_steps))
    if warmup == 0 and float(train_cfg.end_lr_fraction) == 1.0:
        return optax.constant_schedule(float(train_cfg.learning_rate))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(train_cfg.learning_rate),
        warmup_steps=warmup,
        decay_steps=max(int(train_cfg.num_steps), warmup + 1),
        end_value=float(train_cfg.learning_rate) * float(train_cfg.end_lr_fraction),
    )


def adafactor(
    schedule: optax.Schedule, *, momentum: float, weight_decay: float, decay_rate: float = 0.8
) -> optax.GradientTransformation:
    """Adafactor on Adam's scale (big_vision's recipe): the gradient divided by its factored RMS (row and column
    second moments of every matrix-like parameter; full for vectors), clipped to block RMS 1, averaged with a
    debiased bfloat16 momentum (none when `momentum` is 0), plus decoupled weight decay, all times the schedule.
    No parameter-scale multiplication: the update RMS is ~lr for every kernel, zero-initialised or not."""
    parts = [
        optax.scale_by_factored_rms(decay_rate=decay_rate),
        optax.clip_by_block_rms(1.0),
    ]
    if momentum:  # a full-size state (in bfloat16): the structure of the optimizer state depends on it
        parts.append(optax.ema(momentum, debias=True, accumulator_dtype=jnp.bfloat16))
    parts += [optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train_cfg)
    if train_cfg.optimizer == "adamw":
        opt = optax.adamw(
            schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=1e-8, weight_decay=train_cfg.weight_decay
        )
    elif train_cfg.optimizer == "adafactor":
        opt = adafactor(schedule, momentum=float(train_cfg.adafactor_momentum), weight_decay=train_cfg.weight_decay)
    else:
        raise ValueError(f"config.train.optimizer={train_cfg.optimizer!r} is not one of {OPTIMIZERS}")
    return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)), opt)
