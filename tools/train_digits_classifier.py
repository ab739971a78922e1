"""Train the digits feature network shipped as ``jdiff/evaluation/digits_classifier.npz``.

The classifier (:class:`jdiff.evaluation.digits_classifier.DigitsClassifier`) is trained on
the 1,497-image digits train split only; the 300-image test split is used once, at the
end, to record the test accuracy in the file. Training is deterministic given ``seed``:
batches are per-epoch permutations drawn from ``fold_in(key, epoch)``, augmentation and
dropout noise from ``fold_in(key, step)``.

Augmentation makes the features robust to what imperfect generated digits look like:
  - shifts by up to ``max_shift`` pixels in each direction (padding with the -1 background),
  - additive Gaussian noise with a per-image std drawn uniformly from [0, max_noise_std],
    then clipping to [-1, 1] (samples are clipped the same way before evaluation).

Usage, from the repository root (takes about a minute on one CPU core):

    python tools/train_digits_classifier.py [--out jdiff/evaluation/digits_classifier.npz]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jdiff import metrics
from jdiff.data import load_digits
from jdiff.evaluation.digits_classifier import DigitsClassifier, digits_features, save_digits_classifier

if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path (the tests)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _classifier_training import check_int_args, random_noise, random_shift, train_classifier  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "jdiff" / "evaluation" / "digits_classifier.npz"


def augment(key: jax.Array, images: jax.Array, max_shift: int, max_noise_std: float) -> jax.Array:
    """Random integer shifts in [-max_shift, max_shift]^2 and Gaussian noise; images [B, 8, 8, 1]."""
    shift_key, std_key, noise_key = jax.random.split(key, 3)
    images = random_shift(shift_key, images, max_shift)
    return random_noise(std_key, noise_key, images, max_noise_std)


def train_digits_classifier(
    *,
    num_steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    warmup_steps: int = 100,
    weight_decay: float = 1e-4,
    dropout_rate: float = 0.1,
    max_shift: int = 1,
    max_noise_std: float = 0.3,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[dict[str, Any], float]:
    """Train :class:`DigitsClassifier` on the digits train split; returns ``(params, test_accuracy)``.

    Cross-entropy on augmented batches, AdamW with linear warm-up and cosine decay to 0.
    ``params`` is the variables dict ``{'params': ...}`` for ``DigitsClassifier()`` (the
    inference module, dropout off); ``test_accuracy`` is measured on the 300-image test split.
    """
    int_args = {"num_steps": (num_steps, 1), "batch_size": (batch_size, 1), "warmup_steps": (warmup_steps, 0), "max_shift": (max_shift, 0)}
    check_int_args(int_args)
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay), ("max_noise_std", max_noise_std)):
        if not float(value) >= 0.0:
            raise ValueError(f"{name}: expected a non-negative float, got {value!r}")
    if warmup_steps >= num_steps:
        raise ValueError(f"warmup_steps: expected fewer than num_steps={num_steps}, got {warmup_steps}")
    train_images, train_labels = load_digits("train")
    if batch_size > train_images.shape[0]:
        raise ValueError(f"batch_size: expected at most the {train_images.shape[0]} training images, got {batch_size}")
    images = jnp.asarray(train_images)
    labels = jnp.asarray(train_labels)
    params = train_classifier(
        DigitsClassifier(dropout_rate=dropout_rate),
        images,
        labels,
        lambda key, x: augment(key, x, max_shift, max_noise_std),
        num_steps=num_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        seed=seed,
        log_every=log_every,
    )

    test_images, test_labels = load_digits("test")
    _, logits = digits_features(test_images, module=DigitsClassifier(), params=params)
    test_accuracy = float(metrics.class_accuracy(logits, jnp.asarray(test_labels)))
    return jax.device_get(params), test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="destination .npz")
    parser.add_argument("--num_steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=500)
    args = parser.parse_args()
    params, test_accuracy = train_digits_classifier(num_steps=args.num_steps, seed=args.seed, log_every=args.log_every)
    save_digits_classifier(args.out, params, test_accuracy=test_accuracy, seed=args.seed, num_steps=args.num_steps)
    print(f"test accuracy {test_accuracy:.4f}; wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
