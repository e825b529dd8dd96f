"""Imagen U-Nets: the text-conditional base U-Net, the super-resolution Efficient U-Net, and the
layers they share."""

from imagen_jax import flax_settings  # noqa: F401  (before any variable is built)
from imagen_jax.models.efficient_unet import EfficientUNet, build_sr_unet, upsample_lowres
from imagen_jax.models.unet import UNet, build_unet

__all__ = ["EfficientUNet", "UNet", "build_sr_unet", "build_unet", "upsample_lowres"]
