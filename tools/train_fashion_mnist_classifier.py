"""Train the Fashion-MNIST feature network shipped as ``jdiff/evaluation/fashion_mnist_classifier.npz``.

:class:`jdiff.evaluation.fashion_mnist_classifier.FashionMnistClassifier` is trained on the
60,000-image train split only; the 10,000-image test split is used once, at the end, to
record the test accuracy in the file. Training is deterministic given ``seed``: batches are
per-epoch permutations drawn from ``fold_in(key, epoch)``, augmentation and dropout noise
from ``fold_in(key, step)``.

Light augmentation, so the features tolerate what imperfect samples look like:
  - shifts by up to ``max_shift`` pixels in each direction (padding with the -1 background),
  - a left-right mirror with probability 1/2 (Fashion-MNIST classes are mirror-invariant),
  - additive Gaussian noise with a per-image std drawn uniformly from [0, max_noise_std],
    then clipping to [-1, 1] (samples are clipped the same way before evaluation).

Usage, from the repository root, with the Debian package ``dataset-fashion-mnist`` installed
(about 10 minutes on 2 shared CPU cores):

    nice -n 10 python tools/train_fashion_mnist_classifier.py [--out jdiff/evaluation/fashion_mnist_classifier.npz]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from jdiff import metrics
from jdiff.data import load_fashion_mnist
from jdiff.evaluation.fashion_mnist_classifier import (
    FashionMnistClassifier,
    fashion_mnist_features,
    save_fashion_mnist_classifier,
)

if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path (the tests)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _classifier_training import check_int_args, random_noise, random_shift, train_classifier  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "jdiff" / "evaluation" / "fashion_mnist_classifier.npz"


def augment(key: jax.Array, images: jax.Array, max_shift: int, max_noise_std: float) -> jax.Array:
    """Random shifts in [-max_shift, max_shift]^2, mirrors and Gaussian noise; images [B, H, W, 1]."""
    shift_key, flip_key, std_key, noise_key = jax.random.split(key, 4)
    images = random_shift(shift_key, images, max_shift)
    flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
    return random_noise(std_key, noise_key, images, max_noise_std)


def train_fashion_mnist_classifier(
    *,
    num_steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    warmup_steps: int = 100,
    weight_decay: float = 1e-4,
    dropout_rate: float = 0.2,
    max_shift: int = 1,
    max_noise_std: float = 0.05,
    seed: int = 0,
    data_dir: str | None = None,
    log_every: int = 0,
) -> tuple[dict[str, Any], float]:
    """Train :class:`FashionMnistClassifier` on the train split; returns ``(params, test_accuracy)``.

    Cross-entropy on augmented batches, AdamW with linear warm-up and cosine decay to 0.
    ``params`` is the variables dict for ``FashionMnistClassifier()`` (dropout off);
    ``test_accuracy`` is measured on the 10,000 test images.
    """
    int_args = {"num_steps": (num_steps, 1), "batch_size": (batch_size, 1), "warmup_steps": (warmup_steps, 0),
                "max_shift": (max_shift, 0)}
    check_int_args(int_args)
    if warmup_steps >= num_steps:
        raise ValueError(f"warmup_steps: expected fewer than num_steps={num_steps}, got {warmup_steps}")
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    images, labels = jnp.asarray(train_images), jnp.asarray(train_labels)
    params = train_classifier(
        FashionMnistClassifier(dropout_rate=dropout_rate),
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

    test_images, test_labels = load_fashion_mnist("test", data_dir)
    _, logits = fashion_mnist_features(test_images, module=FashionMnistClassifier(), params=params)
    test_accuracy = float(metrics.class_accuracy(logits, jnp.asarray(test_labels)))
    return jax.device_get(params), test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="destination .npz")
    parser.add_argument("--num_steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="directory of the IDX files (default: the Debian location)")
    parser.add_argument("--log_every", type=int, default=250)
    args = parser.parse_args()
    start = time.time()
    params, test_accuracy = train_fashion_mnist_classifier(
        num_steps=args.num_steps, seed=args.seed, data_dir=args.data_dir, log_every=args.log_every
    )
    save_fashion_mnist_classifier(args.out, params, test_accuracy=test_accuracy, seed=args.seed, num_steps=args.num_steps)
    print(f"test accuracy {test_accuracy:.4f}; {time.time() - start:.0f}s; wrote {args.out} "
          f"({args.out.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
