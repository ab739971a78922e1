"""Evaluation of generated digits with an offline feature network (no Inception weights needed).

:mod:`~jdiff.evaluation.digits_classifier` holds the small CNN trained on the digits train
split whose penultimate features and logits stand in for Inception-v3's;
:mod:`~jdiff.evaluation.sample_metrics` turns samples into FID, Inception Score,
precision/recall, class accuracy and a pixel-space diversity number, using
:mod:`jdiff.metrics` for the formulas.
"""

from jdiff.evaluation.digits_classifier import (
    DIGITS_FEATURE_DIM,
    DigitsClassifier,
    digits_features,
    load_digits_classifier,
    load_digits_classifier_metadata,
    save_digits_classifier,
)
from jdiff.evaluation.sample_metrics import (
    PRECISION_RECALL_K,
    REFERENCE_SPLITS,
    evaluate_digit_samples,
    mean_pairwise_distance,
    reference_floor,
)

__all__ = [
    "DIGITS_FEATURE_DIM",
    "DigitsClassifier",
    "PRECISION_RECALL_K",
    "REFERENCE_SPLITS",
    "digits_features",
    "evaluate_digit_samples",
    "load_digits_classifier",
    "load_digits_classifier_metadata",
    "mean_pairwise_distance",
    "reference_floor",
    "save_digits_classifier",
]
