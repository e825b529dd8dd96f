"""Fine-tuning DeepFloyd IF-II-L (the 64->256 super-resolution stage, 1.2B parameters, T5-v1.1-XXL text) from its
published weights: the architecture and IF's diffusion recipe are the folder's (stage/if_folder.py).

python train.py --config configs/if_ii_l.py --workdir gs://BUCKET/if_ii_l_ft \
    --config.train.init_from=/path/to/IF-II-L-v1.0 --config.text.encoder=/path/to/IF-I-XL-v1.0/text_encoder \
    --config.data.train_shards='gs://BUCKET/mine/*.tfrecord'

IF-II ships no text encoder: name the T5 (IF-I's text_encoder/, or t5-v1_1-xxl). Each image is trained with its
64x64 downsampled version, upscaled as IF's pipeline does and noise-augmented at a random level. Plan it with
python -m imagen_jax.tools.plan --config configs/if_ii_l.py --topology v4-8 (no weights are read).
"""

from imagen_jax.models import if_unet
from imagen_jax.stage.if_folder import recipe_config


def get_config():
    model = if_unet.default_config()  # IF-I-XL's, changed below to IF-II-L's unet/config.json
    model.in_channels = 6
    model.block_out_channels = (160, 320, 640, 960, 1280)
    model.layers_per_block = (2, 2, 3, 5, 5)
    model.down_block_types = (if_unet.RESNET_DOWN,) * 3 + (if_unet.ATTN_DOWN,) * 2
    model.up_block_types = (if_unet.ATTN_UP,) * 2 + (if_unet.RESNET_UP,) * 3
    model.cross_attention_dim = 1280
    model.class_embed_type = "timestep"
    model.only_cross_attention = (False,) * 5
    model.resnet_skip_time_act = True
    model.resnet_out_scale_factor = 1 / 0.7071
    model.mid_block_scale_factor = 1 / 0.7071
    model.time_embedding_dim = 1280
    model.time_embedding_act_fn = "gelu"
    c = recipe_config(model, 256, sample_max_value=1.0)
    c.data.min_image_size = 256  # an SR stage must not learn to reproduce upscaling blur
    c.train.batch_size = 64
    c.train.num_steps = 10_000
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.checkpoint_every = 1_000
    c.train.sample_every = 1_000
    c.train.remat = "block"
    c.mesh.fsdp = -1
    c.mesh.data = 1
    return c
