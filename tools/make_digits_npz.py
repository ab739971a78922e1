"""Regenerate ``jdiff/data/digits.npz`` from scikit-learn's copy of the UCI digits.

The embedded dataset is the 8x8 "Optical Recognition of Handwritten Digits" set
(E. Alpaydin and C. Kaynak, 1998; UCI Machine Learning Repository,
https://doi.org/10.24432/C50P49, licensed CC BY 4.0). scikit-learn ships its 1,797-image
test partition (13 writers) as ``sklearn.datasets.load_digits``. Each pixel counts the "on"
pixels of a 4x4 block of a 32x32 bitmap, so values are integers in 0..16.

Written arrays (``np.savez_compressed``):
  images       uint8 [1797, 8, 8, 1]  values 0..16, scikit-learn's order
  labels       uint8 [1797]           digit 0..9
  test_indices int16 [300]            sorted indices of the held-out split

The split is fixed, stratified and uses no random numbers, so it cannot drift with a
NumPy version: within each class, taking the examples in file order (n_c of them), the
test examples are positions floor((j + 0.5) * n_c / 30) for j = 0..29. That spreads the 30
test digits of every class evenly through the file (and so across its writers) and gives
300 test / 1,497 train images.

scikit-learn is needed only here, not by jdiff. Usage, from the repository root:

    python tools/make_digits_npz.py [--out jdiff/data/digits.npz]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

TEST_PER_CLASS = 30
NUM_CLASSES = 10


def build_arrays() -> dict[str, np.ndarray]:
    """The arrays stored in digits.npz, built from ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits  # a tool-only dependency

    digits = load_digits()
    pixels = np.asarray(digits.images)
    if pixels.shape != (1797, 8, 8) or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError(f"unexpected scikit-learn digits: shape {pixels.shape}, expected (1797, 8, 8) integers")
    if pixels.min() < 0 or pixels.max() > 16:
        raise ValueError(f"unexpected pixel range [{pixels.min()}, {pixels.max()}], expected within [0, 16]")
    labels = np.asarray(digits.target)
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        positions = np.floor((np.arange(TEST_PER_CLASS) + 0.5) * len(members) / TEST_PER_CLASS).astype(np.int64)
        test.append(members[positions])
    return {
        "images": pixels.astype(np.uint8)[..., None],
        "labels": labels.astype(np.uint8),
        "test_indices": np.sort(np.concatenate(test)).astype(np.int16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = pathlib.Path(__file__).resolve().parents[1] / "jdiff" / "data" / "digits.npz"
    parser.add_argument("--out", type=pathlib.Path, default=default_out, help="where to write the .npz")
    args = parser.parse_args()
    arrays = build_arrays()
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): "
          + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
