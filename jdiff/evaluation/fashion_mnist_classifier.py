"""The offline feature network for Fashion-MNIST: a small CNN standing in for Inception-v3.

As for the digits (:mod:`jdiff.evaluation.digits_classifier`), no Inception weights can be
downloaded where jdiff is built, and Inception features of 28x28 grayscale clothes mean
little, so jdiff ships a classifier trained on the Fashion-MNIST train split (60,000
images). Its penultimate layer (128 ReLU units) plays the role of pool3 in FID and
precision/recall, its logits the role of Inception's class scores in the Inception Score.
The shipped weights' accuracy on the 10,000 test images is stored with them
(:func:`load_fashion_mnist_classifier_metadata`).

Architecture (28x28x1 in, "SAME" 3x3 convolutions; max pooling: with average pooling the
same network and budget reached only 91.1% test accuracy)::

    conv1 32 -> ReLU -> 2x2 max pool (14x14) -> conv2 64 -> ReLU -> 2x2 max pool (7x7)
    -> conv3 64 -> ReLU -> flatten (3136) -> embed Dense 128 -> ReLU = features
    -> dropout (training only) -> head Dense 10 = logits

The weights live in ``fashion_mnist_classifier.npz`` next to this file, written by
``tools/train_fashion_mnist_classifier.py`` (seeded, shift / flip / noise augmentation,
AdamW): one float32 array per parameter under its '/'-joined path and the scalars
``test_accuracy``, ``seed`` and ``num_steps``; it loads with ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.evaluation.digits_classifier import flatten_params, unflatten_params

__all__ = [
    "FASHION_MNIST_CLASSIFIER_FILE",
    "FASHION_MNIST_FEATURE_DIM",
    "FASHION_MNIST_IMAGE_SHAPE",
    "FashionMnistClassifier",
    "fashion_mnist_features",
    "load_fashion_mnist_classifier",
    "load_fashion_mnist_classifier_metadata",
    "resolve_fashion_mnist_classifier",
    "save_fashion_mnist_classifier",
    "validate_images",
]

FASHION_MNIST_CLASSIFIER_FILE = "fashion_mnist_classifier.npz"
FASHION_MNIST_FEATURE_DIM = 128
FASHION_MNIST_IMAGE_SHAPE = (28, 28, 1)
_METADATA_KEYS = ("test_accuracy", "seed", "num_steps")
_PARAM_ROOT = "params"


class FashionMnistClassifier(nn.Module):
    """CNN classifier for 28x28x1 images returning ``(features [B, D], logits [B, K])``.

    Fields: ``conv_channels`` (widths of the three 3x3 convolutions), ``feature_dim`` (D,
    the feature space of FID and precision/recall), ``num_classes`` (K), ``dropout_rate``
    (on the features, training only).

    Call: ``x: [B, 28, 28, 1]`` float in [-1, 1]; ``train=True`` enables dropout and then
    needs a ``'dropout'`` rng.
    """

    conv_channels: Sequence[int] = (32, 64, 64)
    feature_dim: int = FASHION_MNIST_FEATURE_DIM
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        c1, c2, c3 = self.conv_channels
        x = nn.relu(nn.Conv(c1, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c2, (3, 3), padding="SAME", name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c3, (3, 3), padding="SAME", name="conv3")(x))
        x = x.reshape((x.shape[0], -1))
        features = nn.relu(nn.Dense(self.feature_dim, name="embed")(x))
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, name="head")(h)
        return features, logits


# --------------------------------------------------------------------------- (de)serialisation


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    init = FashionMnistClassifier().init
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *FASHION_MNIST_IMAGE_SHAPE), jnp.float32))
    return {key: tuple(value.shape) for key, value in traverse_util.flatten_dict(shapes, sep="/").items()}


def _check_param_tree(flat: Mapping[str, Any], name: str) -> None:
    expected = _expected_shapes()
    got = {key: tuple(np.shape(value)) for key, value in flat.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(
            f"{name}: expected the parameters of FashionMnistClassifier() {expected}; "
            f"missing {missing}, unexpected {extra}, wrong shapes {[(k, got[k]) for k in wrong]}"
        )


def save_fashion_mnist_classifier(
    path: str | os.PathLike, params: Mapping[str, Any], *, test_accuracy: float, seed: int, num_steps: int
) -> None:
    """Write ``params`` ({'params': ...} of ``FashionMnistClassifier()``) and the training record, without pickle."""
    flat = flatten_params(params)
    _check_param_tree(flat, "params")
    if not 0.0 <= float(test_accuracy) <= 1.0:
        raise ValueError(f"test_accuracy: expected a fraction in [0, 1], got {test_accuracy!r}")
    arrays = {key: value.astype(np.float32) for key, value in flat.items()}
    arrays.update(test_accuracy=np.float64(test_accuracy), seed=np.int64(seed), num_steps=np.int64(num_steps))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def _open(path: str | os.PathLike | None):
    if path is None:
        return importlib.resources.files("jdiff.evaluation").joinpath(FASHION_MNIST_CLASSIFIER_FILE).open("rb")
    return open(path, "rb")


def load_fashion_mnist_classifier(
    path: str | os.PathLike | None = None,
) -> tuple[FashionMnistClassifier, dict[str, Any]]:
    """The shipped classifier (or the one saved at ``path``): ``(module, params)``.

    ``module.apply(params, images [B, 28, 28, 1]) -> (features [B, 128], logits [B, 10])``.
    Read without pickle; parameter names and shapes are checked.
    """
    with _open(path) as f, np.load(f, allow_pickle=False) as npz:
        flat = {key: npz[key] for key in npz.files if key.startswith(_PARAM_ROOT + "/")}
    _check_param_tree(flat, f"path ({path or FASHION_MNIST_CLASSIFIER_FILE})")
    return FashionMnistClassifier(), unflatten_params(flat)


def load_fashion_mnist_classifier_metadata(path: str | os.PathLike | None = None) -> dict[str, float | int]:
    """The training record stored with the weights: ``test_accuracy``, ``seed``, ``num_steps``."""
    with _open(path) as f, np.load(f, allow_pickle=False) as npz:
        missing = [key for key in _METADATA_KEYS if key not in npz.files]
        if missing:
            raise ValueError(
                f"path ({path or FASHION_MNIST_CLASSIFIER_FILE}): expected metadata keys {_METADATA_KEYS}, "
                f"missing {missing}"
            )
        return {key: npz[key].item() for key in _METADATA_KEYS}


def resolve_fashion_mnist_classifier(
    module: nn.Module | None, params: Mapping[str, Any] | None
) -> tuple[nn.Module, Mapping[str, Any]]:
    """``(module, params)`` as given, or the shipped classifier when both are None."""
    if (module is None) != (params is None):
        given = "None" if params is None else "given"
        raise ValueError(f"module, params: expected both or neither, got module={module!r} and params {given}")
    if module is None:
        return _shipped()
    return module, params


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[FashionMnistClassifier, dict[str, Any]]:
    return load_fashion_mnist_classifier()


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


def fashion_mnist_features(
    images: Any,
    batch_size: int = 500,
    *,
    module: nn.Module | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Classifier features and logits of 28x28x1 images, in jitted batches padded to ``batch_size``.

    Args:
      images: float [N, 28, 28, 1] in [-1, 1] (the range of ``jdiff.data.load_fashion_mnist``).
      batch_size: images per network call, >= 1.
      module, params: the classifier and its variables; both None means the shipped one.

    Returns:
      ``features`` float32 [N, 128] and ``logits`` float32 [N, 10].
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    array = validate_images("images", images, FASHION_MNIST_IMAGE_SHAPE)
    module, params = resolve_fashion_mnist_classifier(module, params)
    n = array.shape[0]
    batch_size = min(int(batch_size), n)
    padded = np.concatenate([array, np.zeros((-n % batch_size, *FASHION_MNIST_IMAGE_SHAPE), np.float32)])
    outputs = [_apply(module, params, padded[i : i + batch_size]) for i in range(0, padded.shape[0], batch_size)]
    features = jnp.concatenate([f for f, _ in outputs])[:n]
    logits = jnp.concatenate([l for _, l in outputs])[:n]
    return features, logits
