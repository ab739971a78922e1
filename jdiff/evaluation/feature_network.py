"""What the shipped feature networks (digits, Fashion-MNIST) have in common.

:mod:`~jdiff.evaluation.digits_classifier` and :mod:`~jdiff.evaluation.fashion_mnist_classifier`
each define a small CNN returning ``(features, logits)`` and ship its weights as a
pickle-free ``.npz`` next to this file: one float32 array per parameter under its
'/'-joined path (``params/conv1/kernel``, ...) and the scalars ``test_accuracy``, ``seed``
and ``num_steps``. The functions here do the (de)serialisation, the input checks and the
padded, jitted batching for either; they take the module class (or instance), the image
shape and the shipped file name, so the two modules only name their own.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "SmallCNN",
    "classifier_head",
    "flatten_params",
    "unflatten_params",
    "save_classifier",
    "load_classifier",
    "load_classifier_metadata",
    "resolve_classifier",
    "validate_images",
    "batched_features",
]

METADATA_KEYS = ("test_accuracy", "seed", "num_steps")
PARAM_ROOT = "params"
_PACKAGE = "jdiff.evaluation"

# --------------------------------------------------------------------------- the module


class SmallCNN(nn.Module):
    """Fields and their checks for the shipped three-convolution classifiers; subclasses set the
    defaults and write ``__call__`` (ending in :func:`classifier_head`).

    Fields: ``conv_channels`` (widths of the three convolutions), ``feature_dim`` (the feature
    width), ``num_classes``, ``dropout_rate`` (on the features, training only).
    """

    conv_channels: Sequence[int]
    feature_dim: int
    num_classes: int = 10
    dropout_rate: float = 0.0

    def __post_init__(self):
        channels = tuple(self.conv_channels)
        if len(channels) != 3 or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in channels):
            raise ValueError(f"conv_channels: expected three positive ints, got {self.conv_channels!r}")
        for name in ("feature_dim", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate: expected a float in [0, 1), got {self.dropout_rate!r}")
        super().__post_init__()


def classifier_head(
    x: jax.Array, feature_dim: int, num_classes: int, dropout_rate: float, train: bool
) -> tuple[jax.Array, jax.Array]:
    """Inside a compact ``__call__``: flatten -> embed Dense -> ReLU = features -> dropout -> head Dense = logits."""
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(nn.Dense(feature_dim, name="embed")(x))
    h = nn.Dropout(dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(num_classes, name="head")(h)
    return features, logits


# --------------------------------------------------------------------------- (de)serialisation


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables ``{'params': {...}}`` -> ``{'params/conv1/kernel': array, ...}`` (NumPy)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return {key: np.asarray(value) for key, value in flat.items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`; values become ``jnp`` arrays."""
    return traverse_util.unflatten_dict({key: jnp.asarray(value) for key, value in flat.items()}, sep="/")


def _expected_shapes(module_cls: type[nn.Module], image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(module_cls().init, jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32))
    return {key: tuple(value.shape) for key, value in traverse_util.flatten_dict(shapes, sep="/").items()}


