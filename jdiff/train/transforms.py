"""Batch transforms: functions that run inside the jitted ``train_step``, before the loss, with
their own key (random masks, low-resolution corruption, augmentation).

A transform is ``transform(batch, key) -> batch`` over the step's batch format
``{"image": x0 [B, H, W, C], "cond": {...}, "loss_weight": [B] (optional)}``; it may add or
replace any conditioning (``cond["image"]``, ``cond["aug_level"]``, ...) or the loss weights.
It is traced once per compilation, so it must be a pure JAX function of its arguments; draw
per-example randomness with ``jax.random.fold_in(key, example_index)`` so that a sharded batch
gives the same result on any number of devices.

The config names it: ``config.data.transform = "downsample_image"`` with keyword arguments
``config.data.transform_kwargs`` (a free-form ConfigDict passed to the factory). Register your
own before training, either by name::

    from jdiff.train import transforms

    def random_mask(p=0.5):
        def transform(batch, key):
            ...
            return {**batch, "cond": {**batch["cond"], "image": masked}}
        return transform

    transforms.register("random_mask", random_mask)

or without registering, as ``config.data.transform = "my_package.my_module:random_mask"`` (the
factory is imported when training starts, so it also works from ``python -m launch.train``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jdiff import editing

BatchTransform = Callable[[dict, jax.Array], dict]

TRANSFORMS: dict[str, Callable[..., BatchTransform]] = {}


def register(name: str, factory: Callable[..., BatchTransform]) -> None:
    """Make ``config.data.transform = name`` build ``factory(**config.data.transform_kwargs)``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name: expected a non-empty transform name without ':', got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory: expected a callable returning transform(batch, key) -> batch, got {factory!r}")
    TRANSFORMS[name] = factory


def _resolve(name: str) -> Callable[..., BatchTransform]:
    if name in TRANSFORMS:
        return TRANSFORMS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"config.data.transform: cannot import {name!r} ({type(e).__name__}: {e})") from None
    raise ValueError(
        f"config.data.transform: unknown transform {name!r}; expected '' (none), one of {sorted(TRANSFORMS)} "
        "(jdiff.train.transforms.register adds more) or 'package.module:factory'"
    )


def get(name: str, kwargs: Mapping[str, Any] | None = None) -> BatchTransform | None:
    """The transform a config names (None for ``""``); bad names or kwargs raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"config.data.transform: expected a transform name (str), got {name!r}")
    if name == "":
        if kwargs:
            raise ValueError(f"config.data.transform_kwargs: {dict(kwargs)} given, but config.data.transform is '' (none)")
        return None
    factory = _resolve(name)
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else (kwargs or {}))
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"config.data.transform_kwargs: {kwargs} do not fit transform {name!r} ({e})") from None


def downsample_image(factor: int = 2, method: str = "bilinear") -> BatchTransform:
    """``cond["image"]`` = x0 resized down by ``factor`` and back up (bilinear by default):
    the low-resolution conditioning of a super-resolution model (SR3, Saharia et al. 2021;
    cascaded diffusion, Ho et al. 2021), at the network's resolution so that it concatenates
    with x_t. Deterministic; the key is unused.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"config.data.transform_kwargs.factor: expected a positive int, got {factor!r}")
    if method not in ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5"):
        raise ValueError(f"config.data.transform_kwargs.method: expected a jax.image.resize method, got {method!r}")

    def transform(batch: dict, key: jax.Array) -> dict:
        del key
        x0 = batch["image"]
        b, h, w, c = x0.shape
        if h % factor or w % factor:
            raise ValueError(f"config.data.transform_kwargs.factor: {factor} does not divide the image size {h}x{w}")
        low = jax.image.resize(x0, (b, h // factor, w // factor, c), method)
        return {**batch, "cond": {**batch.get("cond", {}), "image": jax.image.resize(low, x0.shape, method)}}

    return transform


register("downsample_image", downsample_image)


def inpaint(kinds=editing.MASK_KINDS, weights=None) -> BatchTransform:
    """``cond["image"]`` = [m * x0, m] for a random mask m per example (1 = known; kinds from
    :data:`jdiff.editing.MASK_KINDS`: boxes, free-form strokes, halves, outpainting borders, drawn
    with probabilities ``weights``): the training input of a mask-channel inpainting model
    (GLIDE, Nichol et al. 2022, sec. 4), ``config.model.image_channels`` = C + 1. The loss stays
    on every pixel, as in GLIDE. Masks come from :func:`jdiff.editing.random_masks`.
    """
    kinds, _ = editing._check_kinds(kinds, weights, "config.data.transform_kwargs.kinds")
    weights = None if weights is None else tuple(float(v) for v in weights)

    def transform(batch: dict, key: jax.Array) -> dict:
        x0 = batch["image"]
        b, h, w, _ = x0.shape
        m = editing.random_masks(key, b, (h, w), kinds, weights).astype(x0.dtype)
        return {**batch, "cond": {**batch.get("cond", {}), "image": jnp.concatenate([x0 * m, m], axis=-1)}}

    return transform


register("inpaint", inpaint)
