"""DeepFloyd IF's published cascade as imagen-jax stages: a diffusers pipeline folder read as a stage config and
its U-Net's weights, so IF-I and IF-II sample, evaluate, plan and fine-tune like the project's own stages.

A folder is what `IFPipeline.save_pretrained` writes (the hub's DeepFloyd/IF-I-XL-v1.0, IF-II-L-v1.0, ...):
`model_index.json`, `unet/` (config.json + diffusion_pytorch_model weights: safetensors or PyTorch .bin, single
or sharded, fp16 variants too; .bin is read as data, never unpickled), `scheduler/scheduler_config.json`, and
for stage I `text_encoder/` (T5-v1.1-XXL) + `tokenizer/`. What is read, and from where:

  config.model       unet/config.json (`models.if_unet.config_from_diffusers`; another architecture, e.g. a
                     Stable Diffusion U-Net, is a one-line error naming the field), kind 'if_unet';
  config.data        image_size = the U-Net's sample_size;
  config.text        encoder = the folder's text_encoder/ (none in IF-II: the cascade's first stage encodes the
                     prompts), 77 tokens, prompts lower-cased and stripped as diffusers does;
  config.diffusion   the scheduler's: 1000 discrete steps of the squared-cosine schedule, eps prediction, learned
                     variance (learned_range), IF's dynamic thresholding (0.95 quantile, clamped to
                     [1, sample_max_value]); SR stages augment their input at IF's noise level 250 (0.25);
  config.train       sample_steps / sample_guidance_scale: diffusers' pipeline defaults (stage I 100 steps at
                     guidance 7, stage II 50 at 4), which sample.py uses unless told otherwise.

The model's `null_text` parameter (IF's unconditional input: T5 states of the empty prompt) has no tensor in
the folder: `load_params` fills it from the encoder the caller gives, as diffusers encodes "" at every call.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import filesystem
from imagen_jax.errors import MissingError, StageError, WeightsError, first_line
from imagen_jax.models import if_unet
from imagen_jax.stage.config import base_config
from imagen_jax.text import T5Encoder
from imagen_jax.text.weight_files import DIFFUSERS_STEMS, WeightFolder

INDEX_FILE = "model_index.json"
# diffusers' IF pipelines: the text-to-image stage I and the super-resolution stage II, with their editing twins
# (same U-Nets, other inputs).
PIPELINES = (
    "IFPipeline",
    "IFImg2ImgPipeline",
    "IFInpaintingPipeline",
    "IFSuperResolutionPipeline",
    "IFImg2ImgSuperResolutionPipeline",
    "IFInpaintingSuperResolutionPipeline",
)
TEXT_LENGTH = 77  # diffusers' IF pipelines encode every prompt at 77 tokens, padding kept
SR_NOISE_LEVEL = 250  # IF-II's default augmentation of its input, of 1000 steps
SR_FACTOR = 4  # IF-II takes stage I's 64x64 images to 256x256
# diffusers' pipeline defaults: (sampling steps, guidance scale) for the base stage and the SR stage
SAMPLE_DEFAULTS = {False: (100, 7.0), True: (50, 4.0)}
# What the scheduler config must say for the sampler to be IF's: field -> accepted values.
SCHEDULER_FIELDS = {
    "num_train_timesteps": (1000,),
    "beta_schedule": ("squaredcos_cap_v2",),
    "prediction_type": ("epsilon",),
    "variance_type": ("learned_range",),
}


def is_if_folder(folder: str) -> bool:
    """Whether `folder` is a diffusers pipeline folder with a U-Net (its model_index.json names the pipeline)."""
    fs = filesystem.for_path(folder)
    return fs.exists(os.path.join(folder, INDEX_FILE)) and fs.exists(os.path.join(folder, "unet", "config.json"))


def _read_json(path: str) -> dict:
    fs = filesystem.for_path(path)
    if not fs.exists(path):
        raise MissingError(f"{path}: not found")
    try:
        with fs.GFile(path, "rb") as f:
            data = json.loads(f.read())
    except (*fs.errors, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"{path}: cannot be read as JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: not a JSON object")
    return data


def _scheduler_config(folder: str) -> dict:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler = _read_json(path)
    for field, accepted in SCHEDULER_FIELDS.items():
        if scheduler.get(field) not in accepted:
            raise StageError(
                f"{path}: {field} {scheduler.get(field)!r} is not supported (IF's scheduler has {accepted[0]!r})"
            )
    return scheduler


def if_config(folder: str) -> ml_collections.ConfigDict:
    """The stage config of the IF pipeline folder `folder` (see the module docstring for what comes from where)."""
    index_path = os.path.join(folder, INDEX_FILE)
    pipeline = _read_json(index_path).get("_class_name")
    if pipeline not in PIPELINES:
        raise StageError(
            f"{index_path}: _class_name {pipeline!r} is not a DeepFloyd IF pipeline ({', '.join(PIPELINES)})"
        )
    unet_path = os.path.join(folder, "unet", "config.json")
    try:
        model = if_unet.config_from_diffusers(_read_json(unet_path))
    except ValueError as e:
        raise StageError(f"{unet_path}: {first_line(e)}") from None
    scheduler = _scheduler_config(folder)
    size = int(_read_json(unet_path).get("sample_size") or (256 if if_unet.is_super_resolution(model) else 64))
    text_encoder = os.path.join(folder, "text_encoder")
    has_encoder = filesystem.for_path(text_encoder).exists(os.path.join(text_encoder, "config.json"))
    if scheduler.get("thresholding"):
        thresholding = "dynamic"
    elif scheduler.get("clip_sample", True):
        if float(scheduler.get("clip_sample_range", 1.0)) != 1.0:
            raise StageError(f"{folder}/scheduler: clip_sample_range {scheduler['clip_sample_range']} is not supported")
        thresholding = "static"
    else:
        thresholding = "none"
    return recipe_config(
        model,
        size,
        thresholding=thresholding,
        percentile=float(scheduler.get("dynamic_thresholding_ratio", 0.995)),
        sample_max_value=float(scheduler.get("sample_max_value", 1.0)),
        text_encoder=text_encoder if has_encoder else "",
    )


def recipe_config(
    model: ml_collections.ConfigDict,
    image_size: int,
    *,
    sample_max_value: float,
    thresholding: str = "dynamic",
    percentile: float = 0.95,
    text_encoder: str = "",
) -> ml_collections.ConfigDict:
    """A stage config of IF's recipe around the if_unet `model` (what `if_config` reads from a folder, and what
    configs/if_*.py build for planning and fine-tuning): the discrete schedule, eps with the learned variance,
    IF's thresholding, 77 lower-cased tokens, noise level 250 for SR inputs, diffusers' sampling defaults."""
    config = base_config("if_unet")
    config.model = model
    super_resolution = if_unet.is_super_resolution(model)
    config.data.image_size = image_size
    if super_resolution:
        config.model.lowres_size = image_size // SR_FACTOR
    config.text.encoder = text_encoder
    config.text.max_length = TEXT_LENGTH
    config.text.lowercase = True
    config.model.text_length = TEXT_LENGTH
    config.diffusion.schedule = "discrete_cosine"
    config.diffusion.objective = "eps"
    config.diffusion.variance = "learned_range"
    config.diffusion.thresholding = thresholding
    config.diffusion.dynamic_threshold_percentile = percentile
    config.diffusion.threshold_max = sample_max_value
    config.diffusion.sr_noise_level = SR_NOISE_LEVEL / 1000
    # Fine-tuning: the variance channels are trained by the hybrid loss, as IF trained them (improved DDPM);
    # with the eps MSE alone they would drift as the shared layers move, and sampling reads them.
    config.diffusion.variance_loss = "vlb"
    config.train.sample_steps, config.train.sample_guidance_scale = SAMPLE_DEFAULTS[super_resolution]
    return config


def load_params(
    folder: str, config: ml_collections.ConfigDict, abstract_params: Any, encoder: T5Encoder | None
) -> dict:
    """The U-Net's weights from `folder`/unet, each tensor read into the sharding `abstract_params` gives it, and
    `null_text` from `encoder` (T5 states of the empty prompt at config.model.text_length tokens)."""
    if encoder is None:
        raise StageError(f'{folder}: an IF stage needs its T5 encoder to build the unconditional input ("")')
    unet = os.path.join(folder, "unet")
    flat_abstract = dict(_flatten(abstract_params))
    params: dict = {}
    with contextlib.ExitStack() as stack:
        reader = WeightFolder(unet, stack, stems=DIFFUSERS_STEMS)
        try:
            for path, array in if_unet.iter_params_from_diffusers(config.model, reader.get, reader.keys()):
                want = flat_abstract[path]
                placed = jax.make_array_from_callback(want.shape, want.sharding, lambda i, a=array: a[i])
                _assign(params, path, placed)
        except WeightsError as e:
            raise WeightsError(f"{reader.source}: {e}") from None
    ids, mask = encoder.tokenizer([""], int(config.model.text_length))
    null = np.asarray(encoder(ids, mask), np.float32)
    want = flat_abstract[("null_text",)]
    _assign(params, ("null_text",), jax.device_put(null.reshape(want.shape), want.sharding))
    return params


def _flatten(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in _flatten(value, path + (key,))]
    return [(path, tree)]


def _assign(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
