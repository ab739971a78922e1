"""Write a DreamBooth subject folder: one Fashion-MNIST test item and light variants of it.

python tools/make_subject.py --index 0 --out workdirs/subject          # the Debian test set
python tools/make_subject.py --index 0 --out /tmp/s --sample             # the 300 shipped images

Writes 0.png (the item), 1.png (flipped left-right), 2.png and 3.png (shifted by one pixel), and
prints the item's class (pass it as --config.dreambooth.subject_class).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jdiff.data import fashion_mnist  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=int, default=0, help="index of the test item")
    p.add_argument("--out", required=True, help="folder to write the PNGs to")
    p.add_argument("--sample", action="store_true", help="use the 300 images shipped with jdiff")
    a = p.parse_args()
    images, labels = (fashion_mnist.load_fashion_mnist_sample() if a.sample
                      else fashion_mnist.load_fashion_mnist("test", None, None))
    if not 0 <= a.index < len(images):
        p.error(f"--index: expected an index in [0, {len(images)}), got {a.index}")
    x = np.round((images[a.index, ..., 0] + 1) * 127.5).astype(np.uint8)
    variants = [x, x[:, ::-1], np.roll(x, 1, axis=1), np.roll(x, -1, axis=0)]
    os.makedirs(a.out, exist_ok=True)
    for i, v in enumerate(variants):
        Image.fromarray(v).save(os.path.join(a.out, f"{i}.png"))
    print(f"wrote {len(variants)} images of test item {a.index} (class {int(labels[a.index])}) to {a.out}")


if __name__ == "__main__":
    main()
