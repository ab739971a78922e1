"""Low-rank adaptation of a network's params (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), as pure functions over param pytrees.

Eq. (3) of the paper, for one frozen weight W0 and input x:

    h = W0 x + (alpha / r) B A x,    A in R^{r x in} Gaussian, B in R^{out x r} zero-initialised,

so the adapted network equals the frozen one at initialisation and only A and B train. In the
Flax layout (a Dense kernel ``[in, out]`` used as ``y = x @ W``; a conv kernel
``[kh, kw, in, out]``) the factors are stored transposed: ``a = A^T`` ``[fan_in, r]`` and
``b = B^T`` ``[r, out]`` with ``fan_in = prod(kernel.shape[:-1])`` (``in`` for a Dense kernel,
``kh * kw * in`` for a conv kernel), and :func:`merge` computes

    W = W0 + (alpha / r) * (a @ b).reshape(W0.shape)

(the reshape is row-major, so row ``(i * kw + j) * in + c`` of ``a @ b`` is the conv tap
``[i, j, c, :]``; for a conv this is LoRA on the im2col matrix of the convolution).

Factors are a separate plain nested dict with the structure of the targeted kernels: the kernel
at '/'-joined path ``P`` (e.g. ``encoder/down_1_attn_0/q/kernel``) has its factors at ``P/a`` and
``P/b``. Beside the network's params, ``{"model": params, "lora": factors}``, the regex
``"lora/.*"`` of :func:`jdiff.train.state.split_params` selects exactly the factors.
:class:`jdiff.models.lora.LoRA` is the Flax module holding both.

Which kernels get factors is the ``targets`` regex (``re.fullmatch`` over '/'-joined param
paths, :data:`DEFAULT_TARGETS`); it and the rank are config-level choices.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.core
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["DEFAULT_TARGETS", "FACTOR_NAMES", "init", "delta", "merge", "unmerge", "num_params", "target_paths",
           "save", "load", "check_rank", "check_alpha", "check_targets"]

DEFAULT_TARGETS = r"(?:.*/)?[^/]*attn[^/]*/(?:q|k|v|qkv|proj_out)/kernel|(?:.*/)?conv[12]/kernel"
"""The default regex of the kernels LoRA adapts, matched against ``/``-joined param paths.

The attention projections (q, k, v, a fused qkv, and the output projection proj_out) of every
self- and cross-attention block (modules whose name contains "attn": ``down_1_attn_0``,
``mid_attn``, ``up_0_cross_attn_1``, ...), as in the paper (sec. 7.1 adapts W_q and W_v; Stable
Diffusion LoRAs adapt all four), plus the two 3x3 convs of every residual block (``conv1``,
``conv2``), which hold most of a pixel-space U-Net's capacity. Not adapted: the time and class
embeddings, norms, biases, the input / output convs, resampling convs and 1x1 shortcuts. At
any depth, so the same regex works on a bare U-Net's paths and on wrapped ones."""

FACTOR_NAMES = ("a", "b")
"""The names of a kernel's two factors under its path: ``a`` ``[fan_in, r]``, ``b`` ``[r, out]``."""

_FORMAT = "jdiff.lora"
_VERSION = 1


def _flat(tree: Any, name: str) -> dict:
    tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
    if not isinstance(tree, Mapping):
        raise ValueError(f"{name}: expected a nested dict of arrays, got {type(tree).__name__}")
    return traverse_util.flatten_dict(dict(tree), sep="/")


def check_rank(rank: Any, name: str = "rank") -> int:
    """``rank`` as an int, or a ValueError naming ``name`` unless it is an int >= 1."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {rank!r}")
    return int(rank)


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """``alpha`` as a float, or a ValueError naming ``name`` unless it is a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name}: expected a finite float > 0 (the update is scaled by alpha / rank), got {alpha!r}")
    return float(alpha)


def check_targets(targets: Any, name: str = "targets") -> re.Pattern:
    """The compiled ``targets`` regex, or a ValueError naming ``name``."""
    if not isinstance(targets, str) or not targets:
        raise ValueError(f"{name}: expected a non-empty regex over '/'-joined param paths, got {targets!r}")
    try:
        return re.compile(targets)
    except re.error as e:
        raise ValueError(f"{name}: {targets!r} is not a valid regular expression ({e})") from None


def target_paths(params: Any, targets: str = DEFAULT_TARGETS) -> list[str]:
    """The sorted '/'-joined paths of the kernels of ``params`` that ``targets`` ``re.fullmatch``-es.

    Raises a ValueError naming ``targets`` if it is not a valid regex, matches no path, or matches
    a leaf that is not a kernel of rank >= 2 (a bias, a norm scale, an embedding's null token).
    """
    regex = check_targets(targets)
    flat = _flat(params, "params")
    paths = sorted(k for k in flat if regex.fullmatch(k))
    if not paths:
        raise ValueError(
            f"targets: {targets!r} matches no parameter path (re.fullmatch over '/'-joined paths such as "
            f"{sorted(flat)[:6]}); expected a regex selecting Dense or conv kernels"
        )
    bad = [(k, tuple(np.shape(flat[k]))) for k in paths if np.ndim(flat[k]) < 2]
    if bad:
        raise ValueError(
            f"targets: {targets!r} matches {len(bad)} param(s) that are not kernels, e.g. {bad[:3]} (path, shape); "
            "expected a regex selecting only Dense [in, out] or conv [..., in, out] kernels"
        )
    return paths


