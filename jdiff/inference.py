"""Sampling from trained params: model functions for ``jdiff.sample``, class-balanced labels, and
batched, device-sharded generation. Knows nothing of training (no optimizer, no checkpoints):
:mod:`jdiff.workdir` loads a trained workdir, this module samples from what it loaded.

A network is called ``module.apply({"params": params}, x_t, t, cond=cond)`` with ``cond`` a
conditioning dict (:mod:`jdiff.conditioning`: "label", "image", "context", ...). Classifier-free
guidance (Ho & Salimans 2022, eq. 6) nulls the droppable kinds present in ``cond`` (the label
becomes the null class ``num_classes``, context zeros with an empty mask); an image or an
augmentation level is kept in both halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jdiff import conditioning, edm, guidance, parallel, samplers

__all__ = ["balanced_labels", "generate", "model_fn_for", "null_cond_for"]

# The value each droppable kind takes in the null half of classifier-free guidance (broadcast
# per example by guidance.classifier_free); "label" is the module's num_classes. A ControlNet's
# control image is not among them: it steers both halves (the ControlNet paper's default, Zhang
# et al. 2023; the train step never drops it either).
_NULL_VALUES = {"context": 0.0, "context_mask": False, "tokens": 0}


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
    """``num`` class labels in sorted blocks whose sizes differ by at most one,
    ``label_i = floor(i K / num)``: one class per grid row of K when num = K^2, and every class
    once (then repeated) whatever ``num``."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num: expected a positive number of samples, got {num!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return ((np.arange(num, dtype=np.int64) * num_classes) // num).astype(np.int32)


def null_cond_for(cond: Mapping[str, Any], num_classes: int | None) -> dict:
    """The ``null_cond`` of :func:`jdiff.guidance.classifier_free` for conditioning with ``cond``'s
    keys: the null class for "label", zeros / an empty mask for context (a control image is kept)."""
    null = {}
    for k in cond:
        if k == "label":
            if num_classes is None:
                raise ValueError("cond['label']: given to a network without num_classes (not class-conditional)")
            null["label"] = int(num_classes)
        elif k in _NULL_VALUES:
            null[k] = _NULL_VALUES[k]
    if "context" in cond and "context_mask" not in cond:
        null["context_mask"] = False
    return null


def _apply(module, params, x, t, cond):
    return module.apply({"params": params}, x, t, cond=cond)


def _apply_without_cond(module, params, x, t):
    return module.apply({"params": params}, x, t)


def model_fn_for(module, params, labels=None, guidance_weight: float = 0.0, *, cond: Mapping[str, Any] | None = None,
                 sigma_data: float | None = None):
    """``(x_t, t) -> output`` for ``jdiff.sample``, with params (and conditioning) as traced data.

    ``labels`` [B] int (or ``cond["label"]``) selects the class of a class-conditional network
    (``module.num_classes``); ``None`` means the null class, i.e. unconditional samples of a
    model trained with label dropout. ``cond`` holds any other conditioning ([B, ...] per kind).
    ``guidance_weight`` w > 0 applies classifier-free guidance (1 + w) eps(x, c) - w eps(x, null)
    over the droppable kinds present (one batched network call of 2B). ``sigma_data``: the network
    is EDM's raw F, wrapped in the preconditioning (:func:`jdiff.edm.precondition`) first.
    """
    num_classes = getattr(module, "num_classes", None)
    cond = dict(cond or {})
    if labels is not None:
        if num_classes is None:
            raise ValueError(f"labels: the network is not class-conditional (num_classes is None), got labels {labels!r}")
        if "label" in cond:
            raise ValueError("labels, cond['label']: expected at most one of them")
        cond["label"] = labels
    if "label" in cond and num_classes is None:
        raise ValueError("cond['label']: the network is not class-conditional (num_classes is None)")
    w = guidance_weight
    if isinstance(w, (int, float)) and not (np.isfinite(w) and w >= 0):
        raise ValueError(f"guidance_weight: expected a finite weight >= 0, got {w!r}")
    null_cond = null_cond_for(cond, num_classes)
    if w and not null_cond:
        raise ValueError(
            f"guidance_weight: {w} needs conditioning to guide towards (labels of a class-conditional network, or "
            f"context); got cond keys {sorted(cond)} for a network with num_classes={num_classes}"
        )
    if not cond:
        fn = jax.tree_util.Partial(_apply_without_cond, module, params)
        return fn if sigma_data is None else edm.precondition(fn, sigma_data)
    if "context" in cond and "context_mask" not in cond:  # every token real; the null has them all masked
        cond["context_mask"] = jnp.ones(np.shape(cond["context"])[:2], bool)
    for k, v in cond.items():
        if not isinstance(v, jax.Array):
            cond[k] = jnp.asarray(v, jnp.int32 if k == "label" else None)
    fn = jax.tree_util.Partial(_apply, module, params)
    if sigma_data is not None:
        fn = edm.precondition(fn, sigma_data)
    if w:
        fn = guidance.classifier_free(fn, w, null_cond=null_cond,
                                      learned_variance=bool(getattr(module, "learn_sigma", False)))
    return guidance.with_cond(fn, cond)


