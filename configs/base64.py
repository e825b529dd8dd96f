"""The paper's 64x64 base model (Imagen appendix F): 2.0B parameters, T5-XXL text (4096-wide embeddings).

Train on a TPU pod: python train.py --config configs/base64.py --workdir gs://BUCKET/base64 \
    --config.data.train_shards='gs://BUCKET/cc12m/{00000..01242}.tfrecord' --config.text.encoder=/path/to/t5-v1_1-xxl

T5-XXL in the step or precomputed? Its forward is 1.19 TFLOP per 128-token caption (9.3 GFLOP per token
through its 24 layers; the tools.bench --t5 test checks this way of counting on a small shape) beside 4.15 TFLOP
for the U-Net's train step per image (README benchmarks): 22% of the step, every epoch. Embeddings precomputed
once (tools.encode_text, then data.precomputed_text=True) remove it after the first epoch, at 1 MiB of storage
per caption (128 x 4096 bfloat16: ~12 TiB for CC12M) and 2 GiB read per step of 2048: worth it when training
runs several epochs and the storage and input bandwidth are there; the planner shows both set-ups
(--config.data.precomputed_text=True).
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config()
    c.text.max_length = 128
    # T5 in the step encodes each batch at the smallest of these (or 128) that holds the global batch's longest
    # caption, for one compile per length met: batches of short captions (fine-tuning) gain most
    c.text.buckets = (16, 32, 64)
    c.data.image_size = 64
    c.data.min_image_size = 64  # no upscaled thumbnails
    # 2.118e9 parameters (tests/test_unet.py counts them with jax.eval_shape; the paper says 2B). The count
    # rests on: ADM blocks (3 res blocks down, 4 up per level, one res-attn-res middle block); plain
    # stride-2 conv downsample / nearest+conv upsample (BigGAN resampling res blocks would add ~130M);
    # conditioning embedding 4*dim = 2048 wide; self-attention and text cross-attention as separate
    # residual blocks at 32/16/8 with heads of 64 channels and no FFN; T5-XXL tokens (4096) projected
    # to dim and attention-pooled into the embedding.
    c.model.dim = 512
    c.model.channel_mults = (1, 2, 3, 4)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (32, 16, 8)
    c.model.head_dim = 64
    c.model.dropout = 0.1
    c.train.batch_size = 2048
    c.train.num_steps = 2_500_000
    c.train.optimizer = "adafactor"  # the paper's choice for the base model
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10_000
    # Every U-Net block recomputed in the backward pass: the planner's figure for v4-512 (256 chips, 8 images each,
    # T5-XXL in the step) is 6.7 GiB per chip of 32 (README, "Will it fit?").
    c.train.remat = "block"
    c.mesh.fsdp = -1  # 2B params + optimizer state: shard them over the whole slice
    c.mesh.data = 1
    return c
