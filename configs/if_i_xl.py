"""Fine-tuning DeepFloyd IF-I-XL (the 64x64 base stage, 4.3B parameters, T5-v1.1-XXL text) from its published
weights: the architecture and IF's diffusion recipe are the folder's (stage/if_folder.py), the rest is the run's.

python train.py --config configs/if_i_xl.py --workdir gs://BUCKET/if_i_xl_ft \
    --config.train.init_from=/path/to/IF-I-XL-v1.0 --config.data.train_shards='gs://BUCKET/mine/*.tfrecord'

The T5 is the folder's text_encoder/ unless config.text.encoder names another. Plan it before renting the slice:
python -m imagen_jax.tools.plan --config configs/if_i_xl.py --topology v4-8 (no weights are read: the
architecture here is IF-I-XL's unet/config.json). The training settings are a starting point for fine-tuning
(a few thousand steps at a small learning rate), not IF's pre-training recipe, which is unpublished.
"""

from imagen_jax.models import if_unet
from imagen_jax.stage.if_folder import recipe_config


def get_config():
    c = recipe_config(if_unet.default_config(), 64, sample_max_value=1.5)  # IF-I-XL's U-Net and scheduler
    c.data.min_image_size = 64
    c.train.batch_size = 64
    c.train.num_steps = 10_000
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999  # a horizon of ~1000 steps, inside a short fine-tuning run
    c.train.checkpoint_every = 1_000
    c.train.sample_every = 1_000
    c.train.remat = "block"
    c.mesh.fsdp = -1  # 4.3B parameters, their EMA and Adam's moments: split over the whole slice
    c.mesh.data = 1
    return c
