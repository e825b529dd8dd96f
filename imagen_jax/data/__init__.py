"""Input data: shard listing (`shards`), the tf.data pipeline (`pipeline`), the synthetic demo set (`demo`),
synthetic benchmark shards (`synthetic`), webdataset conversion (`convert_shards`), precomputed T5 embeddings
(`encode_text`).

Submodules are imported explicitly (`from imagen_jax.data.pipeline import make_dataset`) so that code which
only needs the demo classifiers does not pay for importing TensorFlow.
"""
