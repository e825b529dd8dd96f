"""The CPU demo's super-resolution stage: 16x16 -> 32x32 on the built-in coloured-shapes data.

`python -m imagen_jax.tools.demo` trains it after the base stage (configs/demo.py) on the same shards and
T5, then samples the cascade. Same Efficient U-Net as configs/sr256.py, tiny.
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config("efficient_unet")
    c.text.max_length = 16
    c.text.dtype = "float32"
    c.data.image_size = 32
    c.data.shuffle_buffer = 2_000
    c.model.dim = 32
    c.model.channel_mults = (1, 2)
    c.model.num_res_blocks = (1, 2)
    c.model.self_attention = False
    c.model.cross_attention = True
    c.model.ffn_mult = 0
    c.model.head_dim = 16
    c.model.dropout = 0.0
    c.model.in_channels = 3
    c.model.out_channels = 3
    c.model.lowres_size = 16
    c.model.full_res_first_level = True  # residual blocks at 32x32 too: a tiny model needs them to remove fine noise
    c.diffusion.objective = "v"  # as configs/demo.py
    # Fidelity at this budget (500 steps; tools.eval_demo, output downsampled vs its input): training augmentation
    # times from U(0, 1) as in the paper gave 25.7 dB, U(0, 0.5) 27.8 dB, U(0, 0.3) 28.9 dB; sampling that model
    # at noise level 0.1 instead of 0.2 gives 30.7 dB (the paper's range is 0.1-0.3).
    c.diffusion.sr_train_noise_max = 0.3
    c.diffusion.sr_noise_level = 0.1
    # Unguided SR needs no dynamic thresholding, which rescales every pixel towards grey whenever 0.5% of them
    # overshoot [-1, 1]: dark images came out brighter (+1.4 grey levels here, ~8 on black-background digits).
    c.diffusion.thresholding = "static"
    c.mesh.replicate_below = 0  # every parameter split over the mesh: tests shard this tiny model on fake devices
    c.train.batch_size = 16
    c.train.num_steps = 500
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 50
    c.train.end_lr_fraction = 0.1
    c.train.ema_decay = 0.99
    c.train.compute_dtype = "float32"
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.sample_every = 0
    c.train.sample_steps = 32
    c.train.sample_guidance_scale = 1.0
    c.train.sample_prompts = ()
    return c
