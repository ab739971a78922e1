"""Sampling from a trained network: model functions from params, and batched generation."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jdiff import parallel, samplers
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
    mesh: Mesh | None = None,
) -> np.ndarray:
    """``num`` samples [num, H, W, C] in [-1, 1], in batches of ``batch_size``, each batch split
    over the data axis of ``mesh`` (default: all devices of all processes).

    Batch b is ``jdiff.sample(model_fn, schedule, (batch_size, H, W, C), fold_in(key, b))``,
    with x_T drawn straight into its shards. Each batch is padded to a multiple of the number
    of devices (and the last one to full size, so every batch reuses one compiled sampler);
    the padding rows are discarded. The result does not depend on the number of devices: with
    ``jax_threefry_partitionable`` (JAX's default) every noise element is a function of the
    key and its flat index only, so a split or padded batch draws the same numbers for the
    same rows, and the network treats examples independently (up to float rounding, which
    XLA's kernels make depend on the per-device batch). Labels (if any) are [num] ints; for a
    conditional network ``None`` samples the null class. Every process gets the whole array.
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
    mesh = parallel.make_mesh() if mesh is None else mesh
    batch_size = min(batch_size, num)
    devices = parallel.data_axis_size(mesh)
    if devices > 1 and not jax.config.jax_threefry_partitionable:
        raise ValueError("jax_threefry_partitionable: expected True (JAX's default) when sampling on several devices, "
                         "so that samples do not depend on the number of devices; got False")
    padded = -(-batch_size // devices) * devices
    batch = parallel.data_sharding(mesh)
    params = parallel.shard_params(params, mesh) if not _on_mesh(params, mesh) else params
    out = []
    for b, start in enumerate(range(0, num, batch_size)):
        y = None
        if labels is not None:
            y = labels[start : start + batch_size]
            # Replicated, not split: a few ints, and the network checks concrete labels on the host.
            y = parallel.shard_params(np.pad(y, (0, padded - len(y)), mode="edge").astype(np.int32), mesh)
        fn = model_fn_for(module, params, y, guidance_weight)
        batch_key = jax.random.fold_in(key, b)
        # The x_T that sample() would draw from split(batch_key)[0], made here so that it is
        # born sharded; the sampler's loop then runs on the shards where x_T lives.
        x_T = _normal(jax.random.split(batch_key)[0], (padded,) + tuple(image_shape), batch)
        x = samplers.sample(
            fn, schedule, x_T, batch_key,
            method=method, steps=steps, eta=eta, clip=clip, variance=variance, parameterization=parameterization,
        )
        out.append(parallel.to_host(x)[: min(batch_size, num - start)])
    return np.concatenate(out)


def _on_mesh(params, mesh: Mesh) -> bool:
    """Params already placed on ``mesh`` (replicated or FSDP) are used as they are."""
    return all(isinstance(p, jax.Array) and getattr(p.sharding, "mesh", None) == mesh for p in jax.tree.leaves(params))


def _normal(key: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    # Drawn directly into its shards: no device ever holds the whole batch.
    return jax.jit(jax.random.normal, static_argnums=1, out_shardings=sharding)(key, shape)
