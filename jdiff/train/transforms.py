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
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import editing

BatchTransform = Callable[[dict, jax.Array], dict]
"""The type of a batch transform: ``transform(batch, key) -> batch``, a pure JAX function over
the train step's batch (see the module docstring)."""

TRANSFORMS: dict[str, Callable[..., BatchTransform]] = {}
"""The transform registry: name -> factory, ``factory(**config.data.transform_kwargs)`` returning a
:data:`BatchTransform`. Built in: ``downsample_image``, ``inpaint`` and ``super_resolution``;
:func:`register` adds more."""


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


def get(name: str, kwargs: Mapping[str, Any] | None = None, schedule: Any = None) -> BatchTransform | None:
    """The transform a config names (None for ``""``); bad names or kwargs raise ValueError. A
    factory with a ``schedule`` parameter (e.g. noise augmentation) is also given ``schedule``,
    the run's diffusion process."""
    if not isinstance(name, str):
        raise ValueError(f"config.data.transform: expected a transform name (str), got {name!r}")
    if name == "":
        if kwargs:
            raise ValueError(f"config.data.transform_kwargs: {dict(kwargs)} given, but config.data.transform is '' (none)")
        return None
    factory = _resolve(name)
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else (kwargs or {}))
    if "schedule" in kwargs:
        raise ValueError("config.data.transform_kwargs.schedule: set by the run (its diffusion process), not by the config")
    signature = inspect.signature(factory)
    extra = {"schedule": schedule} if "schedule" in signature.parameters else {}
    try:
        signature.bind(**kwargs, **extra)
    except TypeError as e:
        raise ValueError(f"config.data.transform_kwargs: {kwargs} do not fit transform {name!r} ({e})") from None
    return factory(**kwargs, **extra)


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


def super_resolution(factor: int = 2, method: str = "bicubic", max_aug_level: float = 0.0, blur_prob: float = 0.0,
                     blur_sigma: tuple = (0.4, 0.6), *, schedule=None) -> BatchTransform:
    """A super-resolution stage's training input (CDM, Ho et al. 2022, sec. 4; SR3): the low-
    resolution image is ``jdiff.cascade.downsample(x0, factor)`` (area, the base stage's data),
    blurred with probability ``blur_prob`` by a Gaussian of width ~ U[blur_sigma] (low-resolution
    pixels), noised to ``z_s = alpha_s low + sigma_s eps`` at s = round(a T) - 1 with a level
    a ~ U[0, max_aug_level] per example (0: no noise augmentation), then upsampled with ``method``:
    ``cond["image"]`` [B, H, W, C] and ``cond["aug_level"]`` = s [B] (float, -1 = clean), which an
    ``aug_level_embedding=True`` network embeds like t. ``schedule`` is the run's own discrete
    schedule (given by the training loop), so the noise is that of the forward process.
    """
    from jdiff import cascade
    from jdiff.schedules import Schedule

    factor = cascade._check_factor(factor, "config.data.transform_kwargs.factor")
    if method not in cascade.UPSAMPLE_METHODS:
        raise ValueError(f"config.data.transform_kwargs.method: expected one of {cascade.UPSAMPLE_METHODS}, got {method!r}")
    max_aug_level = cascade.check_aug_level(max_aug_level, "config.data.transform_kwargs.max_aug_level")
    if isinstance(blur_prob, bool) or not isinstance(blur_prob, (int, float)) or not 0.0 <= blur_prob <= 1.0:
        raise ValueError(f"config.data.transform_kwargs.blur_prob: expected a probability in [0, 1], got {blur_prob!r}")
    try:
        lo, hi = (float(v) for v in blur_sigma)
    except (TypeError, ValueError):
        lo, hi = -1.0, -1.0
    if not 0.0 < lo <= hi:
        raise ValueError(f"config.data.transform_kwargs.blur_sigma: expected (low, high) widths with 0 < low <= high, "
                         f"got {blur_sigma!r}")
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule: the super_resolution transform noises with a discrete schedule (diffusion.process "
                         f"'vp'), got {type(schedule).__name__}")
    T = schedule.num_timesteps
    radius = max(1, int(np.ceil(3.0 * hi)))

    def transform(batch: dict, key: jax.Array) -> dict:
        x0 = batch["image"]
        b, h, w, _ = x0.shape
        if h % factor or w % factor:
            raise ValueError(f"config.data.transform_kwargs.factor: {factor} does not divide the image size {h}x{w}")
        low = cascade.downsample(x0, factor)
        # Per-example draws from fold_in(key, index): the same batch gives the same result on any mesh.
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (3,)))(keys)  # [B, 3]
        if blur_prob > 0:
            sigma = jnp.where(u[:, 0] < blur_prob, lo + (hi - lo) * u[:, 1], 0.0)
            low = cascade.blur(low, sigma, radius)
        s = cascade.aug_timestep(max_aug_level * u[:, 2], T)
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), low.shape[1:], low.dtype))(keys)
        cond = cascade.conditioning_of_noisy(cascade.augment(schedule, low, s, eps), (h, w), s, method)
        return {**batch, "cond": {**batch.get("cond", {}), **cond}}

    return transform


register("super_resolution", super_resolution)
