"""Conditioning is one pytree: a Mapping from the names in :data:`KINDS` to per-example arrays.

A network is called ``model_fn(x_t, t, cond)``. Every key is optional; a network reads the keys
its configuration uses and rejects the others, so a typo or a stray input fails loudly.

  ``"label"``         ``[B]`` int class id; null value ``num_classes`` (the extra class row of
                      classifier-free guidance, Ho & Salimans 2022).
  ``"image"``         ``[B, H, W, Ci]`` float, concatenated to the input channels
                      (super-resolution, inpainting); never dropped.
  ``"context"``       ``[B, L, D]`` float tokens for cross-attention (Rombach et al. 2022); null zeros.
  ``"context_mask"``  ``[B, L]`` bool, True = a real token; null all False. Missing means every
                      token is real.
  ``"control"``       ``[B, H, W, Cc]`` a ControlNet's control image (Zhang et al. 2023); null zeros.
  ``"aug_level"``     ``[B]`` float noise-augmentation level of a cascaded model's low-resolution
                      input, embedded like ``t`` (Ho et al. 2022, CDM sec. 4); never dropped.
  ``"tokens"``        ``[B, L]`` int token ids of a caption, 0 = padding, read by a network with
                      its own text encoder (GLIDE, Nichol et al. 2022; LDM); null all 0 (the
                      empty caption, every position padding).

:func:`check` validates shapes (static, so it runs while tracing, before anything compiles);
:func:`null` gives the unconditional input; :func:`drop` replaces the conditioning of chosen
examples by the null one, the classifier-free guidance training of Ho & Salimans 2022,
Algorithm 1 (``c <- null with probability p_uncond``). Both are pure and jit-able.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KINDS", "RANKS", "DROPPABLE", "check", "null", "drop"]

KINDS = ("label", "image", "context", "context_mask", "control", "aug_level", "tokens")
"""The conditioning keys a network may read (layouts and null values in the table above);
:func:`check` rejects any other key."""

RANKS = {"label": 1, "image": 4, "context": 3, "context_mask": 2, "control": 4, "aug_level": 1, "tokens": 2}
"""The rank of each kind's array, batch first (``label`` ``[B]``: 1, ``image`` ``[B, H, W, Ci]``: 4, ...),
checked by :func:`check`."""

# The layout of each kind, batch first, for error messages.
_LAYOUTS = {
    "label": "[B] int",
    "image": "[B, H, W, Ci]",
    "context": "[B, L, D]",
    "context_mask": "[B, L] bool",
    "control": "[B, H, W, Cc]",
    "aug_level": "[B]",
    "tokens": "[B, L] int",
}

DROPPABLE = ("label", "context", "context_mask", "control", "tokens")
"""The keys :func:`drop` may replace: those with a null value distinct from the input. ``image``
and ``aug_level`` are kept as they are: a super-resolution model without its low-resolution image,
or with a wrong augmentation level, is not an unconditional model."""

Cond = Mapping[str, Any]


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def _dtype(a) -> np.dtype:
    return np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype


def check(cond: Cond, batch: int, name: str = "cond") -> None:
    """Validate a conditioning mapping for a batch of ``batch`` examples; raise a ValueError if not.

    Checks that ``cond`` is a Mapping whose keys are in :data:`KINDS`, that every entry has the
    rank of its kind and leading dimension ``batch``, that ``"label"`` is an int array and
    ``"context_mask"`` a bool array of shape ``[B, L]`` matching ``"context"`` ``[B, L, D]``
    (a mask without context is an error). Only static shapes and dtypes are read, so it works on
    tracers and ``jax.ShapeDtypeStruct`` and costs nothing under ``jit``.
    """
    if not isinstance(cond, Mapping):
        raise ValueError(f"{name}: expected a Mapping with keys from {KINDS}, got {type(cond).__name__}")
    unknown = [k for k in cond if k not in KINDS]
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; expected keys from {KINDS}")
    for k, v in cond.items():
        shape = _shape(v)
        if len(shape) != RANKS[k] or shape[0] != batch:
            raise ValueError(
                f"{name}[{k!r}]: expected shape {_LAYOUTS[k]} with B = {batch} (rank {RANKS[k]}), got shape {shape}"
            )
    for k in ("label", "tokens"):
        if k in cond and not np.issubdtype(_dtype(cond[k]), np.integer):
            raise ValueError(f"{name}[{k!r}]: expected an int array, got dtype {_dtype(cond[k])}")
    if "context_mask" in cond:
        mask = cond["context_mask"]
        if _dtype(mask) != np.bool_:
            raise ValueError(f"{name}['context_mask']: expected a bool array (True = real token), got dtype {_dtype(mask)}")
        if "context" not in cond:
            raise ValueError(f"{name}['context_mask']: given without {name}['context'] (shape {_shape(mask)})")
        want = _shape(cond["context"])[:2]
        if _shape(mask) != want:
            raise ValueError(
                f"{name}['context_mask']: expected shape {want} (the [B, L] of {name}['context'] "
                f"{_shape(cond['context'])}), got shape {_shape(mask)}"
            )


def _null_value(key: str, value: Any, num_classes: Optional[int]) -> jax.Array:
    if key == "label":
        if num_classes is None:
            raise ValueError("num_classes: expected the number of classes (the null label) since cond has 'label', got None")
        return jnp.full(_shape(value), num_classes, _dtype(value))
    if key in ("image", "aug_level"):
        return value
    return jnp.zeros(_shape(value), _dtype(value))


def _with_explicit_mask(cond: Cond) -> dict:
    """``cond`` with a ``context_mask`` (all True: every token real) if it has context but no mask,
    so the null conditioning (all False) can be written down."""
    out = dict(cond)
    if "context" in out and "context_mask" not in out:
        out["context_mask"] = jnp.ones(_shape(out["context"])[:2], bool)
    return out


def null(cond: Cond, num_classes: Optional[int] = None) -> dict:
    """The unconditional counterpart of ``cond``: a dict with the same keys and shapes.

    label -> ``num_classes`` (the null class), context -> zeros, context_mask -> all False,
    control -> zeros, tokens -> all 0 (padding: the empty caption); image and aug_level are kept as they are. A ``cond`` with context but no
    mask gets an explicit all-False ``context_mask`` (zero tokens that are visible would not be
    the null input). ``num_classes`` is required iff ``cond`` has a label.

    Shapes: each entry as in :data:`KINDS` (batch first); returns arrays of the same shapes and dtypes.
    """
    check(cond, _batch(cond))
    cond = _with_explicit_mask(cond)
    return {k: _null_value(k, v, num_classes) for k, v in cond.items()}


def _batch(cond: Cond, default: int = 0) -> int:
    """The leading dimension of the first non-scalar entry of ``cond`` (``default`` if none)."""
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond: expected a Mapping with keys from {KINDS}, got {type(cond).__name__}")
    for v in cond.values():
        if np.ndim(v):
            return _shape(v)[0]
    return default


def drop(
    cond: Cond,
    drop: jax.Array,
    num_classes: Optional[int] = None,
    keys: Sequence[str] = ("label", "context", "context_mask"),
) -> dict:
    """Replace the conditioning of the examples where ``drop`` is True by the null conditioning.

    ``out[k][b] = null(cond)[k][b] if drop[b] else cond[k][b]`` for every ``k`` in ``keys`` that
    ``cond`` has; the other entries (and every entry of the kept examples) are returned as they
    are. Classifier-free guidance trains one network on both inputs by dropping the condition
    of each example with probability ``p_uncond`` (Ho & Salimans 2022, Algorithm 1):
    ``drop(cond, jax.random.bernoulli(key, p_uncond, (B,)), num_classes)``.

    Args:
      cond: the conditioning mapping, each entry ``[B, ...]`` (see :data:`KINDS`).
      drop: ``[B]`` bool, True = replace this example's conditioning by the null one.
      num_classes: the null label; required iff "label" is dropped.
      keys: the kinds to drop, a subset of :data:`DROPPABLE`. When "context_mask" is listed and
        ``cond`` has context without a mask, the mask is added (True for kept rows).
    Returns:
      a dict with the keys of ``cond`` (plus ``context_mask`` as above), same shapes and dtypes.
    """
    keys = tuple(keys) if not isinstance(keys, str) else (keys,)
    bad = [k for k in keys if k not in DROPPABLE]
    if bad:
        raise ValueError(
            f"keys: {bad} cannot be dropped (image and aug_level have no null value); "
            f"expected a subset of {DROPPABLE}"
        )
    B = _batch(cond, default=_shape(drop)[0] if np.ndim(drop) == 1 else -1)
    if _shape(drop) != (B,) or _dtype(drop) != np.bool_:
        raise ValueError(f"drop: expected a bool array of shape [{B}] (one flag per example of cond), got shape "
                         f"{_shape(drop)} dtype {_dtype(drop)}")
    check(cond, B)
    if "context_mask" in keys:
        cond = _with_explicit_mask(cond)
    out = dict(cond)
    for k in keys:
        if k not in cond:
            continue
        v = jnp.asarray(cond[k])
        where = jnp.reshape(drop, (B,) + (1,) * (v.ndim - 1))
        out[k] = jnp.where(where, _null_value(k, v, num_classes), v)
    return out
