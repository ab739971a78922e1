"""Latent diffusion (Rombach et al. 2022, LDM): diffusion in the latent space of a KL autoencoder.

An autoencoder directory (``launch.train_autoencoder``; :func:`save_autoencoder`) holds the
:class:`~jdiff.models.Autoencoder`'s params and its **scale factor**: latents are
``z = scale * mean(q(z | x))`` with scale = 1 / std of the training set's posterior means, so
they have unit variance, the variance the diffusion prior N(0, I) assumes (LDM sec. 4.3.2 and
appendix G, "rescale the latent space by the component-wise standard deviation"; here one
scalar over every component, as LDM does).

A training config opts in with ``config.data.autoencoder = DIR``: :func:`jdiff.data.get_dataset`
encodes every image once at load (:func:`encode`), so the loop, the samplers and the guidance
see latents ``[N, H/f, W/f, c]`` as if they were images and need no change. Samples are mapped
back to pixels by :func:`decode` at the edges (sample grids, ``launch.sample``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import module_files
from jdiff.models.autoencoder import Autoencoder

__all__ = ["AUTOENCODER_PREFIX", "save_autoencoder", "load_autoencoder", "latent_scale", "encode", "decode",
           "decode_samples", "psnr", "autoencoder_of"]

AUTOENCODER_PREFIX = "autoencoder"
"""The file prefix of an autoencoder directory: ``DIR/autoencoder.json`` (the module's fields,
the scale factor, the image shape, metrics) and ``DIR/autoencoder.msgpack`` (params), see :func:`save_autoencoder`."""


def save_autoencoder(directory: str, module: Autoencoder, params: Any, *, scale: float, image_shape: tuple,
                     metrics: Mapping[str, Any] | None = None) -> str:
    """Write an autoencoder directory: params, fields, the latent scale factor, the image shape
    ``(H, W, C)`` it was trained on, and metrics (e.g. PSNR). Returns ``directory``."""
    if not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive scale factor, got {scale!r}")
    return module_files.save_module(directory, AUTOENCODER_PREFIX, module, params, {
        "scale": float(scale), "image_shape": [int(d) for d in image_shape], "metrics": dict(metrics or {})})


def load_autoencoder(directory: str) -> tuple[Autoencoder, Any, dict]:
    """``(module, params, info)`` of :func:`save_autoencoder`'s directory; ``info["scale"]`` is the
    scale factor and ``info["image_shape"]`` the pixel shape."""
    def init(module, info):
        return module.init({"params": jax.random.key(0)}, jnp.zeros((1,) + tuple(info["image_shape"])), jax.random.key(0))

    return module_files.load_module(str(directory), AUTOENCODER_PREFIX, Autoencoder, init, "launch.train_autoencoder")


@functools.partial(jax.jit, static_argnums=0)
def _encode_mean(module: Autoencoder, params, x):
    return module.apply({"params": params}, x, method=Autoencoder.encode)[0]


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: Autoencoder, params, z):
    return module.apply({"params": params}, z, method=Autoencoder.decode)


def _batched(fn, module, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if not len(x):
        raise ValueError(f"x: expected at least one example, got shape {x.shape}")
    parts = []
    for start in range(0, len(x), batch_size):
        part = x[start : start + batch_size]
        n = len(part)
        if n < batch_size and len(x) > batch_size:  # one compiled shape for the whole set
            part = np.concatenate([part, np.repeat(part[-1:], batch_size - n, axis=0)])
        parts.append(np.asarray(fn(module, params, part))[:n])
    return np.concatenate(parts)


def latent_scale(module: Autoencoder, params: Any, images: np.ndarray, batch_size: int = 500) -> float:
    """1 / std of the posterior means of ``images`` [N, H, W, C] over every component (LDM's scale factor)."""
    means = _batched(_encode_mean, module, params, images, batch_size)
    std = float(means.astype(np.float64).std())
    if not std > 0:
        raise ValueError(f"images: their latents have std {std}; expected a trained autoencoder and varied images")
    return 1.0 / std


def encode(module: Autoencoder, params: Any, images: np.ndarray, scale: float, batch_size: int = 500) -> np.ndarray:
    """Latents ``scale * mean(q(z | x))`` ``[N, H/f, W/f, latent_channels]`` of images ``[N, H, W, C]``."""
    return (scale * _batched(_encode_mean, module, params, images, batch_size)).astype(np.float32)


def decode(module: Autoencoder, params: Any, latents: np.ndarray, scale: float, batch_size: int = 500) -> np.ndarray:
    """Images ``[N, H, W, C]`` (float32, clipped to [-1, 1]) of latents ``[N, h, w, c]`` (divided by ``scale`` first)."""
    return np.clip(_batched(_decode, module, params, np.asarray(latents, np.float32) / scale, batch_size), -1.0, 1.0)


def autoencoder_of(data_config: Any) -> str:
    """The autoencoder directory a data section names ("" for pixel-space data)."""
    return str(data_config.get("autoencoder", "") or "") if hasattr(data_config, "get") else ""


def decode_samples(data_config: Any, x: np.ndarray) -> np.ndarray:
    """Samples of a model trained under ``data_config`` mapped to pixels: decoded by its
    autoencoder when ``data_config.autoencoder`` is set, else returned as they are."""
    directory = autoencoder_of(data_config)
    if not directory:
        return x
    module, params, info = load_autoencoder(directory)
    return decode(module, params, x, info["scale"])


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over images of 10 log10(peak^2 / MSE) for images in [-1, 1] (peak-to-peak 2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x, y: expected two [N, H, W, C] arrays of one shape, got {x.shape} and {y.shape}")
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))
