"""Quality numbers for digit samples: FID, Inception Score, precision/recall, accuracy, diversity.

All feature-space metrics use the shipped digits classifier
(:mod:`jdiff.evaluation.digits_classifier`) in place of Inception-v3, and compare against
a split of the embedded digits (:func:`jdiff.data.load_digits`):

- ``fid``: Fréchet distance between Gaussians fitted to the classifier's 64-d penultimate
  features of the samples and of the reference split (Heusel et al. 2017, eq. 6).
- ``inception_score``: exp(E_x KL(p(y|x) || p(y))) from the classifier's softmax, one
  split over all samples (Salimans et al. 2016, sec. 4); 1 (no class information) to 10.
- ``precision``, ``recall``: k-NN manifold precision and recall in the same feature space
  (Kynkaanniemi et al. 2019, eqs. 1-3) with k = 3, the paper's value. The test split has
  only 300 images, so its k-NN balls are wider than the paper's 50k-image ones and both
  numbers read optimistic in absolute terms; compare models against each other and
  against :func:`reference_floor`, not against published values.
- ``class_accuracy`` (when labels are given): fraction of samples the classifier assigns to
  their conditioning label.
- ``mean_pairwise_distance``: mean L2 distance over all unordered pairs of samples in pixel
  space ([-1, 1] scale, 64 pixels), a diversity measure that needs no feature network;
  with labels also per class and its unweighted mean over classes.

FID on a few hundred images is biased upwards (the bias shrinks like 1/N), so only compare
FIDs computed with the same number of samples against the same reference split.
:func:`reference_floor` gives the values that real data reach (train split vs test split).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import metrics
from jdiff.data import DIGITS_NUM_CLASSES, load_digits
from jdiff.evaluation.digits_classifier import (
    DigitsClassifier,
    digits_features,
    resolve_digits_classifier,
    validate_digit_images,
)

__all__ = [
    "PRECISION_RECALL_K",
    "REFERENCE_SPLITS",
    "evaluate_digit_samples",
    "mean_pairwise_distance",
    "reference_floor",
]

PRECISION_RECALL_K = 3
REFERENCE_SPLITS = ("test", "train")
_PAIRWISE_CHUNK = 1024


def mean_pairwise_distance(images: Any) -> float:
    """Mean Euclidean distance over all N (N - 1) / 2 unordered pairs of images, [N, ...] with N >= 2.

    Each image is flattened; distances come from ||a||^2 + ||b||^2 - 2 a.b in float64 over
    row blocks, so memory stays O(block * N) for any N.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"images: expected at least 2 images along the first axis, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    sq = np.sum(x * x, axis=1)
    total = 0.0
    for start in range(0, n, _PAIRWISE_CHUNK):
        block = x[start : start + _PAIRWISE_CHUNK]
        d2 = sq[start : start + block.shape[0], None] + sq[None, :] - 2.0 * (block @ x.T)
        # Rounding leaves the self-distances at +-1e-14 instead of 0; sqrt would lift them to 1e-7.
        d2[np.arange(block.shape[0]), start + np.arange(block.shape[0])] = 0.0
        total += float(np.sum(np.sqrt(np.maximum(d2, 0.0))))
    # Every unordered pair was summed twice (i, j) and (j, i).
    return total / (n * (n - 1))


def _validate_labels(labels: Any, n: int) -> np.ndarray:
    if isinstance(labels, jax.core.Tracer):
        raise ValueError("labels: expected a concrete array (evaluation runs outside jit), got a traced value")
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {array.dtype}")
    if array.shape != (n,):
        raise ValueError(f"labels: expected shape [{n}] (one label per sample), got {array.shape}")
    if array.min() < 0 or array.max() >= DIGITS_NUM_CLASSES:
        raise ValueError(
            f"labels: expected digits in [0, {DIGITS_NUM_CLASSES}), got min {array.min()}, max {array.max()}"
        )
    return array.astype(np.int32)