def _check_param_tree(
    flat: Mapping[str, Any], name: str, module_cls: type[nn.Module], image_shape: tuple[int, ...]
) -> None:
    expected = _expected_shapes(module_cls, image_shape)
    got = {key: tuple(np.shape(value)) for key, value in flat.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(
            f"{name}: expected the parameters of {module_cls.__name__}() {expected}; "
            f"missing {missing}, unexpected {extra}, wrong shapes {[(k, got[k]) for k in wrong]}"
        )


def save_classifier(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    *,
    test_accuracy: float,
    seed: int,
    num_steps: int,
    module_cls: type[nn.Module],
    image_shape: tuple[int, ...],
) -> None:
    """Write ``params`` (checked against ``module_cls()``) and the training record to a pickle-free ``.npz``."""
    flat = flatten_params(params)
    _check_param_tree(flat, "params", module_cls, image_shape)
    if not 0.0 <= float(test_accuracy) <= 1.0:
        raise ValueError(f"test_accuracy: expected a fraction in [0, 1], got {test_accuracy!r}")
    arrays = {key: value.astype(np.float32) for key, value in flat.items()}
    arrays.update(test_accuracy=np.float64(test_accuracy), seed=np.int64(seed), num_steps=np.int64(num_steps))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def _open(path: str | os.PathLike | None, file_name: str):
    if path is None:
        return importlib.resources.files(_PACKAGE).joinpath(file_name).open("rb")
    return open(path, "rb")


def load_classifier(
    path: str | os.PathLike | None, *, module_cls: type[nn.Module], image_shape: tuple[int, ...], file_name: str
) -> tuple[nn.Module, dict[str, Any]]:
    """``(module_cls(), params)`` from ``path``, or from the shipped ``file_name`` when ``path`` is None."""
    with _open(path, file_name) as f, np.load(f, allow_pickle=False) as npz:
        flat = {key: npz[key] for key in npz.files if key.startswith(PARAM_ROOT + "/")}
    _check_param_tree(flat, f"path ({path or file_name})", module_cls, image_shape)
    return module_cls(), unflatten_params(flat)


def load_classifier_metadata(path: str | os.PathLike | None, *, file_name: str) -> dict[str, float | int]:
    """The training record stored with the weights: ``test_accuracy``, ``seed``, ``num_steps``."""
    with _open(path, file_name) as f, np.load(f, allow_pickle=False) as npz:
        missing = [key for key in METADATA_KEYS if key not in npz.files]
        if missing:
            raise ValueError(f"path ({path or file_name}): expected metadata keys {METADATA_KEYS}, missing {missing}")
        return {key: npz[key].item() for key in METADATA_KEYS}


def resolve_classifier(
    module: nn.Module | None, params: Mapping[str, Any] | None, shipped: Callable[[], tuple[nn.Module, Any]]
) -> tuple[nn.Module, Mapping[str, Any]]:
    """``(module, params)`` as given, or ``shipped()`` when both are None."""
    if (module is None) != (params is None):
        given = "None" if params is None else "given"
        raise ValueError(f"module, params: expected both or neither, got module={module!r} and params {given}")
    if module is None:
        return shipped()
    return module, params


# --------------------------------------------------------------------------- features


def validate_images(name: str, images: Any, image_shape: tuple[int, ...], min_count: int = 1) -> np.ndarray:
    """Check ``images`` is a concrete float [N, *image_shape] array in [-1, 1]; return it as float32 NumPy."""
    if isinstance(images, jax.core.Tracer):
        raise ValueError(f"{name}: expected a concrete array (evaluation runs outside jit), got a traced value")
    dtype = np.asarray(images).dtype if not hasattr(images, "dtype") else np.dtype(images.dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{name}: expected a float array in [-1, 1], got dtype {dtype}")
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1:] != tuple(image_shape) or array.shape[0] < min_count:
        shape = ", ".join(map(str, image_shape))
        raise ValueError(f"{name}: expected shape [N, {shape}] with N >= {min_count}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite values, got {int(np.sum(~np.isfinite(array)))} non-finite entries")
    lo, hi = float(array.min()), float(array.max())
    if lo < -1.0 or hi > 1.0:
        raise ValueError(f"{name}: expected values in [-1, 1] (clip samples first), got range [{lo:.4g}, {hi:.4g}]")
    return array.astype(np.float32)


@functools.partial(jax.jit, static_argnames="module")
def _apply(module: nn.Module, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return module.apply(params, images)


def batched_features(
    images: Any,
    batch_size: int,
    module: nn.Module | None,
    params: Mapping[str, Any] | None,
    *,
    image_shape: tuple[int, ...],
    resolve: Callable[[nn.Module | None, Mapping[str, Any] | None], tuple[nn.Module, Mapping[str, Any]]],
    at_most_n: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(features, logits)`` of ``images`` in jitted batches, each padded to ``batch_size``.

    ``images`` are checked by :func:`validate_images`, ``resolve(module, params)`` picks the
    network; ``at_most_n`` lowers ``batch_size`` to the number of images.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    array = validate_images("images", images, image_shape)
    module, params = resolve(module, params)
    n = array.shape[0]
    if at_most_n:
        batch_size = min(int(batch_size), n)
    padded = np.concatenate([array, np.zeros((-n % batch_size, *image_shape), np.float32)])
    outputs = [_apply(module, params, padded[i : i + batch_size]) for i in range(0, padded.shape[0], batch_size)]
    features = jnp.concatenate([f for f, _ in outputs])[:n]
    logits = jnp.concatenate([l for _, l in outputs])[:n]
    return features, logits
