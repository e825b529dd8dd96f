"""Imagen U-Nets: the text-conditional base U-Net and the layers shared with the SR stages."""

from imagen_jax.models.unet import UNet, build_unet

__all__ = ["UNet", "build_unet"]
