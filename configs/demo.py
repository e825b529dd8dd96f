"""The CPU demo: a tiny text-to-image model on the built-in coloured-shapes data (minutes on 2 cores).

`python -m imagen_jax.tools.demo --workdir runs/demo` writes the data and a tiny random T5 into the
workdir, sets data.train_shards and text.encoder to them, trains with this config, samples and scores.
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config()
    c.text.max_length = 16
    c.text.dtype = "float32"
    c.data.image_size = 16
    c.data.shuffle_buffer = 2_000
    c.model.dim = 32
    c.model.channel_mults = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.head_dim = 16
    c.model.dropout = 0.0
    # v-prediction: with eps-prediction this tiny, briefly trained model drew washed-out colours (70% colour
    # accuracy guided, 44% unguided, vs 100% / 100% with v; same data and steps): eps -> x0 divides the
    # prediction error by alpha, which is ~0 at high noise, where a 16x16 image's colours are decided.
    c.diffusion.objective = "v"
    c.mesh.replicate_below = 0  # every parameter split over the mesh: tests shard this tiny model on fake devices
    c.train.batch_size = 32
    c.train.num_steps = 1600
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.end_lr_fraction = 0.1
    c.train.ema_decay = 0.995
    c.train.compute_dtype = "float32"
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0
    c.train.sample_steps = 64
    c.train.sample_guidance_scale = 3.0
    c.train.sample_prompts = ("a red circle on the left", "a blue square at the top", "a green triangle in the middle")
    return c
