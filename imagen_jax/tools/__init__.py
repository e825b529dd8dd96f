"""Command lines (`python -m imagen_jax.tools.NAME`): demo, eval_demo, bench, sampler_bench, export,
convert_shards, encode_text. Each parses its arguments before importing JAX or TensorFlow and ends an error
with one line (`imagen_jax.cli`)."""