def init(key: jax.Array, params: Any, rank: int, targets: str = DEFAULT_TARGETS) -> dict:
    """Fresh LoRA factors for the kernels of ``params`` that ``targets`` selects (Hu et al. 2021,
    sec. 4.1: "random Gaussian initialization for A and zero for B", so B A = 0 at the start).

    Each selected kernel ``W0`` at path ``P`` with shape ``[..., out]`` gets
    ``P/a: [fan_in, rank] ~ N(0, 1 / fan_in)`` (fan_in = prod(shape[:-1]); the variance of a
    LeCun-normal init, so ``x @ a`` has the scale of ``x``) and ``P/b: [rank, out]`` zeros, in the
    kernel's dtype. Returns a plain nested dict holding only these factors.

    ``rank`` must be an int >= 1 and at most ``min(fan_in, out)`` of every selected kernel: a
    larger rank adds parameters but not expressivity (``a @ b`` has rank at most that), so it is
    refused as a likely mistake. Errors are ValueErrors naming ``rank`` or ``targets``.
    Works inside ``jit`` (shapes are static).
    """
    rank = check_rank(rank)
    paths = target_paths(params, targets)
    flat = _flat(params, "params")
    too_small = [(p, tuple(np.shape(flat[p]))) for p in paths
                 if rank > min(int(np.prod(np.shape(flat[p])[:-1])), np.shape(flat[p])[-1])]
    if too_small:
        raise ValueError(
            f"rank: expected an int >= 1 and at most min(fan_in, out) of every target kernel, got {rank} > that of "
            f"{len(too_small)} kernel(s), e.g. {too_small[:3]} (path, shape); lower the rank or narrow the targets"
        )
    keys = jax.random.split(key, len(paths))
    factors = {}
    for k, path in zip(keys, paths):
        kernel = flat[path]
        shape = tuple(np.shape(kernel))
        fan_in, out = int(np.prod(shape[:-1])), shape[-1]
        dtype = jnp.result_type(kernel)
        a = jax.random.normal(k, (fan_in, rank), jnp.float32) * (1.0 / math.sqrt(fan_in))
        factors[f"{path}/a"] = a.astype(dtype)
        factors[f"{path}/b"] = jnp.zeros((rank, out), dtype)
    return traverse_util.unflatten_dict(factors, sep="/")


def _kernel_factors(factors: Any, name: str = "factors") -> dict[str, tuple[Any, Any]]:
    """``{kernel path: (a, b)}`` of a factors tree, or a ValueError naming ``name``."""
    flat = _flat(factors, name)
    grouped: dict[str, dict] = {}
    for path, v in flat.items():
        parent, _, leaf = path.rpartition("/")
        if not parent or leaf not in FACTOR_NAMES:
            raise ValueError(f"{name}: expected leaves named <kernel path>/a and <kernel path>/b, got {path!r}")
        grouped.setdefault(parent, {})[leaf] = v
    out = {}
    for path, ab in grouped.items():
        if set(ab) != set(FACTOR_NAMES):
            raise ValueError(f"{name}: kernel {path!r} has factors {sorted(ab)}; expected both 'a' and 'b'")
        a, b = ab["a"], ab["b"]
        if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[1] != np.shape(b)[0]:
            raise ValueError(f"{name}: kernel {path!r} has factors a {tuple(np.shape(a))} and b {tuple(np.shape(b))}; "
                             "expected a [fan_in, r] and b [r, out]")
        out[path] = (a, b)
    return out


def delta(factor: Mapping[str, Any], alpha: float, shape: Sequence[int]) -> jax.Array:
    """The low-rank update of one kernel, ``(alpha / r) * (a @ b).reshape(shape)`` (Hu et al.
    2021, eq. 3: the ``(alpha / r) B A`` term, transposed to the ``[in, out]`` kernel layout).

    Args:
      factor: ``{"a": [fan_in, r], "b": [r, out]}``.
      alpha: the LoRA scale numerator; the update is scaled by alpha / r, so the learning rate
        need not be retuned when r changes (paper sec. 4.1).
      shape: the kernel's shape, ``[..., out]`` with ``prod(shape[:-1]) == fan_in``.
    Returns:
      ``shape``, in the factors' dtype. The product runs at full precision
      (``Precision.HIGHEST``: a TPU's default bfloat16 passes would round the update).
    """
    alpha = check_alpha(alpha)
    a, b = factor["a"], factor["b"]
    shape = tuple(int(s) for s in shape)
    if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[1] != np.shape(b)[0] \
            or (np.shape(a)[0], np.shape(b)[1]) != (int(np.prod(shape[:-1])), shape[-1]):
        raise ValueError(f"factor: a {tuple(np.shape(a))} and b {tuple(np.shape(b))} do not make a kernel of shape "
                         f"{shape}; expected a [prod(shape[:-1]), r] and b [r, shape[-1]]")
    r = np.shape(a)[1]
    return (alpha / r) * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(shape)


