"""Every config field, documented once, with its default; and the checks that a stage's config makes sense.

`configs/<experiment>.py` files start from `base_config(kind)` and change values only. The model's fields
come from its kind (`imagen_jax/models/unet.py`, `efficient_unet.py` define and document them), so a config
never deletes fields that belong to another architecture. A config saved by an older version of this code
is completed with the defaults of fields added since (`complete`), so old checkpoints and exports load.
"""

from __future__ import annotations

import ml_collections

from imagen_jax.diffusion import OBJECTIVES, SCHEDULES, THRESHOLD_MODES, VARIANCE_LOSSES, VARIANCES
from imagen_jax.errors import ConfigError
from imagen_jax.models.layers import ATTENTION_KINDS, AUTO_ATTENTION, REMAT_POLICIES
from imagen_jax.stage import lora
from imagen_jax.stage.model import DTYPES, MODEL_KINDS, model_kind


def base_config(kind: str = "unet") -> ml_collections.ConfigDict:
    """The defaults of every field, with `config.model` of the given model kind (see MODEL_KINDS)."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model kind {kind!r} is not one of {sorted(MODEL_KINDS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init, diffusion noise, data order and sample noise all derive from it

    c.text = ml_collections.ConfigDict()
    c.text.encoder = ""  # Hugging Face T5 folder: config.json, model.safetensors (or index), tokenizer files
    c.text.max_length = 128  # tokens per caption (EOS included); longer captions are truncated
    c.text.dtype = "bfloat16"  # T5 compute dtype: float32 | bfloat16
    c.text.lowercase = False  # captions lower-cased and stripped before tokenizing (DeepFloyd IF's preprocessing)
    # Token buckets for the T5 in the train step: () = every batch at max_length; else increasing lengths up to
    # max_length (itself the last bucket, implicitly): each batch is cut to the smallest bucket that holds the
    # longest caption of the global batch (EOS included), so T5 encodes the tokens there are, for one compile of the
    # step per bucket used (train/buckets.py). The same loss: the padding is masked (IF's U-Net, which attends to
    # it, refuses buckets). Precomputed text (data.precomputed_text) is read at max_length, unaffected.
    c.text.buckets = ()

    c.data = ml_collections.ConfigDict()
    c.data.train_shards = (
        ""  # glob, brace pattern ({00000..01242}.tfrecord), list, comma list or .txt list file; local or gs://
    )
    # DreamBooth's class images (tools.dreambooth writes them): shards mixed into every batch, half of it, beside
    # train_shards' instance images, each stream resumed at its own position; "" = none.
    c.data.prior_shards = ""
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

    # The U-Net: unet (base stage) | efficient_unet (super-resolution stages); fields documented in
    # imagen_jax/models/unet.py and imagen_jax/models/efficient_unet.py.
    c.model = MODEL_KINDS[kind].default_config()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # log-SNR schedule: cosine | linear | discrete_cosine (DeepFloyd IF's 1000 steps)
    c.diffusion.objective = "eps"  # what the U-Net predicts: eps | v
    c.diffusion.cond_drop_prob = 0.1  # captions replaced by the learned null text (classifier-free guidance)
    c.diffusion.thresholding = "dynamic"  # x0 thresholding when sampling: dynamic | static | none
    c.diffusion.dynamic_threshold_percentile = 0.995  # the paper's dynamic thresholding percentile
    # Upper bound on dynamic thresholding's scale s (DeepFloyd IF's sample_max_value: 1.5 stage I, 1.0 stage II);
    # 0 = none (Imagen's).
    c.diffusion.threshold_max = 0.0
    # The ancestral sampler's variance: fixed_small (the posterior's) | learned_range (the model outputs 2 x 3
    # channels, the second half interpolating between log beta and the posterior's log variance: IF's).
    c.diffusion.variance = "fixed_small"
    # Training a learned variance (variance learned_range, a discrete schedule): none (the eps MSE alone; the
    # variance channels get no gradient of their own and drift as the shared layers move) | vlb (improved DDPM's
    # hybrid loss: + variance_loss_weight x the variational bound, the mean's gradient stopped; IF's stages).
    c.diffusion.variance_loss = "none"
    c.diffusion.variance_loss_weight = 0.001
    # DPM-Solver++'s grid starts at this log-SNR (alpha = 0.0067 at -10), not at the schedule's clamp (-20),
    # where a third of its model calls changed nothing.
    c.diffusion.dpm_start_log_snr = -10.0
    # SR stages: noise-augmentation time of the low-res input when sampling (training grids and sample.py's
    # default), in [0, 1]; the paper samples with ~0.1-0.3. Base stages ignore it.
    c.diffusion.sr_noise_level = 0.2
    # SR stages, training: augmentation times are drawn from U(0, sr_train_noise_max) (the paper: U(0, 1)). Lower
    # spends a short run on the levels sampling uses (at 1.0, half the examples' low-res input is mostly noise).
    c.diffusion.sr_train_noise_max = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2048  # global batch, split over processes and data-parallel devices
    # Fine-tuning: start from a trained stage's weights instead of a random initialisation: a training workdir (its
    # latest checkpoint, or WORKDIR:STEP), an export folder, or a DeepFloyd IF pipeline folder (whose model, diffusion
    # and text settings then replace the config's: train/init_from.py). Fresh optimizer, step 0, EMA = the loaded
    # weights. Read only when the workdir has no checkpoint yet (a resumed run logs that it is ignored).
    c.train.init_from = ""
    # init_from's EMA weights (True) or its raw training params (False: a training workdir only; exports and IF
    # folders hold EMA weights alone).
    c.train.init_from_ema = True
    # Train a subset: regular expressions over parameter paths ('/'-joined keys of the params dict, as exports name
    # tensors: 'down/0/1/cross_attn/q/kernel'; re.search, so a pattern matches anywhere). Only matching parameters
    # get gradients, optimizer state and updates; () = all (with LoRA: the adapters, plus what these match).
    c.train.trainable = ()
    # LoRA: rank of the low-rank adapters beside the lora_targets kernels (0 = off; needs train.init_from, the base
    # whose weights stay frozen); the adapters are scaled by lora_alpha / lora_rank (stage/lora.py).
    c.train.lora_rank = 0
    c.train.lora_alpha = 1.0
    # Regular expressions over kernel paths that get adapters (default: attention q/k/v/out, IF's add_k/add_v and
    # the feed-forward linears; add r'res/conv[12]/kernel$' for the residual blocks' 3x3 convolutions).
    c.train.lora_targets = lora.DEFAULT_TARGETS
    # DreamBooth's prior-preservation weight lambda (with data.prior_shards): the loss is mean(instance loss) +
    # lambda * mean(class loss), over the batch's two halves; 0 trains on the instance images alone.
    c.train.prior_loss_weight = 1.0
    c.train.num_steps = 2_500_000
    c.train.optimizer = "adamw"  # adamw | adafactor
    c.train.learning_rate = 1e-4  # peak, after linear warm-up
    c.train.warmup_steps = 10_000
    c.train.end_lr_fraction = 0.0  # cosine decay ends at learning_rate * end_lr_fraction at num_steps
    c.train.weight_decay = 0.0  # decoupled, times the schedule (AdamW's; Adafactor's here too)
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adafactor_momentum = 0.9  # Adafactor: debiased bfloat16 momentum (0 = none, no full-size state)
    c.train.grad_clip_norm = 1.0  # global gradient-norm clipping
    c.train.ema_decay = 0.9999  # EMA of the weights (warmed up as (1+step)/(10+step)); samples use it
    c.train.compute_dtype = "bfloat16"  # U-Net activations: float32 | bfloat16 (params stay float32)
    # What the backward pass recomputes instead of keeping: none | block (every U-Net block: least memory,
    # ~1/3 more FLOPs) | block_save_dots (blocks, keeping matmul outputs) | attention (attention layers only).
    c.train.remat = "none"
    # How attention is computed (here and when this stage samples): dot_product (jax.nn.dot_product_attention,
    # all [heads, queries, keys] logits at once) | chunked (queries in blocks of attention_chunk, each recomputed
    # in the backward pass: a block's logits instead of all of them, for one more attention forward) | flash (on
    # TPU the Pallas flash-attention kernel, per device: no logits in memory and no second forward; 'chunked'
    # on other platforms) | auto (the fastest measured where the step runs, read from the mesh's devices: chunked
    # on a CPU, where base64-small's step ran 1.12x-1.70x faster; dot_product elsewhere, TPU included, until flash
    # is measured there). The planner resolves it for the TPU it compiles for.
    c.train.attention = "auto"
    c.train.attention_chunk = 256  # queries per block (chunked); 128 and 512 were 0.99x and 0.97x on a CPU
    # Gradient accumulation: the global batch in this many sequential parts per step (same update, a k-th of the
    # activations); batch_size must be divisible by microbatches x the data-parallel devices.
    c.train.microbatches = 1
    c.train.log_every = 100  # steps between console/TensorBoard metrics
    c.train.checkpoint_every = 5_000  # steps between checkpoints
    c.train.keep_checkpoints = 3  # newest checkpoints kept
    # JAX's persistent compilation cache (train/compile_cache.py): '' keeps it in <workdir>/compilation_cache (or in
    # JAX_COMPILATION_CACHE_DIR when that is set), a path or URL puts it there, 'off' turns it off. A restart then
    # loads the compiled programs instead of compiling.
    c.train.compilation_cache = ""
    # Steps with a non-finite loss/gradient/update leave params, EMA and optimizer moments unchanged; this many
    # in a row stop the run with a checkpoint of the last good state (0 = never stop).
    c.train.max_consecutive_nonfinite = 20
    c.train.sample_every = 10_000  # steps between sample grids (0 = never)
    c.train.sample_steps = 128  # sampler steps for those grids (and sample.py's default)
    c.train.sample_guidance_scale = 5.0  # guidance for those grids (and sample.py's default)
    c.train.sample_prompts = (  # base stages' grids; SR stages upsample the first images of the batch
        "a photograph of a red apple on a wooden table",
        "a watercolor painting of a lighthouse at sunset",
        "a corgi wearing sunglasses on the beach",
        "a bowl of ramen, studio lighting",
    )

    # Evaluation during training (base stages; tools.evaluate scores whole cascades): every `every` steps the
    # EMA weights sample `num_images` captions at each guidance scale, on all processes, and FID (and KID when the
    # reference keeps its features; CLIP score with a CLIP folder) go to TensorBoard as eval/fid_g<scale>, ...
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps between evaluations (0 = never)
    c.eval.num_images = 1000  # captions sampled per guidance scale (FID's bias grows as this shrinks)
    c.eval.guidance_scales = (3.0,)
    c.eval.captions = ""  # COCO captions JSON, a .txt file (one per line) or shards (eval/sources.py)
    c.eval.reference = ""  # reference statistics of real images at data.image_size (tools.fid_reference)
    c.eval.inception = ""  # FID Inception weights, .safetensors (tools.convert_inception)
    c.eval.clip = ""  # a Hugging Face CLIPModel folder for the CLIP score ("" = no CLIP score)
    c.eval.steps = 0  # sampler steps (0 = train.sample_steps)
    # images sampled and scored at once (global; split over the mesh), rounded up to a multiple of the data-parallel
    # devices (64 on 256 chips: 256 a batch)
    c.eval.batch_size = 64
    c.eval.seed = 0  # caption subset and sampling seeds: the same images at every evaluation

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel replicas (-1 = all remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3 style); batch is split over data x fsdp
    # Tensor (model) parallelism: each layer's inner width (a residual block's hidden channels, attention heads,
    # feed-forward and T5 widths) is split over this many devices, which compute their parts of it on the same
    # examples (parallel/activations.py); the parameters are split over it too (the rules below).
    c.mesh.tensor = 1
    # Logical parameter axis -> mesh axis, a tuple of mesh axes (the first free one that divides the dim), or None
    # (whole). Kernels are [..., channels_in, channels_out]: stored split over fsdp x tensor, gathered where they
    # are used, except along a layer's inner width ('inner': the output of a residual block's first conv, FiLM and
    # the attention/feed-forward input projections, the input of the layers that return to the block's width),
    # which stays split over tensor where it is used (Megatron's layout: one reduction over tensor per layer pair).
    c.mesh.rules = (
        # U-Net
        ("inner", "tensor"),
        ("channels_out", "fsdp"),
        ("channels_in", ("tensor", "fsdp")),
        ("conv_h", None),
        ("conv_w", None),
        ("text_embed", None),
        # Frozen T5 (imagen_jax/text/t5.py): d_model over fsdp, so T5-XXL is never a whole copy per device.
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads_x_dim", "tensor"),
        ("heads", None),
        ("vocab", "tensor"),
        ("relpos_buckets", None),
    )
    # Parameters with fewer elements than this are whole on every device: split over fsdp=256, a 512-wide bias is
    # 2 elements per chip, and each use a latency-bound collective. 65,536 float32 elements with their EMA and
    # Adam moments are 1 MiB per chip; the demo configs set 0 so their tiny models split every parameter.
    c.mesh.replicate_below = 65_536
    return c


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every field of `base_config(its model kind)` that it lacks added at its default, so a
    config saved before a field existed reads as it behaved then (fields it has keep their values)."""
    kind = config.get("model", {}).get("kind", "unet")
    defaults = base_config(kind if kind in MODEL_KINDS else "unet")

    def fill(node: ml_collections.ConfigDict, default: ml_collections.ConfigDict) -> None:
        with node.unlocked():
            for key, value in default.items():
                if key not in node:
                    node[key] = value
                elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
                    fill(node[key], value)

    fill(config, defaults)
    return config


