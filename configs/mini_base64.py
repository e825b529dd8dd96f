"""A mini base model for one TPU VM (v4-8 or v5e-8): the paper's 64x64 U-Net at half width (402M parameters) on
T5-XL text (2048-wide embeddings), global batch 256. `python -m imagen_jax.tools.plan --config
configs/mini_base64.py --topology v5e-8 --t5 xl` gives its memory and speed (README, "Will it fit?").

python train.py --config configs/mini_base64.py --workdir gs://BUCKET/mini_base64 \
    --config.data.train_shards='gs://BUCKET/cc12m/{00000..01242}.tfrecord' --config.text.encoder=/path/to/t5-v1_1-xl
"""

from imagen_jax.stage.config import base_config


def get_config():
    c = base_config()
    c.text.max_length = 128
    # T5 in the step encodes each batch at the smallest of these (or 128) that holds the global batch's longest
    # caption, for one compile per length met: batches of short captions (fine-tuning) gain most
    c.text.buckets = (16, 32, 64)
    c.data.image_size = 64
    c.data.min_image_size = 64
    # 401.7M parameters with T5-XL text (tests/test_config.py counts them): configs/base64.py's layout at
    # dim 256 with 2 res blocks per level instead of 3 (2.1B at dim 512 and 3).
    c.model.dim = 256
    c.model.channel_mults = (1, 2, 3, 4)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (32, 16, 8)
    c.model.head_dim = 64
    c.model.dropout = 0.1
    c.train.batch_size = 256
    c.train.num_steps = 500_000
    c.train.optimizer = "adafactor"
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 10_000
    c.mesh.fsdp = -1  # params and optimizer state sharded over the VM's chips
    c.mesh.data = 1
    return c
