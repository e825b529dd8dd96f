"""Defaults shared by every stage's config; each configs/<stage>.py starts from `base_config()`.

Every field is documented here once; stage configs only change values.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init, diffusion noise, data order and sample noise all derive from it

    c.text = ml_collections.ConfigDict()
    c.text.encoder = ""  # Hugging Face T5 folder: config.json, model.safetensors (or index), spiece.model
    c.text.max_length = 128  # tokens per caption (EOS included); longer captions are truncated
    c.text.dtype = "bfloat16"  # T5 compute dtype: float32 | bfloat16

    c.data = ml_collections.ConfigDict()
    c.data.train_shards = ""  # glob, brace pattern ({00000..01242}.tfrecord), list, comma list or .txt list file; local or gs://
    c.data.format = "tfrecord"  # img2dataset TFRecord shards (webdataset .tar: convert with tools.convert_shards)
    c.data.image_size = 64  # the stage's output resolution (short side resized to it, centre crop)
    c.data.crop_size = 0  # SR stages trained on random crops (0 = no crop)
    c.data.precomputed_text = False  # read T5 embeddings written by tools.encode_text instead of running T5
    c.data.shuffle_buffer = 10_000  # undecoded records held for shuffling, per process (memory: x record size)
    c.data.num_parallel_calls = -1  # decode/resize parallelism; -1 = tf.data AUTOTUNE
    # Filters; a rejected record is skipped and counted per reason in the training log (data/skipped_*).
    c.data.min_image_size = 0  # min short side of the ORIGINAL image (img2dataset original_width/height), px
    c.data.max_aspect_ratio = 0.0  # max long/short side ratio of the original image (0 = no limit)
    c.data.min_caption_chars = 1  # shorter captions are skipped (1 drops empty captions)
    c.data.max_caption_chars = 0  # longer captions are skipped (0 = no limit; T5 truncates at text.max_length)
    c.data.require_success_status = True  # skip records whose img2dataset `status` is present and not "success"

    c.model = ml_collections.ConfigDict()  # the U-Net (imagen_jax/models/unet.py documents the architecture)
    c.model.kind = "unet"  # unet (base stage) | efficient_unet (super-resolution stages; own fields, see configs/sr256.py)
    c.model.dim = 128  # channel width of the first level
    c.model.channel_mults = (1, 2, 3, 4)  # width multiplier per level; each level halves the resolution
    c.model.num_res_blocks = 2  # residual blocks per level (down path; the up path has one more, as in ADM)
    c.model.attn_resolutions = (16, 8)  # feature-map sizes with self-attention + text cross-attention
    c.model.head_dim = 64  # channels per attention head (heads = width / head_dim)
    c.model.dropout = 0.0  # dropout in residual blocks while training
    c.model.in_channels = 3
    c.model.out_channels = 3

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # log-SNR schedule: cosine | linear
    c.diffusion.objective = "eps"  # what the U-Net predicts: eps | v
    c.diffusion.cond_drop_prob = 0.1  # captions replaced by the learned null text (classifier-free guidance)
    c.diffusion.thresholding = "dynamic"  # x0 thresholding when sampling: dynamic | static | none
    c.diffusion.dynamic_threshold_percentile = 0.995  # the paper's dynamic thresholding percentile

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2048  # global batch, split over processes and data-parallel devices
    c.train.num_steps = 2_500_000
    c.train.optimizer = "adamw"  # adamw | adafactor
    c.train.learning_rate = 1e-4  # peak, after linear warm-up
    c.train.warmup_steps = 10_000
    c.train.end_lr_fraction = 0.0  # cosine decay ends at learning_rate * end_lr_fraction at num_steps
    c.train.weight_decay = 0.0
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.grad_clip_norm = 1.0  # global gradient-norm clipping
    c.train.ema_decay = 0.9999  # EMA of the weights (warmed up as (1+step)/(10+step)); samples use it
    c.train.compute_dtype = "bfloat16"  # U-Net activations: float32 | bfloat16 (params stay float32)
    c.train.log_every = 100  # steps between console/TensorBoard metrics
    c.train.checkpoint_every = 5_000  # steps between checkpoints
    c.train.keep_checkpoints = 3  # newest checkpoints kept
    # Steps with a non-finite loss/gradient/update leave params, EMA and optimizer moments unchanged; this many
    # in a row stop the run with a checkpoint of the last good state (0 = never stop).
    c.train.max_consecutive_nonfinite = 20
    c.train.sample_every = 10_000  # steps between sample grids (0 = never)
    c.train.sample_steps = 128  # sampler steps for those grids
    c.train.sample_guidance_scale = 5.0
    c.train.sample_prompts = (
        "a photograph of a red apple on a wooden table",
        "a watercolor painting of a lighthouse at sunset",
        "a corgi wearing sunglasses on the beach",
        "a bowl of ramen, studio lighting",
    )

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel replicas (-1 = all remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3 style); batch is split over data x fsdp
    c.mesh.tensor = 1  # tensor (model) parallelism over channels
    # Logical parameter axis -> mesh axis (or None = replicated). A dim the mesh axis does not divide stays replicated.
    c.mesh.rules = (
        ("channels_out", "fsdp"),
        ("channels_in", None),
        ("conv_h", None),
        ("conv_w", None),
        ("text_embed", None),
    )
    return c
