"""The paper's 256->1024 super-resolution stage (Imagen appendix B.1 / F.2): an Efficient U-Net, 400M parameters.

No self-attention (keeps text cross-attention), so the model is fully convolutional apart from attention over
text: it trains on random 256x256 crops of 1024x1024 images (with the matching 64x64 crops of their 256x256
downsampled versions) and samples at 1024x1024.
python train.py --config configs/sr1024.py --workdir gs://BUCKET/sr1024 \
    --config.data.train_shards='gs://BUCKET/hires/{00000..09999}.tfrecord' --config.text.encoder=/path/to/t5-v1_1-xxl
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config("efficient_unet")
    c.data.image_size = 1024
    c.data.min_image_size = 1024  # an SR stage must not learn to reproduce upscaling blur
    c.data.crop_size = 256  # trained on 256x256 crops, run at 1024x1024
    # T5 in the step encodes each batch at the smallest of these (or 128) that holds the global batch's longest
    # caption, for one compile per length met: batches of short captions (fine-tuning) gain most
    c.text.buckets = (16, 32, 64)
    # 382.5M parameters with T5-XXL text (4096 wide; tests/test_efficient_unet.py counts them with
    # nnx.eval_shape; the paper says 400M). Same architecture as configs/sr256.py (see its count notes)
    # without self-attention and feed-forward: after each lowest-level res block only text cross-attention.
    # With the paper's 2/4/8/8 blocks this has 471.7M (18% over 400M; the paper does not give the 1024
    # model's blocks), so the lowest level has 6 res blocks each way (every lowest-level block pair is
    # 44.6M; 7 would give 427.1M).
    c.model.dim = 128
    c.model.channel_mults = (1, 2, 4, 8)
    c.model.num_res_blocks = (2, 4, 8, 6)
    c.model.self_attention = False
    c.model.cross_attention = True
    c.model.ffn_mult = 0
    c.model.head_dim = 128  # 8 heads at the 1024-wide lowest level, as in the paper
    c.model.dropout = 0.0
    c.model.lowres_size = 256
    c.train.optimizer = "adamw"  # the paper trains the SR stages with Adam
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10_000
    c.train.batch_size = 2048
    c.train.num_steps = 2_500_000
    c.mesh.fsdp = -1  # shard params + optimizer state over the slice
    c.mesh.data = 1
    return c
