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

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jdiff.evaluation import feature_network
from jdiff.evaluation.feature_network import flatten_params, unflatten_params

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
"""The file name of the shipped digits classifier's weights (beside this module), read by
:func:`load_digits_classifier` when no path is given."""

DIGITS_FEATURE_DIM = 64
"""D, the width of the digits classifier's penultimate features: the feature space of FID and
precision/recall on digits."""

DIGITS_IMAGE_SHAPE = (8, 8, 1)


class DigitsClassifier(feature_network.SmallCNN):
    """CNN classifier for 8x8x1 digits returning ``(features [B, D], logits [B, K])``.

    Fields: ``conv_channels`` (widths of the three 3x3 convolutions), ``feature_dim`` (D,
    the penultimate width used as the feature space of FID and precision/recall),
    ``num_classes`` (K), ``dropout_rate`` (on the features, training only).

    Call: ``x: [B, 8, 8, 1]`` float in [-1, 1]; ``train=True`` enables dropout and then
    needs a ``'dropout'`` rng.
    """

    conv_channels: Sequence[int] = (16, 32, 64)
    feature_dim: int = DIGITS_FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        c1, c2, c3 = self.conv_channels
        x = nn.relu(nn.Conv(c1, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(c2, (3, 3), padding="SAME", name="conv2")(x))
        # Average rather than max pooling: the features vary smoothly with stroke intensity,
        # which FID between blurry samples and real digits relies on.
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c3, (3, 3), padding="SAME", name="conv3")(x))
        return feature_network.classifier_head(x, self.feature_dim, self.num_classes, self.dropout_rate, train)


# --------------------------------------------------------------------------- (de)serialisation


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
    feature_network.save_classifier(
        path, params, test_accuracy=test_accuracy, seed=seed, num_steps=num_steps,
        module_cls=DigitsClassifier, image_shape=DIGITS_IMAGE_SHAPE,
    )


def load_digits_classifier(path: str | os.PathLike | None = None) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The shipped digits classifier (or the one saved at ``path``): ``(module, params)``.

    ``params`` is the Flax variables dict ``{'params': {...}}``, so
    ``module.apply(params, images [B, 8, 8, 1]) -> (features [B, 64], logits [B, 10])``.
    The file is read without pickle, and its parameter names and shapes are checked against
    :class:`DigitsClassifier`.
    """
    return feature_network.load_classifier(
        path, module_cls=DigitsClassifier, image_shape=DIGITS_IMAGE_SHAPE, file_name=DIGITS_CLASSIFIER_FILE
    )


def load_digits_classifier_metadata(path: str | os.PathLike | None = None) -> dict[str, float | int]:
    """The training record stored with the weights: ``test_accuracy``, ``seed``, ``num_steps``."""
    return feature_network.load_classifier_metadata(path, file_name=DIGITS_CLASSIFIER_FILE)


# --------------------------------------------------------------------------- features


def validate_digit_images(name: str, images: Any, min_count: int = 1) -> np.ndarray:
    """Check ``images`` is a concrete float [N, 8, 8, 1] array in [-1, 1]; return it as float32 NumPy.

    Raises ValueError naming ``name`` otherwise. Samples straight from a sampler may
    overshoot [-1, 1] slightly; clip them first (``jnp.clip(x, -1, 1)``), as one does when
    writing them out as images.
    """
    return feature_network.validate_images(name, images, DIGITS_IMAGE_SHAPE, min_count)


def resolve_digits_classifier(
    module: DigitsClassifier | None, params: Mapping[str, Any] | None
) -> tuple[DigitsClassifier, Mapping[str, Any]]:
    """``(module, params)`` as given, or the shipped classifier when both are None."""
    return feature_network.resolve_classifier(module, params, load_digits_classifier)


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
    return feature_network.batched_features(
        images, batch_size, module, params, image_shape=DIGITS_IMAGE_SHAPE, resolve=resolve_digits_classifier
    )
