"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT licence): 28x28 grayscale, 10 classes.

Read offline from the four original IDX files, which Debian's ``dataset-fashion-mnist``
package installs under ``/usr/share/datasets/fashion-mnist/``
(``apt-get update && apt-get install -y dataset-fashion-mnist``), or from another directory
holding the same four ``*-ubyte.gz`` files; failing that, through
``tfds.data_source("fashion_mnist")`` when the TFDS copy is prepared in the array_record
format. Train 60,000 / test 10,000 images, 6,000 / 1,000 per class, as published.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic
number (2051 for images, 2049 for labels), one big-endian int32 per dimension (N, rows,
cols for images; N for labels), then the uint8 values in C order. Every file is checked
against the expected magic, dimensions, count and length; a truncated or corrupt file is
a ValueError that names it.

Downsampling (``resolution`` < 28) is area averaging, :func:`area_downsample`: each output
pixel is the mean of the input over its footprint, input pixels cut by the footprint's
border weighted by the covered fraction (the exact area integral, as OpenCV's INTER_AREA).
For 28 -> 14 that is the 2x2 block mean; for 28 -> 16 each output pixel averages a 1.75x1.75
footprint (PIL's BOX filter would instead give whole weight to each pixel whose centre falls
inside it). It runs once, when the split is loaded, and a
cascade's low-resolution conditioning uses the same function.

``jdiff/data/fashion_mnist_sample.npz`` (written by ``tools/make_fashion_mnist_sample.py``)
holds 300 test images, 30 per class at evenly spaced positions within each class, as uint8
(``images`` [300, 28, 28], ``labels`` [300], ``test_indices`` [300] into the t10k files):
a stand-in for tests on machines without the package, not a benchmark.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
import pathlib
import zlib
from typing import Any

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NUM_CLASSES",
    "FASHION_MNIST_SHAPE",
    "FASHION_MNIST_SPLIT_SIZES",
    "FashionMnistNotFoundError",
    "area_downsample",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "load_fashion_mnist_uint8",
    "read_idx",
]

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files, the default
``data_dir``."""

FASHION_MNIST_SHAPE = (28, 28, 1)
"""(H, W, C) of a Fashion-MNIST image: 28x28 grayscale."""

FASHION_MNIST_NUM_CLASSES = 10
"""Fashion-MNIST's 10 classes."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
"""The class names of the release, by label 0..9."""

