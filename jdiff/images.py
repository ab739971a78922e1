"""Writing image grids: arrays in [-1, 1] to PNG."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 with the DDPM rounding ((x + 1) * 127.5, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """Tile [N, H, W, C] images into one [rows * (H + p), cols * (W + p), C] uint8 image."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    imgs = to_uint8(images)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = imgs[i]
    return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None, scale: int | None = None) -> str:
    """Write a PNG grid atomically (a temp file, then rename). Small images are enlarged
    (nearest neighbour) to at least 32 pixels so 8x8 samples are visible."""
    from PIL import Image

    h = np.asarray(images).shape[1]
    scale = scale or max(1, 32 // h)
    grid = make_grid(images, ncols=ncols, scale=scale)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return path