def _choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(config: ml_collections.ConfigDict, key: str, minimum: float = 1) -> None:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"config.{key}={value!r} must be a number >= {minimum}")


def _get(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"config has no field {key!r}")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field that would make building or sampling the stage fail:
    choices (model kind, schedule, objective, thresholding, dtypes), sizes, and the model's own fields
    against the image size (e.g. attention at a resolution the U-Net does not have). Allocates nothing."""
    _choice(config, "diffusion.schedule", SCHEDULES)
    _choice(config, "diffusion.objective", OBJECTIVES)
    _choice(config, "diffusion.thresholding", THRESHOLD_MODES)
    _choice(config, "diffusion.variance", VARIANCES)
    _choice(config, "diffusion.variance_loss", VARIANCE_LOSSES)
    _positive(config, "diffusion.variance_loss_weight", minimum=0)
    _positive(config, "diffusion.threshold_max", minimum=0)
    _choice(config, "train.compute_dtype", tuple(DTYPES))
    _choice(config, "train.remat", tuple(REMAT_POLICIES))
    _choice(config, "train.attention", (*ATTENTION_KINDS, AUTO_ATTENTION))
    _positive(config, "train.attention_chunk")
    _choice(config, "text.dtype", tuple(DTYPES))
    _positive(config, "text.max_length")
    _positive(config, "data.image_size")
    _positive(config, "data.crop_size", minimum=0)
    for key in ("diffusion.cond_drop_prob", "diffusion.sr_noise_level", "diffusion.sr_train_noise_max"):
        value = _get(config, key)
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"config.{key}={value!r} must be in [0, 1]")
    kind = model_kind(config)
    try:
        kind.check_config(config.model, image_size=int(config.data.image_size))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{e} (data.image_size={config.data.image_size})") from None
    crop = int(config.data.crop_size)
    if crop:
        if crop > config.data.image_size:
            raise ConfigError(f"config.data.crop_size={crop} is larger than data.image_size={config.data.image_size}")
        if kind.super_resolution(config.model) and (crop * config.model.lowres_size) % config.data.image_size:
            raise ConfigError(
                f"config.data.crop_size={crop} has no whole low-res crop: crop_size * "
                f"model.lowres_size ({config.model.lowres_size}) must be divisible by data.image_size "
                f"({config.data.image_size})"
            )
