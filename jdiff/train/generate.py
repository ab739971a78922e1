"""Sampling from a trained network: model functions from params, and batched generation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import samplers
from jdiff.schedules import Schedule


def _apply(module, params, x, t, y=None):
    return module.apply({"params": params}, x, t, y=y)


def _apply_unconditional(module, params, x, t):
    return module.apply({"params": params}, x, t)


def model_fn_for(module, params, labels=None, guidance_weight: float = 0.0):
    """``(x_t, t) -> output`` for ``jdiff.sample``, with params (and labels) as traced data.

    For a class-conditional network (``module.num_classes``), ``labels`` [B] selects the class
    (``None``: the null class, i.e. unconditional samples) and ``guidance_weight`` w > 0 applies
    classifier-free guidance (1 + w) eps(x, y) - w eps(x, null).
    """
    num_classes = getattr(module, "num_classes", None)
    if num_classes is None:
        if labels is not None or guidance_weight:
            raise ValueError("labels/guidance: the network is not class-conditional (model.num_classes is None)")
        return jax.tree_util.Partial(_apply_unconditional, module, params)
    from jdiff import guidance

    fn = jax.tree_util.Partial(_apply, module, params)
    if guidance_weight:
        fn = guidance.classifier_free(fn, guidance_weight, num_classes=num_classes)
    return guidance.with_label(fn, labels)


def generate(
    module,
    params,
    schedule: Schedule,
    image_shape: tuple[int, int, int],
    num: int,
    key: jax.Array,
    *,
    labels: np.ndarray | None = None,
    guidance_weight: float = 0.0,
    batch_size: int = 256,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    clip: Any = True,
    variance: str = "fixed_small",
    parameterization: str = "eps",
) -> np.ndarray:
    """``num`` samples [num, H, W, C] in [-1, 1], in batches of ``batch_size``.

    Batch b uses ``fold_in(key, b)``; the last batch is padded to full size so every batch
    reuses one compiled sampler. Labels (if any) are [num] ints; for a conditional network
    ``None`` samples the null class.
    """
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num: expected a positive number of samples, got {num!r}")
    num_classes = getattr(module, "num_classes", None)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (num,):
            raise ValueError(f"labels: expected shape ({num},), got {labels.shape}")
    elif num_classes is not None:
        labels = np.full((num,), num_classes, np.int32)
    batch_size = min(batch_size, num)
    out = []
    for b, start in enumerate(range(0, num, batch_size)):
        y = None
        if labels is not None:
            y = labels[start : start + batch_size]
            y = jnp.asarray(np.pad(y, (0, batch_size - len(y)), mode="edge"), jnp.int32)
        fn = model_fn_for(module, params, y, guidance_weight)
        x = samplers.sample(
            fn, schedule, (batch_size,) + tuple(image_shape), jax.random.fold_in(key, b),
            method=method, steps=steps, eta=eta, clip=clip, variance=variance, parameterization=parameterization,
        )
        out.append(np.asarray(jax.device_get(x)))
    return np.concatenate(out)[:num]
