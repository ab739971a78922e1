"""Any TFDS image dataset as a random-access source, read without TensorFlow.

Built on ``tfds.data_source(name, split=...)``, which reads ArrayRecord files record by
record with NumPy decoding, so neither TensorFlow nor a ``tf.data`` pipeline is involved.
The dataset must already be prepared in the ``array_record`` format under ``data_dir``
(e.g. ``tfds build mnist --file_format=array_record``), or ``download=True`` must be passed;
downloads are off by default because every process of a multi-host job would start one.
Tests use ``tfds.testing.mock_data``, which fakes the records of any registered dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

__all__ = ["TfdsSource", "tfds_source", "UnknownDatasetError", "center_crop_resize"]


class UnknownDatasetError(ValueError):
    """A dataset name that neither TFDS nor ``data_dir`` knows."""


def _to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] in 0..255 -> float32 in [-1, 1] (v / 127.5 - 1)."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Crop the central square of ``image`` (float32 [H, W, C]) and resize it to [R, R, C].

    Downsampling averages each output pixel's footprint (PIL's BOX filter: an exact block
    mean for integer factors), so it does not alias; upsampling is bicubic, clipped back
    to [-1, 1] because the cubic kernel overshoots.
    """
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    if side == resolution:
        return np.ascontiguousarray(square)
    resample = Image.Resampling.BOX if resolution < side else Image.Resampling.BICUBIC
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(square[:, :, c])).resize((resolution, resolution), resample))
        for c in range(square.shape[2])
    ]
    return np.clip(np.stack(channels, axis=-1), -1.0, 1.0).astype(np.float32)


class TfdsSource:
    """A TFDS split as ``len(source)`` records ``{"image": [H, W, C] float32 in [-1, 1], "label": int32 []}``.

    Build it with :func:`tfds_source`. ``image_shape`` is (H, W, C) after resizing and
    ``num_classes`` is the label's number of classes (None without a ClassLabel). When
    ``label_key`` is None the records hold only ``"image"``.
    """

    def __init__(self, data_source: Any, *, name: str, image_key: str, label_key: str | None, resolution: int | None):
        features = data_source.dataset_info.features
        keys = sorted(features.keys())
        if image_key not in features:
            raise ValueError(f"image_key: expected one of the features {keys} of TFDS dataset {name!r}, got {image_key!r}")
        if label_key is not None and label_key not in features:
            raise ValueError(
                f"label_key: expected one of the features {keys} of TFDS dataset {name!r}, or None for an "
                f"unlabelled dataset, got {label_key!r}"
            )
        image_feature = features[image_key]
        shape = tuple(image_feature.shape)
        if np.dtype(image_feature.np_dtype) != np.uint8 or len(shape) != 3 or shape[2] is None:
            raise ValueError(
                f"image_key: expected feature {image_key!r} of {name!r} to be uint8 images [H, W, C], "
                f"got dtype {np.dtype(image_feature.np_dtype)} and shape {shape}"
            )
        if resolution is None and None in shape[:2]:
            raise ValueError(
                f"resolution: images of TFDS dataset {name!r} have variable size {shape}; expected an int to "
                f"crop and resize them to, got None"
            )
        self._data_source = data_source
        self._image_key, self._label_key, self._resolution = image_key, label_key, resolution
        self.name = name
        self.image_shape = (resolution, resolution, shape[2]) if resolution is not None else shape
        label_feature = features[label_key] if label_key is not None else None
        self.num_classes = getattr(label_feature, "num_classes", None)

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected an int in [0, {len(self)}), got {index!r}")
        record = self._data_source[index]
        image = _to_unit_range(np.asarray(record[self._image_key]))
        if self._resolution is not None:
            image = center_crop_resize(image, self._resolution)
        out = {"image": image}
        if self._label_key is not None:
            out["label"] = np.asarray(record[self._label_key], dtype=np.int32)
        return out

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, len={len(self)}, image_shape={self.image_shape})"


def tfds_source(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    image_key: str = "image",
    label_key: str | None = "label",
    resolution: int | None = None,
    download: bool = False,
) -> TfdsSource:
    """Random access to split ``split`` of TFDS dataset ``name`` through ``tfds.data_source``.

    Args:
      name: a TFDS name, optionally with config and version ("cifar10", "celeb_a:2.1.0").
      split: a TFDS split string ("train", "test[:10%]", ...).
      data_dir: where the prepared dataset lives (TFDS's default when None).
      image_key, label_key: the features holding the uint8 image and the class label
        (label_key=None for unlabelled data).
      resolution: if set, centre-crop to a square and resize to [R, R] (required when the
        dataset's images vary in size).
      download: let TFDS download and prepare the dataset when it is missing.

    Returns:
      A :class:`TfdsSource`: ``len()`` records of float32 images ``[H, W, C]`` in [-1, 1] and
      int32 labels, ready for :func:`jdiff.data.pipeline.batch_at`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a TFDS dataset name such as 'mnist', got {name!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a TFDS split string such as 'train', got {split!r}")
    is_int = isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool)
    if resolution is not None and (not is_int or resolution < 1):
        raise ValueError(f"resolution: expected None or a positive int, got {resolution!r}")
    # Imported here: tensorflow_datasets takes a noticeable time to import and only this
    # source needs it.
    import tensorflow_datasets as tfds

    try:
        tfds.core.naming.parse_builder_name_kwargs(name)
    except ValueError:
        raise UnknownDatasetError(
            f"name: expected a TFDS name of the form dataset[/config][:version], got {name!r}"
        ) from None
    try:
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError:
        raise UnknownDatasetError(
            f"name: {name!r} is not a registered TFDS dataset and none is prepared under "
            f"data_dir={data_dir!r}; expected a name from tfds.list_builders(), such as 'mnist' or 'cifar10'"
        ) from None
    return TfdsSource(data_source, name=name, image_key=image_key, label_key=label_key, resolution=resolution)
