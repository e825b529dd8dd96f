"""Images between uint8 (data, files) and the model's [-1,1] floats; grids, and PNG files written atomically
(write, then rename)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax.files import write_atomically


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] floats in [-1, 1] -> uint8 [0, 255]."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images: Any) -> Any:
    """uint8 [0, 255] -> float32 in [-1, 1], in the array's own library (on the device for a jax.Array)."""
    return images.astype(np.float32) / 127.5 - 1.0


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """float [B,H,W,C] -> [B,size,size,C], bilinear with antialiasing when shrinking; the array itself at its own
    size (an edit's kept pixels then come back exactly)."""
    images = np.asarray(images, np.float32)
    if images.shape[1:3] == (size, size):
        return images
    import jax

    shape = (images.shape[0], size, size, images.shape[-1])
    return np.asarray(jax.image.resize(images, shape, "linear", antialias=True), np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask [B,H,W,1] (1 = regenerate) at `size`, binary again: resized, then 1 where it is at least 0.5."""
    return (resize(mask, size) >= 0.5).astype(np.float32)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 [rows*H, cols*W, 3] grid with `pad` white pixels between tiles."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return grid


def save_png(image: np.ndarray, path: str) -> None:
    """Writes a uint8 [H,W,3] PNG to a temporary name and renames it, so no half-written file is left."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())