FASHION_MNIST_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
"""The number of images of each split, as published (6,000 / 1,000 per class)."""

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""split -> (images file, labels file), the gzipped IDX files of the original release."""

SAMPLE_FILE = "fashion_mnist_sample.npz"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
INSTALL_HINT = (
    "install the Debian package (as root: apt-get update && apt-get install -y dataset-fashion-mnist), "
    "or point data.data_dir at a directory holding the four *-ubyte.gz files, or prepare the TFDS copy "
    "(tfds build fashion_mnist --file_format=array_record, or tfds.data_source('fashion_mnist', download=True))"
)


class FashionMnistNotFoundError(FileNotFoundError):
    """Neither the IDX files nor a prepared TFDS copy of Fashion-MNIST are available."""


def read_idx(path: str | os.PathLike, magic: int, dims: tuple[int | None, ...]) -> np.ndarray:
    """The uint8 array of one gzipped IDX file, checked against what the caller expects.

    Args:
      path: a ``.gz`` IDX file.
      magic: the expected magic number (2051 images, 2049 labels); it encodes the uint8
        type and the number of dimensions.
      dims: the expected dimensions, None where any value is accepted.

    Returns:
      uint8 array of shape ``dims`` (the header's values where ``dims`` has None).
    """
    path = pathlib.Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: expected a gzip-compressed IDX file, but it cannot be decompressed ({e})") from None
    header_size = 4 * (1 + len(dims))
    if len(raw) < header_size:
        raise ValueError(f"{path}: expected an IDX header of {header_size} bytes, got a file of {len(raw)} bytes")
    header = np.frombuffer(raw, dtype=">i4", count=1 + len(dims))
    if int(header[0]) != magic:
        raise ValueError(f"{path}: expected IDX magic number {magic}, got {int(header[0])}")
    found = tuple(int(d) for d in header[1:])
    if any(want is not None and want != got for want, got in zip(dims, found)):
        raise ValueError(f"{path}: expected dimensions {dims} (None: any), got {found}")
    size = int(np.prod(found))
    if len(raw) != header_size + size:
        raise ValueError(
            f"{path}: expected {header_size + size} bytes for dimensions {found} (truncated or corrupt), "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(found)


@functools.lru_cache(maxsize=4)
def _read_split_idx(directory: str, split: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    # Cached per process (the arrays are read-only views); ``stamp`` (sizes and mtimes) makes a
    # rewritten file a cache miss.
    del stamp
    images_file, labels_file = (pathlib.Path(directory) / f for f in FASHION_MNIST_FILES[split])
    n = FASHION_MNIST_SPLIT_SIZES[split]
    images = read_idx(images_file, IDX_IMAGES_MAGIC, (n, 28, 28))
    labels = read_idx(labels_file, IDX_LABELS_MAGIC, (n,))
    if labels.max() >= FASHION_MNIST_NUM_CLASSES:
        raise ValueError(f"{labels_file}: expected labels in [0, 10), got a maximum of {labels.max()}")
    return images, labels


def _tfds_data_source(split: str, data_dir: str | None) -> tuple[Any, str]:
    """``(tfds.data_source(...), "")``, or ``(None, why not)`` when no prepared copy can be opened."""
    try:
        import tensorflow_datasets as tfds  # slow to import; only this fallback needs it

        return tfds.data_source("fashion_mnist", split=split, data_dir=data_dir, download=False), ""
    except Exception as e:  # any failure to open the optional fallback means "not there"
        lines = str(e).strip().splitlines()
        return None, lines[0] if lines else type(e).__name__


def _read_split_tfds(source: Any) -> tuple[np.ndarray, np.ndarray]:
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8).reshape(28, 28) for r in records])
    labels = np.asarray([r["label"] for r in records], np.uint8)
    return images, labels


def area_downsample(images: np.ndarray, resolution: int) -> np.ndarray:
    """Area-average ``images`` [N, H, W, C] (H = W) down to [N, R, R, C], R <= H.

    Output pixel i covers input rows [i H / R, (i + 1) H / R); it is the mean over that
    footprint, a boundary pixel weighted by the fraction of it inside. Separable: one [R, H]
    matrix applied to rows and columns, in float64, returned as float32; for an integer factor
    H / R, the same block means computed as means of [H/R, H/R] blocks. A convex combination, so
    [-1, 1] stays [-1, 1].
    """
    images = np.asarray(images)
    side = images.shape[1]
    if images.ndim != 4 or images.shape[2] != side:
        raise ValueError(f"images: expected square images [N, H, H, C], got shape {images.shape}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or not 1 <= resolution <= side:
        raise ValueError(f"resolution: expected an int in [1, {side}] (area downsampling only), got {resolution!r}")
    if resolution == side:
        return images.astype(np.float32)
    if side % resolution == 0:  # the same means as the weights below give, summed block by block
        f = side // resolution
        blocks = images.astype(np.float64).reshape(len(images), resolution, f, resolution, f, images.shape[3])
        return blocks.mean(axis=(2, 4)).astype(np.float32)
    # Exact rational edges: edge k of the output grid sits at input coordinate k * side / resolution.
    edges = np.arange(resolution + 1) * side / resolution
    starts, ends = edges[:-1, None], edges[1:, None]
    pixel = np.arange(side)[None, :]
    overlap = np.clip(np.minimum(ends, pixel + 1) - np.maximum(starts, pixel), 0.0, None)
    weights = overlap / (side / resolution)
    out = np.einsum("ih,nhwc,jw->nijc", weights, images.astype(np.float64), weights, optimize=True)
    return out.astype(np.float32)


def _to_float(images_u8: np.ndarray, resolution: int | None) -> np.ndarray:
    # v / 127.5 - 1: 0 -> -1 and 255 -> 1 exactly, as for every uint8 source of jdiff.
    images = images_u8[..., None].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if resolution is not None and resolution != FASHION_MNIST_SHAPE[0]:
        images = area_downsample(images, resolution)
    return images


def _check_resolution(resolution: Any) -> None:
    is_int = isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool)
    if resolution is not None and (not is_int or not 1 <= resolution <= 28):
        raise ValueError(
            f"resolution: expected None (28) or an int in [1, 28] (Fashion-MNIST is 28x28 and is only "
            f"downsampled), got {resolution!r}"
        )


def load_fashion_mnist_uint8(split: str = "train", data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The raw split: uint8 images [N, 28, 28] and uint8 labels [N] (see :func:`load_fashion_mnist`)."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split: expected one of {tuple(FASHION_MNIST_FILES)} for fashion_mnist, got {split!r}")
    directory = pathlib.Path(data_dir if data_dir is not None else FASHION_MNIST_DEFAULT_DIR)
    paths = [directory / f for f in FASHION_MNIST_FILES[split]]
    present = [p.exists() for p in paths]
    if all(present):
        stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
        return _read_split_idx(str(directory.resolve()), split, stamp)
    if any(present):
        missing = [str(p) for p, ok in zip(paths, present) if not ok]
        raise FashionMnistNotFoundError(
            f"data_dir: expected both IDX files of the {split!r} split in {directory}, but {missing} is missing; "
            f"{INSTALL_HINT}"
        )
    source, reason = _tfds_data_source(split, data_dir)
    if source is not None:
        return _read_split_tfds(source)
    raise FashionMnistNotFoundError(
        f"fashion_mnist: expected the IDX files {list(FASHION_MNIST_FILES[split])} in {directory} "
        f"(data.data_dir, default {FASHION_MNIST_DEFAULT_DIR}), or a prepared TFDS copy (tfds.data_source said: "
        f"{reason}); none found. To get it, {INSTALL_HINT}. For tests without either, data.name="
        "'fashion_mnist_sample' is the 300-image sample shipped with jdiff."
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | None = None, resolution: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split scaled to [-1, 1].

    Args:
      split: "train" (60,000 images) or "test" (10,000).
      data_dir: the directory of the four IDX ``*-ubyte.gz`` files (default the Debian
        location); without them, the TFDS data_dir (None: TFDS's default) of the fallback.
      resolution: None or 28 to keep 28x28, or R < 28 to area-downsample to RxR.

    Returns:
      images: float32 [N, R, R, 1] in [-1, 1] (v / 127.5 - 1 of the uint8 pixels).
      labels: int32 [N], the class 0..9 (:data:`FASHION_MNIST_CLASSES`).
    """
    _check_resolution(resolution)
    images, labels = load_fashion_mnist_uint8(split, data_dir)
    return _to_float(images, resolution), labels.astype(np.int32)


def load_fashion_mnist_sample(resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 300 test images shipped with jdiff (30 per class), as :func:`load_fashion_mnist` returns them."""
    _check_resolution(resolution)
    with importlib.resources.files("jdiff.data").joinpath(SAMPLE_FILE).open("rb") as f:
        with np.load(f, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    return _to_float(images, resolution), labels.astype(np.int32)
