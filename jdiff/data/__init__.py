"""Data for jdiff: the embedded digits, procedural shapes, Fashion-MNIST, TFDS, and the batch pipeline.

Every source yields float32 images in [-1, 1], NHWC, and int32 labels. Sources are
arrays or random-access objects; :func:`batch_at` turns any of them into the batch of a
given training step, a pure function of (seed, step) that each process of a multi-host
job slices for itself.
"""

from jdiff.data import captions
from jdiff.data.datasets import BUILTIN_DATASETS, DATA_CONFIG_KEYS, NO_DATASET, Dataset, get_dataset, image_shape_of
from jdiff.data.digits import DIGITS_NUM_CLASSES, DIGITS_SHAPE, DIGITS_SPLITS, load_digits
from jdiff.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_NUM_CLASSES,
    FASHION_MNIST_SHAPE,
    FashionMnistNotFoundError,
    area_downsample,
    load_fashion_mnist,
    load_fashion_mnist_sample,
)
from jdiff.data.pipeline import batch_at, batch_indices, iterate, source_length, steps_per_epoch
from jdiff.data.shapes import SHAPE_NAMES, ShapeParams, render_shapes, shape_params, shapes
from jdiff.data.tfds_source import TfdsSource, UnknownDatasetError, center_crop_resize, tfds_source

__all__ = [
    "BUILTIN_DATASETS",
    "DATA_CONFIG_KEYS",
    "DIGITS_NUM_CLASSES",
    "DIGITS_SHAPE",
    "DIGITS_SPLITS",
    "Dataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_NUM_CLASSES",
    "FASHION_MNIST_SHAPE",
    "FashionMnistNotFoundError",
    "SHAPE_NAMES",
    "ShapeParams",
    "TfdsSource",
    "UnknownDatasetError",
    "area_downsample",
    "batch_at",
    "batch_indices",
    "center_crop_resize",
    "get_dataset",
    "captions",
    "image_shape_of",
    "NO_DATASET",
    "iterate",
    "load_digits",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "render_shapes",
    "shape_params",
    "shapes",
    "source_length",
    "steps_per_epoch",
    "tfds_source",
]
