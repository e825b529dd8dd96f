"""A mini 256->1024 super-resolution stage for one TPU VM (v4-8 or v5e-8): configs/sr1024.py's Efficient U-Net at half
width on T5-XL text, trained on 256x256 crops, global batch 128. Plan it with `python -m imagen_jax.tools.plan
--config configs/mini_sr1024.py --topology v5e-8 --t5 xl`.

python train.py --config configs/mini_sr1024.py --workdir gs://BUCKET/mini_sr1024 \
    --config.data.train_shards='gs://BUCKET/hires/{00000..09999}.tfrecord' --config.text.encoder=/path/to/t5-v1_1-xl
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config("efficient_unet")
    c.data.image_size = 1024
    c.data.min_image_size = 1024
    c.data.crop_size = 256
    # T5 in the step encodes each batch at the smallest of these (or 128) that holds the global batch's longest
    # caption, for one compile per length met: batches of short captions (fine-tuning) gain most
    c.text.buckets = (16, 32, 64)
    # 95.7M parameters with T5-XL text (tests/test_config.py counts them): sr1024's levels and blocks (text
    # cross-attention only at the lowest level) at dim 64 (widths 64/128/256/512), heads of 64 channels.
    c.model.dim = 64
    c.model.channel_mults = (1, 2, 4, 8)
    c.model.num_res_blocks = (2, 4, 8, 6)
    c.model.self_attention = False
    c.model.cross_attention = True
    c.model.ffn_mult = 0
    c.model.head_dim = 64
    c.model.dropout = 0.0
    c.model.lowres_size = 256
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10_000
    c.train.batch_size = 128
    c.train.num_steps = 500_000
    c.mesh.fsdp = -1
    c.mesh.data = 1
    return c
