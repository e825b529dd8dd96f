"""Training one stage: the set-up call (`setup`), train state, jitted step, loop, optimizer, preemption, metrics.

Checkpoints, the model and sampling live in `imagen_jax.stage`, below this package, so sampling never imports it.
"""
