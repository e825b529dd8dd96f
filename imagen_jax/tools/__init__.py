"""Command lines (`python -m imagen_jax.tools.NAME`): demo, eval_demo, bench, sampler_bench, export,
convert_shards, convert_t5, encode_text, plan, convert_inception, fid_reference, evaluate, compare. Each parses
its arguments before importing JAX or TensorFlow and ends an error with one line (`imagen_jax.cli`)."""