def _check_cond(cond: Mapping[str, Any], num: int, image_shape) -> dict:
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond: expected a dict of conditioning arrays [num, ...], got {type(cond).__name__}")
    out = {k: np.asarray(v) for k, v in cond.items()}
    conditioning.check(out, num, name="cond")
    if "image" in out and out["image"].shape[1:3] != tuple(image_shape[:2]):
        raise ValueError(f"cond['image']: expected [num, {image_shape[0]}, {image_shape[1]}, Ci] (the sample size), "
                         f"got shape {out['image'].shape}")
    return out


def generate(
    module,
    params,
    schedule,
    image_shape: tuple[int, int, int],
    num: int,
    key: jax.Array,
    *,
    labels: np.ndarray | None = None,
    cond: Mapping[str, Any] | None = None,
    guidance_weight: float = 0.0,
    batch_size: int = 256,
    method: str = "ddpm",
    steps: int | None = None,
    timesteps: Any = None,
    eta: float | None = None,
    clip: Any = True,
    variance: str = "fixed_small",
    parameterization: str = "eps",
    mesh: Mesh | None = None,
    sigma_data: float | None = None,
    classifier: tuple[Any, Any] | None = None,
    classifier_scale: float = 0.0,
    classifier_labels: np.ndarray | None = None,
    clip_model: tuple[Any, Any] | None = None,
    clip_scale: float = 0.0,
    clip_tokens: np.ndarray | None = None,
) -> np.ndarray:
    """``num`` samples [num, H, W, C], in batches of ``batch_size``, each batch split over the data
    axis of ``mesh`` (default: all devices of all processes).

    Batch b is ``jdiff.sample(model_fn, schedule, x_T, fold_in(key, b))`` with x_T drawn straight
    into its shards. Each batch is padded to a multiple of the number of devices (and the last
    one to full size, so every batch reuses one compiled sampler); the padding rows are
    discarded. The result does not depend on the number of devices: with
    ``jax_threefry_partitionable`` (JAX's default) every noise element is a function of the key
    and its flat index only, and the network treats examples independently (up to float
    rounding, which XLA's kernels make depend on the per-device batch).

    Conditioning: ``labels`` [num] int (for a class-conditional network ``None`` samples the null
    class; see :func:`balanced_labels`) and ``cond``, a dict of [num, ...] arrays of the other
    kinds (e.g. ``{"image": low_res [num, H, W, Ci]}``). ``eta`` only for samplers that have one
    (None: the sampler's default). ``timesteps``: an explicit time sequence instead of ``steps``
    (:func:`jdiff.samplers.sample`; e.g. one that stops short of the data, for a truncated
    cascade stage). ``sigma_data``: wrap an EDM network in its preconditioning.
    ``classifier``: ``(module, params)`` of a noise-aware classifier (e.g. ADM's, imported with
    :func:`jdiff.convert.openai.from_openai`) guiding every step towards ``classifier_labels`` [num] with scale
    ``classifier_scale`` s: eps - s sigma_t grad log p(y | x_t) (:func:`jdiff.guidance.classifier`,
    Dhariwal & Nichol 2021 Algorithm 2); with classifier-free guidance too, it guides the CFG output.
    ``clip_model``: ``(module, params)`` of a noised :class:`~jdiff.models.CLIP` (``launch.train_clip
    --noised``, same image size and schedule) guiding every step towards the captions
    ``clip_tokens`` [num, L] int (0 = padding) with scale ``clip_scale`` s: GLIDE's CLIP guidance
    (Nichol et al. 2022, sec. 2.5), eps - s sigma_t grad_x (tau f(x_t, t) . g(c)) with f, g the
    unit image and text embeddings and tau CLIP's logit scale (:func:`jdiff.guidance.energy`);
    it composes with classifier-free guidance (it guides the CFG output).
    x_T ~ N(0, prior_std^2 I) at the process's noise end (sigma_max for EDM, 1 otherwise).
    Every process gets the whole array.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num: expected a positive number of samples, got {num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive number of samples per batch, got {batch_size!r}")
    if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in image_shape)):
        raise ValueError(f"image_shape: expected (H, W, C) of positive ints, got {image_shape!r}")
    image_shape = tuple(int(d) for d in image_shape)
    w = guidance_weight
    if isinstance(w, (int, float, np.integer, np.floating)) and not (np.isfinite(w) and w >= 0):
        raise ValueError(f"guidance_weight: expected a finite weight >= 0, got {w!r}")
    # The sampler's arguments before anything is placed, drawn or compiled.
    samplers._validate(method, schedule, steps, eta, variance, parameterization, None, timesteps, clip)
    cond = _check_cond(cond or {}, num, image_shape)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (num,):
            raise ValueError(f"labels: expected shape ({num},), got {labels.shape}")
        if "label" in cond:
            raise ValueError("labels, cond['label']: expected at most one of them")
        cond["label"] = labels
    if "label" in cond:
        num_classes = getattr(module, "num_classes", None)
        if num_classes is None:
            raise ValueError("labels: the network is not class-conditional (num_classes is None)")
        y = cond["label"]
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > num_classes:
            raise ValueError(f"labels: expected ints in [0, {num_classes}] ({num_classes} = the null class), "
                             f"got range [{y.min()}, {y.max()}] dtype {y.dtype}")
        cond["label"] = y.astype(np.int32)
    if classifier is not None:
        if not (isinstance(classifier, tuple) and len(classifier) == 2):
            raise ValueError(f"classifier: expected (module, params) of a noise-aware classifier, got {type(classifier).__name__}")
        k = getattr(classifier[0], "num_classes", None)
        if classifier_labels is None or np.shape(classifier_labels) != (num,):
            raise ValueError(f"classifier_labels: expected [{num}] ints (the classes to guide towards), got "
                             f"{None if classifier_labels is None else np.shape(classifier_labels)}")
        classifier_labels = np.asarray(classifier_labels)
        if not np.issubdtype(classifier_labels.dtype, np.integer) or classifier_labels.min() < 0 or classifier_labels.max() >= k:
            raise ValueError(f"classifier_labels: expected ints in [0, {k}) (the classifier's classes), got range "
                             f"[{classifier_labels.min()}, {classifier_labels.max()}]")
        if not (isinstance(classifier_scale, (int, float, np.integer, np.floating)) and np.isfinite(classifier_scale)
                and classifier_scale >= 0):
            raise ValueError(f"classifier_scale: expected a finite scale >= 0, got {classifier_scale!r}")
        classifier_labels = classifier_labels.astype(np.int32)
    elif classifier_labels is not None or classifier_scale:
        raise ValueError("classifier_labels, classifier_scale: given without a classifier")
    if clip_model is not None:
        if not (isinstance(clip_model, tuple) and len(clip_model) == 2):
            raise ValueError(f"clip_model: expected (module, params) of a CLIP, got {type(clip_model).__name__}")
        L = getattr(clip_model[0], "max_length", None)
        if clip_tokens is None or np.ndim(clip_tokens) != 2 or np.shape(clip_tokens)[0] != num or np.shape(clip_tokens)[1] > L:
            raise ValueError(f"clip_tokens: expected [{num}, L <= {L}] token ids (the captions to guide towards), got "
                             f"{None if clip_tokens is None else np.shape(clip_tokens)}")
        clip_tokens = np.asarray(clip_tokens)
        if (not np.issubdtype(clip_tokens.dtype, np.integer) or clip_tokens.min() < 0
                or clip_tokens.max() >= clip_model[0].vocab_size or not (clip_tokens != 0).any(axis=1).all()):
            raise ValueError(f"clip_tokens: expected ids in [0, {clip_model[0].vocab_size}) with at least one real "
                             f"(non-zero) token per caption, got range [{clip_tokens.min()}, {clip_tokens.max()}]")
        if not (isinstance(clip_scale, (int, float, np.integer, np.floating)) and np.isfinite(clip_scale) and clip_scale >= 0):
            raise ValueError(f"clip_scale: expected a finite scale >= 0, got {clip_scale!r}")
        clip_tokens = clip_tokens.astype(np.int32)
    elif clip_tokens is not None or clip_scale:
        raise ValueError("clip_tokens, clip_scale: given without a clip_model")
    mesh = parallel.make_mesh() if mesh is None else mesh
    batch_size = min(batch_size, num)
    devices = parallel.data_axis_size(mesh)
    if devices > 1 and not jax.config.jax_threefry_partitionable:
        raise ValueError("jax_threefry_partitionable: expected True (JAX's default) when sampling on several devices, "
                         "so that samples do not depend on the number of devices; got False")
    padded = -(-batch_size // devices) * devices
    data = parallel.data_sharding(mesh)
    params = parallel.shard_params(params, mesh) if not _on_mesh(params, mesh) else params
    out = []
    for b, start in enumerate(range(0, num, batch_size)):
        part = {}
        for k, v in cond.items():
            v = v[start : start + batch_size]
            v = np.pad(v, [(0, padded - len(v))] + [(0, 0)] * (v.ndim - 1), mode="edge")
            # Replicated (every process holds the same host values); the sampler's jit splits
            # what it needs along the data axis with x.
            part[k] = parallel.shard_params(v, mesh)
        fn = model_fn_for(module, params, None, guidance_weight, cond=part, sigma_data=sigma_data)
        if classifier is not None:
            y = classifier_labels[start : start + batch_size]
            y = parallel.shard_params(np.pad(y, (0, padded - len(y)), mode="edge"), mesh)
            log_prob = jax.tree_util.Partial(_classifier_log_prob, classifier[0], classifier[1])
            fn = guidance.with_label(guidance.classifier(fn, log_prob, classifier_scale, schedule, variance=variance,
                                                         parameterization=parameterization), y)
        if clip_model is not None:
            tok = clip_tokens[start : start + batch_size]
            tok = parallel.shard_params(np.pad(tok, [(0, padded - len(tok)), (0, 0)], mode="edge"), mesh)
            similarity = jax.tree_util.Partial(_clip_similarity, clip_model[0], clip_model[1], tok)
            fn = guidance.energy(fn, similarity, clip_scale, schedule, variance=variance, parameterization=parameterization)
        kwargs = dict(method=method, steps=steps, timesteps=timesteps, eta=eta, clip=clip, variance=variance, parameterization=parameterization)
        if b == 0:  # checked (the network's output shape too) before the first key or x_T, which compile
            samplers._prepare(fn, schedule, (padded,) + image_shape, **kwargs)
        batch_key = jax.random.fold_in(key, b)
        # The x_T that sample() would draw from split(batch_key)[0], made here so that it is
        # born sharded; the sampler's loop then runs on the shards where x_T lives.
        x_T = _normal(jax.random.split(batch_key)[0], (padded,) + image_shape, data)
        if hasattr(schedule, "prior_std"):
            x_T = x_T * schedule.prior_std(schedule.time_range()[1])
        x = samplers.sample(fn, schedule, x_T, batch_key, **kwargs)
        out.append(parallel.to_host(x)[: min(batch_size, num - start)])
    return np.concatenate(out)


def _classifier_log_prob(module, params, x, t, y):
    """log p(y | x_t) [B] of a noise-aware classifier (its logits' log-softmax at y)."""
    logits = module.apply({"params": params}, x, t)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[:, None], axis=-1)[:, 0]


def _clip_similarity(module, params, tokens, x, t):
    """tau f(x_t, t) . g(c) [B]: a CLIP's logit between noised images and their captions."""
    return module.apply({"params": params}, x, t, tokens, tokens != 0, method=module.similarity)


def _on_mesh(params, mesh: Mesh) -> bool:
    """Params already placed on ``mesh`` (replicated or FSDP) are used as they are."""
    return all(isinstance(p, jax.Array) and getattr(p.sharding, "mesh", None) == mesh for p in jax.tree.leaves(params))


def _normal(key: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    # Drawn directly into its shards: no device ever holds the whole batch.
    return jax.jit(jax.random.normal, static_argnums=1, out_shardings=sharding)(key, shape)