def _feature_stats(features: jax.Array) -> metrics.FeatureStats:
    return metrics.update(metrics.init(features.shape[1], features.dtype), features)


def evaluate_digit_samples(
    samples: Any,
    labels: Any | None = None,
    reference: str = "test",
    *,
    batch_size: int = 500,
    module: DigitsClassifier | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score digit samples against a digits split with the digits classifier.

    Args:
      samples: float [N, 8, 8, 1] in [-1, 1] (clip sampler output first), N >= 4 (the
        k-NN radii of precision/recall need k + 1 = 4 points).
      labels: optional int [N] digits 0..9, the classes the samples were conditioned on.
      reference: "test" (300 images, the default) or "train" (1,497 images).
      batch_size: images per classifier call.
      module, params: the feature network (both None: the shipped classifier).

    Returns:
      A dict of Python numbers: ``fid``, ``inception_score``, ``precision``, ``recall``,
      ``mean_pairwise_distance``, ``num_samples``, ``num_reference``; with ``labels`` also
      ``class_accuracy``, ``mean_pairwise_distance_per_class`` ({digit: distance} for
      digits with >= 2 samples) and ``mean_pairwise_distance_within_class`` (their
      unweighted mean; NaN if no digit has 2 samples).
    """
    array = validate_digit_images("samples", samples, min_count=PRECISION_RECALL_K + 1)
    n = array.shape[0]
    label_array = None if labels is None else _validate_labels(labels, n)
    if reference not in REFERENCE_SPLITS:
        raise ValueError(f"reference: expected one of {REFERENCE_SPLITS}, got {reference!r}")
    module, params = resolve_digits_classifier(module, params)

    reference_images, _ = load_digits(reference)
    fake_features, fake_logits = digits_features(array, batch_size, module=module, params=params)
    real_features, _ = digits_features(reference_images, batch_size, module=module, params=params)

    # Features are float32, but the FID's matrix root runs in float64: with fewer samples than
    # feature dimensions, or units that never fire, the covariances are singular and a float32
    # root would be accurate only to ~sqrt(eps32) of their scale (see metrics.frechet_distance).
    with jax.enable_x64(True):
        real64, fake64 = (jnp.asarray(np.asarray(f, np.float64)) for f in (real_features, fake_features))
        fid = metrics.frechet_distance_from_stats(_feature_stats(real64), _feature_stats(fake64))
    inception_score, _ = metrics.inception_score(jax.nn.softmax(fake_logits, axis=-1))
    precision, recall = metrics.precision_recall(real_features, fake_features, k=PRECISION_RECALL_K)
    result: dict[str, Any] = {
        "fid": float(fid),
        "inception_score": float(inception_score),
        "precision": float(precision),
        "recall": float(recall),
        "mean_pairwise_distance": mean_pairwise_distance(array),
        "num_samples": n,
        "num_reference": int(reference_images.shape[0]),
    }
    if label_array is not None:
        result["class_accuracy"] = float(metrics.class_accuracy(fake_logits, jnp.asarray(label_array)))
        per_class = {
            digit: mean_pairwise_distance(array[label_array == digit])
            for digit in range(DIGITS_NUM_CLASSES)
            if np.sum(label_array == digit) >= 2
        }
        result["mean_pairwise_distance_per_class"] = per_class
        within = float(np.mean(list(per_class.values()))) if per_class else float("nan")
        result["mean_pairwise_distance_within_class"] = within
    return result


def reference_floor(
    *, batch_size: int = 500, module: DigitsClassifier | None = None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`evaluate_digit_samples` of the whole train split (1,497 digits, with labels) vs the test split.

    The values real data reach: the FID floor (train and test digits are different
    handwriting samples, and 300 reference images bias FID upwards), and the precision,
    recall, Inception Score, class accuracy and diversity of real digits. The classifier
    was trained on this split, so its class accuracy here is an upper bound.
    """
    images, labels = load_digits("train")
    return evaluate_digit_samples(images, labels, reference="test", batch_size=batch_size, module=module, params=params)
