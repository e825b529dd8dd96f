"""The optimizer: linear warm-up + cosine decay, gradient-norm clipping, AdamW or Adafactor (paper: base)."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adamw", "adafactor")


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine to end_lr_fraction * learning_rate at num_steps."""
    warmup = min(int(train_cfg.warmup_steps), int(train_cfg.num_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(train_cfg.learning_rate),
        warmup_steps=warmup,
        decay_steps=max(int(train_cfg.num_steps), warmup + 1),
        end_value=float(train_cfg.learning_rate) * float(train_cfg.end_lr_fraction),
    )


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train_cfg)
    if train_cfg.optimizer == "adamw":
        opt = optax.adamw(
            schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=1e-8, weight_decay=train_cfg.weight_decay
        )
    elif train_cfg.optimizer == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=train_cfg.weight_decay or None)
    else:
        raise ValueError(f"config.train.optimizer={train_cfg.optimizer!r} is not one of {OPTIMIZERS}")
    return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)), opt)
