"""Evaluators: functions that score generated samples, chosen by name in the config
(``config.eval.evaluator``; ``--evaluator`` of ``launch.evaluate``).

An evaluator is ``score(samples [N, H, W, C] in [-1, 1], labels [N] int or None) -> dict`` of
Python numbers, plus ``check(image_shape, num_classes, data_name)``, which raises a ValueError
when the data is not what it can score; the training loop calls it before training starts.
Built in (:data:`EVALUATORS`): ``"digits"`` (:func:`jdiff.evaluation.evaluate_digit_samples`: FID,
Inception Score, precision/recall and class accuracy in the feature space of the shipped digits
classifier), ``"fashion_mnist"`` and ``"fashion_mnist_sample"`` (the same in the feature space of the
shipped Fashion-MNIST classifier, against the Fashion-MNIST files or the 300 images shipped with jdiff).
Add one with :func:`register`::

    from jdiff.evaluation import evaluators
    evaluators.register("my_fid", score=my_score, check=my_check, min_samples=2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from jdiff.evaluation.digits_classifier import DIGITS_IMAGE_SHAPE
from jdiff.evaluation.sample_metrics import (
    PRECISION_RECALL_K,
    check_fashion_mnist_data,
    evaluate_digit_samples,
    score_fashion_mnist_sample_samples,
    score_fashion_mnist_samples,
)

__all__ = ["EVALUATORS", "Evaluator", "get", "register"]


class Evaluator(NamedTuple):
    """A registered evaluator (see the module docstring; :func:`register` makes one).

    Attributes:
      name: what ``config.eval.evaluator`` says.
      score: ``score(samples [N, H, W, C] in [-1, 1], labels [N] int or None) -> dict`` of Python numbers.
      check: ``check(image_shape, num_classes, data_name)``, raising a ValueError when the data is
        not what ``score`` can score (called before training starts).
      min_samples: the fewest samples ``score`` takes.
    """

    name: str
    score: Callable[[np.ndarray, np.ndarray | None], dict[str, Any]]
    check: Callable[[tuple, int | None, str], None]
    min_samples: int = 1


EVALUATORS: dict[str, Evaluator] = {}
"""The evaluator registry: name -> :class:`Evaluator`. Built in: ``digits``, ``fashion_mnist``
(against the Fashion-MNIST test split or a train subset) and ``fashion_mnist_sample`` (the same
network against the 300 images shipped with jdiff); :func:`register` adds more, :func:`get`
looks one up."""


def _accept_any(image_shape: tuple, num_classes: int | None, data_name: str) -> None:
    del image_shape, num_classes, data_name


def register(name: str, score: Callable, check: Callable | None = None, min_samples: int = 1) -> Evaluator:
    """Make ``config.eval.evaluator = name`` score samples with ``score(samples, labels)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty evaluator name, got {name!r}")
    if not callable(score):
        raise ValueError(f"score: expected a callable (samples, labels) -> dict, got {score!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples: expected a positive int, got {min_samples!r}")
    EVALUATORS[name] = Evaluator(name, score, check or _accept_any, min_samples)
    return EVALUATORS[name]


def get(name: str, key: str = "config.eval.evaluator") -> Evaluator | None:
    """The evaluator called ``name`` (None for ``""``: no sample scoring)."""
    if name == "":
        return None
    if name not in EVALUATORS:
        raise ValueError(f"{key}: unknown evaluator {name!r}; expected '' (none) or one of {sorted(EVALUATORS)} "
                         "(jdiff.evaluation.evaluators.register adds more)")
    return EVALUATORS[name]


def _check_digits(image_shape: tuple, num_classes: int | None, data_name: str) -> None:
    if data_name != "digits" or tuple(image_shape) != DIGITS_IMAGE_SHAPE:
        raise ValueError(
            f"config.eval.evaluator: 'digits' scores 8x8x1 digits against the digits test split, but the data is "
            f"{data_name!r} with images {tuple(image_shape)}; set config.eval.evaluator='' (or register an evaluator "
            "for this data) or config.eval.num_samples=0"
        )


def _score_digits(samples: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    return evaluate_digit_samples(samples, labels=labels)


register("digits", _score_digits, _check_digits, min_samples=PRECISION_RECALL_K + 1)

register("fashion_mnist", score_fashion_mnist_samples, check_fashion_mnist_data, min_samples=PRECISION_RECALL_K + 1)
# The same feature network with the 300 images shipped with jdiff as the reference (configs/fashion_mnist.py:small).
register("fashion_mnist_sample", score_fashion_mnist_sample_samples, check_fashion_mnist_data, min_samples=PRECISION_RECALL_K + 1)
