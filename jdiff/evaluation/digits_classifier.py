"""The offline feature network for digits: a small CNN standing in for Inception-v3.

FID, the Inception Score and precision/recall need a feature network trained on natural
images (Heusel et al. 2017 use Inception-v3's pool3 features and logits). No such weights
can be downloaded where jdiff is built and tested, and Inception features mean little for
8x8 digits anyway, so jdiff ships a classifier trained on the digits' own train split, the
practice of the DDPM/score-model literature on MNIST-like data. Its penultimate layer (64
ReLU units) plays the role of pool3, its logits the role of Inception's class scores. In the
shipped weights 10 of the 64 units never fire on real digits, so feature covariances are
rank-deficient; :func:`jdiff.metrics.frechet_distance` needs no regularising offset for that.
The shipped weights classify 299 of the 300 test digits correctly (99.67%).

Architecture (8x8x1 in, "SAME" 3x3 convolutions)::

    conv1 16 -> ReLU -> conv2 32 -> ReLU -> 2x2 average pool (4x4x32)
    -> conv3 64 -> ReLU -> flatten (1024) -> embed Dense 64 -> ReLU = features
    -> dropout (training only) -> head Dense 10 = logits

The weights live in ``digits_classifier.npz`` next to this file, written by
``tools/train_digits_classifier.py`` (seeded, shift and noise augmentation, AdamW); the
file holds one float32 array per parameter under its '/'-joined path
(``params/conv1/kernel``, ...) and the scalars ``test_accuracy``, ``seed`` and
``num_steps``. It loads with ``np.load(allow_pickle=False)``.
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

__all__ = [
    "DigitsClassifier",
    "DIGITS_CLASSIFIER_FILE",
    "DIGITS_FEATURE_DIM",
    "digits_features",
    "flatten_params",
    "unflatten_params",
    "load_digits_classifier",
    "load_digits_classifier_metadata",
    "resolve_digits_classifier",
    "save_digits_classifier",
    "validate_digit_images",
]

DIGITS_CLASSIFIER_FILE = "digits_classifier.npz"
DIGITS_FEATURE_DIM = 64
DIGITS_IMAGE_SHAPE = (8, 8, 1)
_METADATA_KEYS = ("test_accuracy", "seed", "num_steps")
_PARAM_ROOT = "params"


class DigitsClassifier(nn.Module):
    """CNN classifier for 8x8x1 digits returning ``(features [B, D], logits [B, K])``.

    Fields: ``conv_channels`` (widths of the three 3x3 convolutions), ``feature_dim`` (D,
    the penultimate width used as the feature space of FID and precision/recall),
    ``num_classes`` (K), ``dropout_rate`` (on the features, training only).

    Call: ``x: [B, 8, 8, 1]`` float in [-1, 1]; ``train=True`` enables dropout and then
    needs a ``'dropout'`` rng.
    """

    conv_channels: Sequence[int] = (16, 32, 64)
    feature_dim: int = DIGITS_FEATURE_DIM
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
        x = nn.relu(nn.Conv(c2, (3, 3), padding="SAME", name="conv2")(x))
        # Average rather than max pooling: the features vary smoothly with stroke intensity,
        # which FID between blurry samples and real digits relies on.
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c3, (3, 3), padding="SAME", name="conv3")(x))
        x = x.reshape((x.shape[0], -1))
        features = nn.relu(nn.Dense(self.feature_dim, name="embed")(x))
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, name="head")(h)
        return features, logits


# --------------------------------------------------------------------------- (de)serialisation


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables ``{'params': {...}}`` -> ``{'params/conv1/kernel': array, ...}`` (NumPy)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return {key: np.asarray(value) for key, value in flat.items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`; values become ``jnp`` arrays."""
    return traverse_util.unflatten_dict({key: jnp.asarray(value) for key, value in flat.items()}, sep="/")


def save_digits_classifier(
    path: str | os.PathLike, params: Mapping[str, Any], *, test_accuracy: float, seed: int, num_steps: int
) -> None:
    """Write ``params`` and the training record to a pickle-free ``.npz``.

    Args:
      path: destination file.
      params: the variables ``{'params': ...}`` of a :class:`DigitsClassifier` with default fields.
      test_accuracy: accuracy on the 300-image digits test split, in [0, 1].
      seed, num_steps: how the weights were trained (``tools/train_digits_classifier.py``).
    """
    flat = flatten_params(params)
    _check_param_tree(flat, "params")
    if not 0.0 <= float(test_accuracy) <= 1.0:
        raise ValueError(f"test_accuracy: expected a fraction in [0, 1], got {test_accuracy!r}")
    arrays = {key: value.astype(np.float32) for key, value in flat.items()}
    arrays.update(test_accuracy=np.float64(test_accuracy), seed=np.int64(seed), num_steps=np.int64(num_steps))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(DigitsClassifier().init, jax.random.key(0), jnp.zeros((1, *DIGITS_IMAGE_SHAPE), jnp.float32))
    return {key: tuple(value.shape) for key, value in traverse_util.flatten_dict(shapes, sep="/").items()}


