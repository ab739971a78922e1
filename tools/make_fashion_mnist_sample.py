"""Write ``jdiff/data/fashion_mnist_sample.npz``: 300 Fashion-MNIST test images, 30 per class.

The images of class c are the test images at positions ``int((j + 0.5) * n_c / 30)``,
j = 0..29, among the n_c = 1,000 test images of that class in file order (the rule of the
digits split), so no random generator is involved. Stored as uint8, without pickle.

Usage, from the repository root, with the Debian package ``dataset-fashion-mnist`` installed:

    python tools/make_fashion_mnist_sample.py [--data_dir /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from jdiff.data.fashion_mnist import FASHION_MNIST_NUM_CLASSES, load_fashion_mnist_uint8

PER_CLASS = 30
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "jdiff" / "data" / "fashion_mnist_sample.npz"


def sample_indices(labels: np.ndarray, per_class: int = PER_CLASS) -> np.ndarray:
    """Sorted test indices: per class, ``per_class`` evenly spaced members in file order."""
    chosen = []
    for c in range(FASHION_MNIST_NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        chosen += [members[int((j + 0.5) * len(members) / per_class)] for j in range(per_class)]
    return np.sort(np.asarray(chosen, np.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="directory of the IDX files (default: the Debian location)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    images, labels = load_fashion_mnist_uint8("test", args.data_dir)
    idx = sample_indices(labels)
    np.savez_compressed(args.out, images=images[idx], labels=labels[idx], test_indices=idx)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB, {idx.size} images)")


if __name__ == "__main__":
    main()
