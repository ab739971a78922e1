"""Quality numbers for samples: FID, Inception Score, precision/recall, accuracy, diversity.

Feature-space metrics use a classifier trained by jdiff in place of Inception-v3, one per
dataset (a *feature space*, :data:`FEATURE_SPACES`), and compare against a reference split:

- ``"digits"``: 8x8x1 samples, the digits classifier
  (:mod:`jdiff.evaluation.digits_classifier`, 64-d features), references the embedded
  digits' "test" (300 images) or "train" (1,497) split (:func:`jdiff.data.load_digits`).
- ``"fashion_mnist"``: 28x28x1 samples, the Fashion-MNIST classifier
  (:mod:`jdiff.evaluation.fashion_mnist_classifier`, 128-d features), references "test"
  (all 10,000 test images) or "train" (a fixed class-balanced 10,000-image subset of the
  60,000, :func:`fashion_mnist_train_subset`; 10,000 keeps the k-NN radii of
  precision/recall and the reference features a few seconds' work on a CPU). Needs the IDX
  files (:mod:`jdiff.data.fashion_mnist`).
- ``"fashion_mnist_sample"``: the same network against the 300 test images shipped with
  jdiff (both reference names), for tests on machines without the dataset.

The numbers:

- ``fid``: Fréchet distance between Gaussians fitted to the classifier's penultimate
  features of the samples and of the reference split (Heusel et al. 2017, eq. 6).
- ``inception_score``: exp(E_x KL(p(y|x) || p(y))) from the classifier's softmax, one
  split over all samples (Salimans et al. 2016, sec. 4); 1 (no class information) to 10.
- ``precision``, ``recall``: k-NN manifold precision and recall in the same feature space
  (Kynkaanniemi et al. 2019, eqs. 1-3) with k = 3, the paper's value. The digits test split
  has only 300 images, so its k-NN balls are wider than the paper's 50k-image ones and both
  numbers read optimistic in absolute terms; compare models against each other and
  against :func:`reference_floor`, not against published values.
- ``class_accuracy`` (when labels are given): fraction of samples the classifier assigns to
  their conditioning label.
- ``mean_pairwise_distance``: mean L2 distance over all unordered pairs of samples in pixel
  space ([-1, 1] scale), a diversity measure that needs no feature network; with labels
  also per class and its unweighted mean over classes.

FID on a few hundred images is biased upwards (the bias shrinks like 1/N), so only compare
FIDs computed with the same number of samples against the same reference split.
:func:`reference_floor` gives the values that real data reach (train split vs test split);
:func:`fid_floor` the floor's FID alone for N train images, what a model scored with N
samples should be read against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import metrics
from jdiff.data import DIGITS_NUM_CLASSES, load_digits
from jdiff.data import fashion_mnist as fashion_mnist_data
from jdiff.evaluation import fashion_mnist_classifier as fm_classifier
from jdiff.evaluation.digits_classifier import (
    DIGITS_IMAGE_SHAPE,
    DigitsClassifier,
    digits_features,
    resolve_digits_classifier,
    validate_digit_images,
)

__all__ = [
    "FEATURE_SPACES",
    "FASHION_MNIST_REFERENCE_SIZE",
    "FeatureSpace",
    "PRECISION_RECALL_K",
    "REFERENCE_SPLITS",
    "check_fashion_mnist_data",
    "evaluate_digit_samples",
    "evaluate_samples",
    "fashion_mnist_train_subset",
    "fid_floor",
    "mean_pairwise_distance",
    "reference_floor",
    "score_fashion_mnist_sample_samples",
    "score_fashion_mnist_samples",
]

PRECISION_RECALL_K = 3
"""k of the k-NN precision and recall (Kynkaanniemi et al. 2019: 3, the paper's value); scoring
needs at least k + 1 samples."""

REFERENCE_SPLITS = ("test", "train")
"""The names of a feature space's reference sets: ``test`` and ``train``."""

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


def _validate_labels(labels: Any, n: int, num_classes: int = DIGITS_NUM_CLASSES, noun: str = "digits") -> np.ndarray:
    if isinstance(labels, jax.core.Tracer):
        raise ValueError("labels: expected a concrete array (evaluation runs outside jit), got a traced value")
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {array.dtype}")
    if array.shape != (n,):
        raise ValueError(f"labels: expected shape [{n}] (one label per sample), got {array.shape}")
    if array.min() < 0 or array.max() >= num_classes:
        raise ValueError(f"labels: expected {noun} in [0, {num_classes}), got min {array.min()}, max {array.max()}")
    return array.astype(np.int32)


def _feature_stats(features: jax.Array) -> metrics.FeatureStats:
    return metrics.update(metrics.init(features.shape[1], features.dtype), features)


# --------------------------------------------------------------------------- feature spaces


class FeatureSpace(NamedTuple):
    """A feature network and the real images it compares samples against.

    validate(name, images, min_count) -> float32 NumPy [N, *image_shape] (ValueError otherwise);
    features(images, batch_size, module=, params=) -> (features [N, D], logits [N, K]);
    resolve(module, params) -> (module, params), the shipped network when both are None;
    reference(split) -> (images, labels) for each split name in ``reference_splits``.
    ``label_noun`` names the classes in error messages.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    validate: Callable[..., np.ndarray]
    features: Callable[..., tuple[jax.Array, jax.Array]]
    resolve: Callable[..., tuple[Any, Any]]
    reference: Callable[[str], tuple[np.ndarray, np.ndarray]]
    reference_splits: tuple[str, ...] = REFERENCE_SPLITS
    label_noun: str = "class labels"


FASHION_MNIST_REFERENCE_SIZE = 10_000
"""The size of the Fashion-MNIST ``train`` reference, a fixed class-balanced subset of the 60,000
(:func:`fashion_mnist_train_subset`): it keeps the k-NN radii and the reference features a few
seconds' work on a CPU."""


def _interleaved_class_order(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices visiting the classes round-robin, each class's members at evenly spaced positions.

    Any prefix of length n is as class-balanced as n allows, and deterministic.
    """
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    per_class = min(len(m) for m in members)
    picks = [m[((np.arange(per_class) + 0.5) * len(m) / per_class).astype(np.int64)] for m in members]
    # Round-robin: position j of every class, then position j + 1, ...
    return np.stack(picks, axis=1).reshape(-1)


def fashion_mnist_train_subset(num_images: int = FASHION_MNIST_REFERENCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_images`` of a fixed class-interleaved order of the 60,000 train images.

    Class-balanced up to one image per class (exactly balanced for multiples of 10).
    Returns float32 images [n, 28, 28, 1] in [-1, 1] and int32 labels [n].
    """
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or not 1 <= num_images <= 60_000:
        raise ValueError(f"num_images: expected an int in [1, 60000], got {num_images!r}")
    images, labels = fashion_mnist_data.load_fashion_mnist_uint8("train")
    idx = np.sort(_interleaved_class_order(labels, fashion_mnist_data.FASHION_MNIST_NUM_CLASSES)[:num_images])
    return fashion_mnist_data._to_float(images[idx], None), labels[idx].astype(np.int32)


def _fashion_mnist_reference(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        return fashion_mnist_data.load_fashion_mnist("test")
    return fashion_mnist_train_subset(FASHION_MNIST_REFERENCE_SIZE)


def _fashion_mnist_sample_reference(split: str) -> tuple[np.ndarray, np.ndarray]:
    del split  # one set of 300 images stands for both
    return fashion_mnist_data.load_fashion_mnist_sample()


def _validate_28(name: str, images: Any, min_count: int = 1) -> np.ndarray:
    return fm_classifier.validate_images(name, images, fm_classifier.FASHION_MNIST_IMAGE_SHAPE, min_count)


_FASHION = dict(
    image_shape=fm_classifier.FASHION_MNIST_IMAGE_SHAPE,
    num_classes=fashion_mnist_data.FASHION_MNIST_NUM_CLASSES,
    validate=_validate_28,
    features=fm_classifier.fashion_mnist_features,
    resolve=fm_classifier.resolve_fashion_mnist_classifier,
)
FEATURE_SPACES: dict[str, FeatureSpace] = {
    "digits": FeatureSpace(
        "digits", DIGITS_IMAGE_SHAPE, DIGITS_NUM_CLASSES, validate_digit_images, digits_features,
        resolve_digits_classifier, load_digits, label_noun="digits",
    ),
    "fashion_mnist": FeatureSpace("fashion_mnist", reference=_fashion_mnist_reference, **_FASHION),
    "fashion_mnist_sample": FeatureSpace("fashion_mnist_sample", reference=_fashion_mnist_sample_reference, **_FASHION),
}
"""The feature spaces by name (``digits``, ``fashion_mnist``, ``fashion_mnist_sample``, as
described above): the network and reference images :func:`evaluate_samples` scores against."""


def _feature_space(dataset: str) -> FeatureSpace:
    if dataset not in FEATURE_SPACES:
        raise ValueError(f"dataset: expected one of {tuple(FEATURE_SPACES)}, got {dataset!r}")
    return FEATURE_SPACES[dataset]


@functools.lru_cache(maxsize=8)
def _shipped_reference(dataset: str, reference: str, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The reference features of the shipped networks are computed once per process:
    # for Fashion-MNIST that is 10,000 forward passes.
    space = FEATURE_SPACES[dataset]
    images, labels = space.reference(reference)
    features, _ = space.features(images, batch_size)
    return images, labels, np.asarray(features)


def _reference_features(space, reference, batch_size, module, params):
    if module is None and params is None:
        _, _, features = _shipped_reference(space.name, reference, int(batch_size))
        return features
    images, _ = space.reference(reference)
    features, _ = space.features(images, batch_size, module=module, params=params)
    return np.asarray(features)


def _fid(real_features, fake_features) -> float:
    # Features are float32, but the FID's matrix root runs in float64: with fewer samples than
    # feature dimensions, or units that never fire, the covariances are singular and a float32
    # root would be accurate only to ~sqrt(eps32) of their scale (see metrics.frechet_distance).
    with jax.enable_x64(True):
        real64, fake64 = (jnp.asarray(np.asarray(f, np.float64)) for f in (real_features, fake_features))
        return float(metrics.frechet_distance_from_stats(_feature_stats(real64), _feature_stats(fake64)))


def evaluate_samples(
    samples: Any,
    labels: Any | None = None,
    dataset: str = "digits",
    reference: str = "test",
    *,
    batch_size: int = 500,
    module: Any | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score samples against a reference split in the feature space of ``dataset``'s classifier.

    Args:
      samples: float [N, *image_shape] in [-1, 1] (clip sampler output first): [N, 8, 8, 1]
        for "digits", [N, 28, 28, 1] for "fashion_mnist"; N >= 4 (the k-NN radii of
        precision/recall need k + 1 = 4 points).
      labels: optional int [N] classes 0..9, the classes the samples were conditioned on.
      dataset: a key of :data:`FEATURE_SPACES` ("digits", "fashion_mnist", "fashion_mnist_sample").
      reference: "test" (the default) or "train"; see the module docstring for their sizes.
      batch_size: images per classifier call.
      module, params: the feature network (both None: the shipped classifier of ``dataset``).

    Returns:
      A dict of Python numbers: ``fid``, ``inception_score``, ``precision``, ``recall``,
      ``mean_pairwise_distance``, ``num_samples``, ``num_reference``; with ``labels`` also
      ``class_accuracy``, ``mean_pairwise_distance_per_class`` ({class: distance} for
      classes with >= 2 samples) and ``mean_pairwise_distance_within_class`` (their
      unweighted mean; NaN if no class has 2 samples).
    """
    space = _feature_space(dataset)
    array = space.validate("samples", samples, min_count=PRECISION_RECALL_K + 1)
    n = array.shape[0]
    label_array = None if labels is None else _validate_labels(labels, n, space.num_classes, space.label_noun)
    if reference not in space.reference_splits:
        raise ValueError(f"reference: expected one of {space.reference_splits}, got {reference!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    shipped = module is None and params is None
    module, params = space.resolve(module, params)

    fake_features, fake_logits = space.features(array, batch_size, module=module, params=params)
    real_features = _reference_features(space, reference, batch_size, *((None, None) if shipped else (module, params)))

    fid = _fid(real_features, fake_features)
    inception_score, _ = metrics.inception_score(jax.nn.softmax(fake_logits, axis=-1))
    precision, recall = metrics.precision_recall(jnp.asarray(real_features), fake_features, k=PRECISION_RECALL_K)
    result: dict[str, Any] = {
        "fid": fid,
        "inception_score": float(inception_score),
        "precision": float(precision),
        "recall": float(recall),
        "mean_pairwise_distance": mean_pairwise_distance(array),
        "num_samples": n,
        "num_reference": int(real_features.shape[0]),
    }
    if label_array is not None:
        result["class_accuracy"] = float(metrics.class_accuracy(fake_logits, jnp.asarray(label_array)))
        per_class = {
            c: mean_pairwise_distance(array[label_array == c])
            for c in range(space.num_classes)
            if np.sum(label_array == c) >= 2
        }
        result["mean_pairwise_distance_per_class"] = per_class
        within = float(np.mean(list(per_class.values()))) if per_class else float("nan")
        result["mean_pairwise_distance_within_class"] = within
    return result


def evaluate_digit_samples(
    samples: Any,
    labels: Any | None = None,
    reference: str = "test",
    *,
    batch_size: int = 500,
    module: DigitsClassifier | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_samples` with ``dataset="digits"``: digit samples [N, 8, 8, 1] vs a digits split.

    ``reference`` is "test" (300 images, the default) or "train" (1,497 images).
    """
    return evaluate_samples(samples, labels, "digits", reference, batch_size=batch_size, module=module, params=params)


def _floor_images(space: FeatureSpace, num_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    if space.name == "fashion_mnist":
        return fashion_mnist_train_subset(FASHION_MNIST_REFERENCE_SIZE if num_samples is None else num_samples)
    images, labels = space.reference("train")
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or not (
            PRECISION_RECALL_K + 1 <= num_samples <= images.shape[0]
        ):
            raise ValueError(
                f"num_samples: expected None or an int in [{PRECISION_RECALL_K + 1}, {images.shape[0]}], got {num_samples!r}"
            )
        idx = np.sort(_interleaved_class_order(labels, space.num_classes)[:num_samples])
        images, labels = images[idx], labels[idx]
    return images, labels


def reference_floor(
    *,
    dataset: str = "digits",
    num_samples: int | None = None,
    batch_size: int = 500,
    module: Any | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_samples` of real train images (with labels) vs the test reference.

    The values real data reach: the FID floor (train and test images are different draws,
    and a finite reference biases FID upwards), and the precision, recall, Inception Score,
    class accuracy and diversity of real images. The classifiers were trained on the train
    split, so their class accuracy here is an upper bound.

    Args:
      dataset: "digits" (default: the whole 1,497-image train split vs the 300 test
        images) or "fashion_mnist" (default: the 10,000-image class-balanced train subset
        vs the 10,000 test images).
      num_samples: how many train images (a class-interleaved prefix); None for the default.
        FID's bias depends on it: use the number of samples the model was scored with.
      batch_size, module, params: as in :func:`evaluate_samples`.
    """
    space = _feature_space(dataset)
    images, labels = _floor_images(space, num_samples)
    return evaluate_samples(images, labels, dataset, "test", batch_size=batch_size, module=module, params=params)


@functools.lru_cache(maxsize=16)
def _shipped_fid_floor(dataset: str, num_samples: int, batch_size: int) -> float:
    space = FEATURE_SPACES[dataset]
    images, _ = _floor_images(space, num_samples)
    features, _ = space.features(images, batch_size)
    return _fid(_reference_features(space, "test", batch_size, None, None), features)


def fid_floor(dataset: str, num_samples: int, *, batch_size: int = 500) -> float:
    """FID of ``num_samples`` real train images vs the test reference (the shipped network; cached).

    The floor a model scored with the same number of samples should be read against.
    """
    _feature_space(dataset)
    return _shipped_fid_floor(dataset, int(num_samples), int(batch_size))


def score_fashion_mnist_samples(samples: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """The ``"fashion_mnist"`` evaluator: :func:`evaluate_samples` vs the 10,000 test images,
    plus ``fid_floor``, the FID of as many real train images against the same reference."""
    result = evaluate_samples(samples, labels, "fashion_mnist")
    result["fid_floor"] = fid_floor("fashion_mnist", result["num_samples"])
    return result


def score_fashion_mnist_sample_samples(samples: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """The ``"fashion_mnist_sample"`` evaluator (tests): :func:`evaluate_samples` vs the 300 shipped images."""
    return evaluate_samples(samples, labels, "fashion_mnist_sample")


def check_fashion_mnist_data(image_shape: tuple, num_classes: int | None, data_name: str) -> None:
    """The evaluators' ``check``: Fashion-MNIST data at 28x28x1 with 10 classes (or unlabelled)."""
    if (
        data_name not in ("fashion_mnist", "fashion_mnist_sample")
        or tuple(image_shape) != fm_classifier.FASHION_MNIST_IMAGE_SHAPE
        or num_classes not in (None, fashion_mnist_data.FASHION_MNIST_NUM_CLASSES)
    ):
        raise ValueError(
            f"config.eval.evaluator: 'fashion_mnist' scores 28x28x1 Fashion-MNIST samples (10 classes), but the data "
            f"is {data_name!r} with images {tuple(image_shape)} and num_classes {num_classes}; for a resized copy "
            "(data.resolution < 28) set config.eval.evaluator='' (or register an evaluator for it)"
        )
