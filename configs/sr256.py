"""The paper's 64->256 super-resolution stage (Imagen appendix B.1 / F.2): an Efficient U-Net, 600M parameters.

Trains on 256x256 images with their 64x64 downsampled versions as (noise-augmented) conditioning:
python train.py --config configs/sr256.py --workdir gs://BUCKET/sr256 \
    --config.data.train_shards='gs://BUCKET/cc12m/{00000..01242}.tfrecord' --config.text.encoder=/path/to/t5-v1_1-xxl
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config("efficient_unet")
    c.data.image_size = 256
    c.data.min_image_size = 256  # an SR stage must not learn to reproduce upscaling blur
    c.data.crop_size = 0  # whole images
    # T5 in the step encodes each batch at the smallest of these (or 128) that holds the global batch's longest
    # caption, for one compile per length met: batches of short captions (fine-tuning) gain most
    c.text.buckets = (16, 32, 64)
    # 606.1M parameters with T5-XXL text (4096 wide; tests/test_efficient_unet.py counts them with
    # nnx.eval_shape; the paper says 600M). imagen_jax/models/efficient_unet.py documents the
    # architecture; the count rests on: the paper's widths 128/256/512/1024 and res blocks 2/4/8/8 per
    # level, mirrored on the way up (BigGAN/ADM res blocks, two 3x3 convs + FiLM from a 4*dim = 512 wide
    # embedding); one skip per level, concatenated (so the first up block of each level but the lowest
    # takes 2x width through a 1x1 skip conv); stride-2 conv down / nearest + conv up that change width;
    # after each of the 16 lowest-level res blocks a transformer layer: self-attention (4 C^2), text
    # cross-attention from a 128-wide projected context (2 C^2 + 2*128*C) and a feed-forward of
    # ffn_mult=2 (4 C^2), C = 1024. Without the feed-forward the model has 539M (10.2% under 600M).
    c.model.dim = 128
    c.model.channel_mults = (1, 2, 4, 8)
    c.model.num_res_blocks = (2, 4, 8, 8)
    c.model.self_attention = True
    c.model.cross_attention = True
    c.model.ffn_mult = 2
    c.model.head_dim = 128  # 8 heads at the 1024-wide lowest level, as in the paper
    c.model.dropout = 0.0
    c.model.lowres_size = 64
    c.train.optimizer = "adamw"  # the paper trains the SR stages with Adam
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10_000
    c.train.batch_size = 2048
    c.train.num_steps = 2_500_000
    c.mesh.fsdp = -1  # shard params + optimizer state over the slice
    c.mesh.data = 1
    return c