def _check_param_tree(flat: Mapping[str, Any], name: str) -> None:
    expected = _expected_shapes()
    got = {key: tuple(np.shape(value)) for key, value in flat.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(
            f"{name}: expected the parameters of DigitsClassifier() {expected}; "
            f"missing {missing}, unexpected {extra}, wrong shapes {[(k, got[k]) for k in wrong]}"
        )


def _open(path: str | os.PathLike | None):
    if path is None:
        return importlib.resources.files("jdiff.evaluation").joinpath(DIGITS_CLASSIFIER_FILE).open("rb")
    return open(path, "rb")


def load_digits_classifier(path: str | os.PathLike | None = None) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The shipped digits classifier (or the one saved at ``path``): ``(module, params)``.

    ``params`` is the Flax variables dict ``{'params': {...}}``, so
    ``module.apply(params, images [B, 8, 8, 1]) -> (features [B, 64], logits [B, 10])``.
    The file is read without pickle, and its parameter names and shapes are checked against
    :class:`DigitsClassifier`.
    """
    with _open(path) as f, np.load(f, allow_pickle=False) as npz:
        flat = {key: npz[key] for key in npz.files if key.startswith(_PARAM_ROOT + "/")}
    _check_param_tree(flat, f"path ({path or DIGITS_CLASSIFIER_FILE})")
    return DigitsClassifier(), unflatten_params(flat)


def load_digits_classifier_metadata(path: str | os.PathLike | None = None) -> dict[str, float | int]:
    """The training record stored with the weights: ``test_accuracy``, ``seed``, ``num_steps``."""
    with _open(path) as f, np.load(f, allow_pickle=False) as npz:
        missing = [key for key in _METADATA_KEYS if key not in npz.files]
        if missing:
            raise ValueError(
                f"path ({path or DIGITS_CLASSIFIER_FILE}): expected metadata keys {_METADATA_KEYS}, missing {missing}"
            )
        return {key: npz[key].item() for key in _METADATA_KEYS}


# --------------------------------------------------------------------------- features


def validate_digit_images(name: str, images: Any, min_count: int = 1) -> np.ndarray:
    """Check ``images`` is a concrete float [N, 8, 8, 1] array in [-1, 1]; return it as float32 NumPy.

    Raises ValueError naming ``name`` otherwise. Samples straight from a sampler may
    overshoot [-1, 1] slightly; clip them first (``jnp.clip(x, -1, 1)``), as one does when
    writing them out as images.
    """
    if isinstance(images, jax.core.Tracer):
        raise ValueError(f"{name}: expected a concrete array (evaluation runs outside jit), got a traced value")
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{name}: expected a float array in [-1, 1], got dtype {dtype}")
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1:] != DIGITS_IMAGE_SHAPE or array.shape[0] < min_count:
        raise ValueError(f"{name}: expected shape [N, 8, 8, 1] with N >= {min_count}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite values, got {int(np.sum(~np.isfinite(array)))} non-finite entries")
    lo, hi = float(array.min()), float(array.max())
    if lo < -1.0 or hi > 1.0:
        raise ValueError(f"{name}: expected values in [-1, 1] (clip samples first), got range [{lo:.4g}, {hi:.4g}]")
    return array.astype(np.float32)


def resolve_digits_classifier(
    module: DigitsClassifier | None, params: Mapping[str, Any] | None
) -> tuple[DigitsClassifier, Mapping[str, Any]]:
    """``(module, params)`` as given, or the shipped classifier when both are None."""
    if (module is None) != (params is None):
        given = "None" if params is None else "given"
        raise ValueError(f"module, params: expected both or neither, got module={module!r} and params {given}")
    if module is None:
        return load_digits_classifier()
    return module, params


@functools.partial(jax.jit, static_argnames="module")
def _apply(module: DigitsClassifier, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return module.apply(params, images)


def digits_features(
    images: Any,
    batch_size: int = 500,
    *,
    module: DigitsClassifier | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Classifier features and logits of digit images, in jitted batches.

    Every batch is padded to ``batch_size`` so one compilation serves any N.

    Args:
      images: float [N, 8, 8, 1] in [-1, 1] (the range of ``jdiff.data.load_digits``).
      batch_size: images per network call, >= 1.
      module, params: the classifier and its variables ``{'params': ...}`` as returned by
        :func:`load_digits_classifier`; both None means the shipped one.

    Returns:
      ``features`` float32 [N, 64] (penultimate ReLU layer, the "pool3" of FID) and
      ``logits`` float32 [N, 10].
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    array = validate_digit_images("images", images)
    module, params = resolve_digits_classifier(module, params)
    n = array.shape[0]
    padded = np.concatenate([array, np.zeros((-n % batch_size, *DIGITS_IMAGE_SHAPE), np.float32)])
    outputs = [_apply(module, params, padded[i : i + batch_size]) for i in range(0, padded.shape[0], batch_size)]
    features = jnp.concatenate([f for f, _ in outputs])[:n]
    logits = jnp.concatenate([l for _, l in outputs])[:n]
    return features, logits
