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
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jdiff.evaluation import feature_network
from jdiff.evaluation.feature_network import validate_images

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
"""The file name of the shipped Fashion-MNIST classifier's weights (beside this module), read by
:func:`load_fashion_mnist_classifier` when no path is given."""

FASHION_MNIST_FEATURE_DIM = 128
"""D, the width of the Fashion-MNIST classifier's penultimate features: the feature space of FID
and precision/recall on Fashion-MNIST."""

FASHION_MNIST_IMAGE_SHAPE = (28, 28, 1)
"""(H, W, C) of the images the classifier takes: 28x28 grayscale."""


class FashionMnistClassifier(feature_network.SmallCNN):
    """CNN classifier for 28x28x1 images returning ``(features [B, D], logits [B, K])``.

    Fields: ``conv_channels`` (widths of the three 3x3 convolutions), ``feature_dim`` (D,
    the feature space of FID and precision/recall), ``num_classes`` (K), ``dropout_rate``
    (on the features, training only).

    Call: ``x: [B, 28, 28, 1]`` float in [-1, 1]; ``train=True`` enables dropout and then
    needs a ``'dropout'`` rng.
    """

    conv_channels: Sequence[int] = (32, 64, 64)
    feature_dim: int = FASHION_MNIST_FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        c1, c2, c3 = self.conv_channels
        x = nn.relu(nn.Conv(c1, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c2, (3, 3), padding="SAME", name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c3, (3, 3), padding="SAME", name="conv3")(x))
        return feature_network.classifier_head(x, self.feature_dim, self.num_classes, self.dropout_rate, train)


# --------------------------------------------------------------------------- (de)serialisation


def save_fashion_mnist_classifier(
    path: str | os.PathLike, params: Mapping[str, Any], *, test_accuracy: float, seed: int, num_steps: int
) -> None:
    """Write ``params`` ({'params': ...} of ``FashionMnistClassifier()``) and the training record, without pickle."""
    feature_network.save_classifier(
        path, params, test_accuracy=test_accuracy, seed=seed, num_steps=num_steps,
        module_cls=FashionMnistClassifier, image_shape=FASHION_MNIST_IMAGE_SHAPE,
    )


def load_fashion_mnist_classifier(
    path: str | os.PathLike | None = None,
) -> tuple[FashionMnistClassifier, dict[str, Any]]:
    """The shipped classifier (or the one saved at ``path``): ``(module, params)``.

    ``module.apply(params, images [B, 28, 28, 1]) -> (features [B, 128], logits [B, 10])``.
    Read without pickle; parameter names and shapes are checked.
    """
    return feature_network.load_classifier(
        path,
        module_cls=FashionMnistClassifier,
        image_shape=FASHION_MNIST_IMAGE_SHAPE,
        file_name=FASHION_MNIST_CLASSIFIER_FILE,
    )


def load_fashion_mnist_classifier_metadata(path: str | os.PathLike | None = None) -> dict[str, float | int]:
    """The training record stored with the weights: ``test_accuracy``, ``seed``, ``num_steps``."""
    return feature_network.load_classifier_metadata(path, file_name=FASHION_MNIST_CLASSIFIER_FILE)


def resolve_fashion_mnist_classifier(
    module: nn.Module | None, params: Mapping[str, Any] | None
) -> tuple[nn.Module, Mapping[str, Any]]:
    """``(module, params)`` as given, or the shipped classifier when both are None."""
    return feature_network.resolve_classifier(module, params, _shipped)


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[FashionMnistClassifier, dict[str, Any]]:
    return load_fashion_mnist_classifier()


# --------------------------------------------------------------------------- features


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
    return feature_network.batched_features(
        images,
        batch_size,
        module,
        params,
        image_shape=FASHION_MNIST_IMAGE_SHAPE,
        resolve=resolve_fashion_mnist_classifier,
        at_most_n=True,
    )
