"""A mini 64->256 super-resolution stage for one TPU VM (v4-8 or v5e-8): configs/sr256.py's Efficient U-Net at half
width (151.7M parameters) on T5-XL text, global batch 128. Plan it with `python -m imagen_jax.tools.plan --config
configs/mini_sr256.py --topology v5e-8 --t5 xl`.

python train.py --config configs/mini_sr256.py --workdir gs://BUCKET/mini_sr256 \
    --config.data.train_shards='gs://BUCKET/cc12m/{00000..01242}.tfrecord' --config.text.encoder=/path/to/t5-v1_1-xl
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config("efficient_unet")
    c.data.image_size = 256
    c.data.min_image_size = 256
    c.data.crop_size = 0
    # T5 in the step encodes each batch at the smallest of these (or 128) that holds the global batch's longest
    # caption, for one compile per length met: batches of short captions (fine-tuning) gain most
    c.text.buckets = (16, 32, 64)
    # 151.7M parameters with T5-XL text (tests/test_config.py counts them): sr256's levels, blocks, attention
    # and feed-forward at dim 64 (widths 64/128/256/512), heads of 64 channels.
    c.model.dim = 64
    c.model.channel_mults = (1, 2, 4, 8)
    c.model.num_res_blocks = (2, 4, 8, 8)
    c.model.self_attention = True
    c.model.cross_attention = True
    c.model.ffn_mult = 2
    c.model.head_dim = 64
    c.model.dropout = 0.0
    c.model.lowres_size = 64
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10_000
    c.train.batch_size = 128
    c.train.num_steps = 500_000
    # 16 images per chip of a v5e-8 at once need 15.8 of its 16 GiB (planner, README "Will it fit?"): two
    # micro-batches of 8 leave room, for no extra FLOPs.
    c.train.microbatches = 2
    c.mesh.fsdp = -1
    c.mesh.data = 1
    return c
