"""The embedded offline dataset: UCI 8x8 handwritten digits.

Source and licence: "Optical Recognition of Handwritten Digits", E. Alpaydin and C. Kaynak
(1998), UCI Machine Learning Repository, https://doi.org/10.24432/C50P49, licensed under
Creative Commons Attribution 4.0 (CC BY 4.0). jdiff ships the 1,797-image partition that
scikit-learn distributes as ``sklearn.datasets.load_digits``: 13 writers, 10 classes, each
pixel the count of "on" pixels in a 4x4 block of a 32x32 bitmap (an integer in 0..16).

The copy in ``jdiff/data/digits.npz`` (46 kB) was written by ``tools/make_digits_npz.py``,
which also fixes the split: 30 test images per class (300 test, 1,497 train), chosen by
evenly spaced positions within each class, so no random generator is involved.
"""

from __future__ import annotations

import importlib.resources

import numpy as np

__all__ = ["load_digits", "DIGITS_SPLITS", "DIGITS_NUM_CLASSES", "DIGITS_SHAPE", "DIGITS_MAX_VALUE"]

DIGITS_SPLITS = ("train", "test")
"""The digits' splits: ``train`` (1,497 images) and ``test`` (300, 30 per class)."""

DIGITS_NUM_CLASSES = 10
"""The digits' 10 classes, 0 to 9."""

DIGITS_SHAPE = (8, 8, 1)
"""(H, W, C) of a digit image: 8x8, one channel."""

DIGITS_MAX_VALUE = 16
"""The largest raw pixel value (a count of "on" pixels in a 4x4 block, 0..16), which
:func:`load_digits` maps to 1 when it scales pixels to [-1, 1]."""


def _raw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with importlib.resources.files("jdiff.data").joinpath("digits.npz").open("rb") as f:
        with np.load(f) as npz:
            images, labels, test_indices = npz["images"], npz["labels"], npz["test_indices"]
    is_test = np.zeros(labels.shape[0], dtype=bool)
    is_test[test_indices] = True
    return images, labels, is_test


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load a split of the embedded digits, scaled to [-1, 1].

    Pixel values v in 0..16 become v / 8 - 1, so 0 -> -1 and 16 -> 1 exactly.

    Args:
      split: "train" (1,497 images) or "test" (300 images, 30 per class).

    Returns:
      images: float32 [N, 8, 8, 1] in [-1, 1].
      labels: int32 [N], the digit 0..9.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split: expected one of {DIGITS_SPLITS}, got {split!r}")
    images, labels, is_test = _raw()
    keep = is_test if split == "test" else ~is_test
    scaled = images[keep].astype(np.float32) * np.float32(2.0 / DIGITS_MAX_VALUE) - np.float32(1.0)
    return scaled, labels[keep].astype(np.int32)
