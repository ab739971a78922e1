"""Evaluation of generated samples with offline feature networks (no Inception weights needed).

:mod:`~jdiff.evaluation.digits_classifier` and :mod:`~jdiff.evaluation.fashion_mnist_classifier`
hold the small CNNs trained on the digits and Fashion-MNIST train splits whose penultimate
features and logits stand in for Inception-v3's (their shared file format, checks and
batching in :mod:`~jdiff.evaluation.feature_network`);
:mod:`~jdiff.evaluation.sample_metrics` turns samples into FID, Inception Score,
precision/recall, class accuracy and a pixel-space diversity number, using
:mod:`jdiff.metrics` for the formulas. :mod:`~jdiff.evaluation.evaluators` is the registry the
config names (``config.eval.evaluator = "digits"``), :mod:`~jdiff.evaluation.workdir` evaluates
a trained network (``evaluate_loaded``, ``bits_per_dim``) independently of the training loop.
"""

from jdiff.evaluation import evaluators
from jdiff.evaluation.digits_classifier import (
    DIGITS_FEATURE_DIM,
    DigitsClassifier,
    digits_features,
    load_digits_classifier,
    load_digits_classifier_metadata,
    save_digits_classifier,
)
from jdiff.evaluation.fashion_mnist_classifier import (
    FASHION_MNIST_FEATURE_DIM,
    FashionMnistClassifier,
    fashion_mnist_features,
    load_fashion_mnist_classifier,
    load_fashion_mnist_classifier_metadata,
    save_fashion_mnist_classifier,
)
from jdiff.evaluation.sample_metrics import (
    FEATURE_SPACES,
    PRECISION_RECALL_K,
    REFERENCE_SPLITS,
    evaluate_digit_samples,
    evaluate_samples,
    fid_floor,
    mean_pairwise_distance,
    reference_floor,
)

__all__ = [
    "DIGITS_FEATURE_DIM",
    "DigitsClassifier",
    "FASHION_MNIST_FEATURE_DIM",
    "FEATURE_SPACES",
    "FashionMnistClassifier",
    "PRECISION_RECALL_K",
    "REFERENCE_SPLITS",
    "digits_features",
    "evaluate_digit_samples",
    "evaluate_samples",
    "fashion_mnist_features",
    "fid_floor",
    "load_digits_classifier",
    "load_digits_classifier_metadata",
    "load_fashion_mnist_classifier",
    "load_fashion_mnist_classifier_metadata",
    "mean_pairwise_distance",
    "reference_floor",
    "save_digits_classifier",
    "save_fashion_mnist_classifier",
]