def _apply(params: Any, factors: Any, alpha: float, sign: float, name: str) -> dict:
    alpha = check_alpha(alpha)
    flat = _flat(params, name)
    for path, (a, b) in _kernel_factors(factors).items():
        if path not in flat:
            raise ValueError(f"factors: kernel path {path!r} is not in {name} (paths such as {sorted(flat)[:4]}); "
                             "expected factors made by jdiff.lora.init for this network")
        w = flat[path]
        update = delta({"a": a, "b": b}, alpha, np.shape(w))
        compute = jnp.promote_types(jnp.result_type(w), jnp.result_type(update))
        flat[path] = (jnp.asarray(w, compute) + sign * update.astype(compute)).astype(jnp.result_type(w))
    return traverse_util.unflatten_dict(flat, sep="/")


def merge(params: Any, factors: Any, alpha: float) -> dict:
    """``params`` with every factored kernel replaced by ``W0 + (alpha / r) * (a @ b).reshape(W0.shape)``
    (Hu et al. 2021, eq. 3 and sec. 4.2: merged, inference costs nothing extra).

    Every other leaf is returned as is; kernels keep their dtype (the sum is computed in at least
    the factors' precision, then cast). Returns a plain nested dict; works inside ``jit`` and
    ``grad`` (``alpha`` is a Python number, static under ``jit``). A ValueError names ``factors``
    if a factor's kernel is missing or mis-shaped, ``alpha`` unless it is a finite float > 0.
    """
    return _apply(params, factors, alpha, 1.0, "params")


def unmerge(merged: Any, factors: Any, alpha: float) -> dict:
    """The inverse of :func:`merge`: ``W - (alpha / r) * (a @ b).reshape(W.shape)`` for every factored
    kernel, every other leaf as is. Exact up to the rounding of the two additions (a few ulps of
    the larger of W and the update)."""
    return _apply(merged, factors, alpha, -1.0, "merged")


def num_params(tree: Any) -> int:
    """The number of scalars in a pytree of arrays (e.g. the factors, to compare with the network's)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _to_json(meta: Any) -> str:
    if hasattr(meta, "to_dict"):  # an ml_collections.ConfigDict
        meta = meta.to_dict()
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta: expected a mapping (e.g. rank, alpha, targets, the base model's config), "
                         f"got {type(meta).__name__}")

    def plain(v):
        if hasattr(v, "to_dict"):
            v = v.to_dict()
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, (np.generic, np.ndarray)):
            return v.tolist()
        return v

    try:
        return json.dumps(plain(meta), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta: expected JSON-serialisable values (str, int, float, bool, None, lists, dicts), "
                         f"got {e}") from None


def save(path: str | os.PathLike, factors: Any, meta: Mapping[str, Any]) -> str:
    """Write ``factors`` and ``meta`` to one small standalone file at ``path``; returns the path.

    The file is msgpack (``flax.serialization``): ``{"format": "jdiff.lora", "version": 1,
    "meta": <meta as a JSON string>, "factors": <the factors as NumPy arrays>}``. ``meta`` should
    say how to use the factors (rank, alpha, targets, the base network's name and config; see
    :attr:`jdiff.models.lora.LoRA.meta`); it must be JSON-serialisable (tuples come back as lists).
    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    meta_json = _to_json(meta)
    _kernel_factors(factors)  # a well-formed factors tree, or a ValueError naming factors
    host = jax.tree.map(np.asarray, jax.device_get(_flat(factors, "factors")))
    payload = {"format": _FORMAT, "version": _VERSION, "meta": meta_json,
               "factors": traverse_util.unflatten_dict(host, sep="/")}
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(factors, meta)`` from a file written by :func:`save`; the factors as a plain nested dict of
    NumPy arrays (bit-identical to what was saved). Raises a ValueError naming ``path`` if the file
    is missing or is not a jdiff LoRA file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no LoRA file at {path!r}; expected a file written by jdiff.lora.save")
    with open(path, "rb") as f:
        data = f.read()
    try:
        payload = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise ValueError(f"path: {path!r} is not a msgpack file ({type(e).__name__}: {e}); "
                         "expected a file written by jdiff.lora.save") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"path: {path!r} is not a jdiff LoRA file (no format {_FORMAT!r} marker); "
                         "expected a file written by jdiff.lora.save")
    if payload.get("version") != _VERSION:
        raise ValueError(f"path: {path!r} has LoRA file version {payload.get('version')!r}; expected {_VERSION}")
    return payload["factors"], json.loads(payload["meta"])
