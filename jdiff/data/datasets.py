"""``get_dataset``: a config's data section -> a random-access source plus what models need.

Keys read from the section (a dict or ``ml_collections.ConfigDict``; other keys, such as
the batch settings that :mod:`jdiff.data.pipeline` takes, are left alone):
  name         "digits" | "shapes" | "captioned_shapes" | "fashion_mnist" | "fashion_mnist_sample"
               | any TFDS name ("mnist", "cifar10", ...)   (required)
  split        "train" | "test" for digits, shapes and fashion_mnist; any TFDS split string
               (default "train"); fashion_mnist_sample has one set of 300 images for both
  resolution   shapes, captioned_shapes: image side (default 32); TFDS: crop-and-resize side (default None,
               keep the stored size); digits: None or 8; fashion_mnist(_sample): None (28)
               or R <= 28, area-downsampled once at load (jdiff.data.fashion_mnist)
  num_examples shapes, captioned_shapes: how many to generate (default 10,000 for train, 1,000 for test)
  seed         shapes: the generation seed (default 0); train and test use the independent
               streams [seed, 0] and [seed, 1]
  max_objects  captioned_shapes: 1 or 2 objects per scene (default 2; jdiff.data.captions)
  captions     fashion_mnist(_sample): add "tokens" (the class-name caption, "a dress")
  caption_length captioned sets: the tokenizer's max_length L of "tokens" [N, L] (default 20)
  data_dir     fashion_mnist: the directory of its IDX files (default the Debian location
               /usr/share/datasets/fashion-mnist), else the TFDS data_dir of the fallback
  data_dir, image_key, label_key, download   TFDS, as in :func:`tfds_source`
  path         arrays: an ``.npz`` file with "image" [N, H, W, C] float in [-1, 1] and
               optionally "label" [N] int, "loss_weight" [N] float (per-example weights of
               the train step's loss) and "num_classes" (a scalar; default max label + 1);
               e.g. a DreamBooth set written by ``jdiff.adapt.dreambooth_arrays``
  autoencoder  "" (pixels) or an autoencoder directory (launch.train_autoencoder): every image is
               encoded once at load to scaled latents [N, H/f, W/f, c] (jdiff.latent), which the
               model then trains on and samples (latent diffusion, Rombach et al. 2022)
  clip_workdir, clip_embeddings   unCLIP (Ramesh et al. 2022): a CLIP workdir (launch.train_clip,
               clean) and "decoder" (the source gains "context" [N, 1, D], each image's CLIP image
               embedding, what unCLIP's decoder is conditioned on) or "prior" (the images become
               their embeddings x sqrt(D) as [N, 1, 1, D], unit variance per component, and
               "context" [N, 1, D] is the caption's CLIP text embedding); "" = neither
  control      "" (none) or a control kind of :mod:`jdiff.data.controls` ("canny", "mask"):
               the source gains "control" [N, H, W, 1], computed once at load from the images
               (ControlNet training pairs); control_kwargs are its keyword arguments
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jdiff import module_files
from jdiff.data import captions as captions_lib
from jdiff.data import controls as controls_lib
from jdiff.data import digits as digits_lib
from jdiff.data import fashion_mnist as fashion_mnist_lib
from jdiff.data import shapes as shapes_lib
from jdiff.data.tfds_source import UnknownDatasetError, tfds_source

__all__ = ["Dataset", "get_dataset", "image_shape_of", "DATA_CONFIG_KEYS", "BUILTIN_DATASETS", "NO_DATASET"]

BUILTIN_DATASETS = ("digits", "shapes", "captioned_shapes", "fashion_mnist", "fashion_mnist_sample", "arrays")
"""The ``data.name`` values :func:`get_dataset` handles itself; any other name is looked up in
TFDS."""

NO_DATASET = "none"
"""The ``data.name`` of an imported model's workdir (``launch.convert``): it records
``data.image_shape`` and has no images, so it samples but neither trains nor evaluates."""

DATA_CONFIG_KEYS = ("name", "split", "resolution", "num_examples", "seed", "data_dir", "image_key", "label_key", "download",
                    "path", "control", "control_kwargs", "image_shape", "max_objects", "captions", "caption_length", "autoencoder", "clip_workdir",
                    "clip_embeddings")
"""The keys of a config's data section that :func:`get_dataset` reads (described in this module's
docstring); other keys, such as the batch settings of :mod:`jdiff.data.pipeline`, are left alone."""

_SHAPES_SPLITS = ("train", "test")
_SHAPES_DEFAULT_NUM_EXAMPLES = {"train": 10_000, "test": 1_000}


class Dataset(NamedTuple):
    """A source for :func:`jdiff.data.pipeline.batch_at` and the facts a model is built from.

    source: arrays ({"image", "label"[, "mask"]} with a leading N) or a TfdsSource.
    image_shape: (H, W, C) of one image. num_classes: labels are 0..num_classes-1 (None
    when unlabelled).
    """

    source: Any
    image_shape: tuple[int, int, int]
    num_classes: int | None
    name: str
    split: str


def get_dataset(config: Any, split: str | None = None) -> Dataset:
    """Build the dataset a config's data section names.

    Args:
      config: the data section (see the module docstring for its keys).
      split: overrides ``config.split`` (e.g. "test" for evaluation).

    Returns:
      A :class:`Dataset`; images are float32 in [-1, 1], labels int32.
    """
    control, clip_role, autoencoder = _derived(config)
    dataset = _get_dataset(config, split)
    if clip_role:
        dataset = _with_clip(dataset, config.get("clip_workdir", "") or "", clip_role)
    if autoencoder:
        dataset = _encoded(dataset, autoencoder)
    if not control:
        return dataset
    if not isinstance(dataset.source, dict):
        raise ValueError(f"control: {control!r} control images are computed from in-memory arrays; dataset "
                         f"{dataset.name!r} is a TFDS source (convert it to an 'arrays' .npz first)")
    source = dict(dataset.source)
    source["control"] = controls_lib.from_config(config, source["image"])
    return dataset._replace(source=source)


def _derived(config: Any) -> tuple[str, str, str]:
    """``(control, clip_embeddings, autoencoder)`` of a data section, checked: what
    :func:`get_dataset` derives from the images."""
    if not hasattr(config, "get"):
        raise ValueError(f"config: expected the data section as a dict or ConfigDict, got {type(config).__name__}")
    control = config.get("control", "") or ""
    if control and control not in controls_lib.CONTROL_KINDS:
        raise ValueError(f"control: expected '' or one of {controls_lib.CONTROL_KINDS}, got {control!r}")
    clip_role = config.get("clip_embeddings", "") or ""
    if clip_role and clip_role not in CLIP_ROLES:
        raise ValueError(f"clip_embeddings: expected '' or one of {CLIP_ROLES}, got {clip_role!r}")
    if clip_role and not (config.get("clip_workdir", "") or ""):
        raise ValueError(f"clip_workdir: clip_embeddings={clip_role!r} needs a CLIP workdir (launch.train_clip), got ''")
    autoencoder = config.get("autoencoder", "") or ""
    if autoencoder and clip_role:
        raise ValueError(f"autoencoder: {autoencoder!r} with clip_embeddings={clip_role!r}; expected one of them")
    if autoencoder and control:
        raise ValueError(f"control: {control!r} with autoencoder {autoencoder!r}; a latent ControlNet is not supported, "
                         "expected control=''")
    return control, clip_role, autoencoder


CLIP_ROLES = ("decoder", "prior")


def _with_clip(dataset: Dataset, directory: str, role: str) -> Dataset:
    """unCLIP's data: ``dataset`` with CLIP embeddings (see the module docstring's clip_embeddings);
    ``role`` and ``directory`` checked by :func:`_derived`."""
    if not isinstance(dataset.source, dict) or "tokens" not in dataset.source:
        raise ValueError(f"clip_embeddings: {role!r} needs a captioned in-memory dataset ('captioned_shapes'), got "
                         f"{dataset.name!r}")
    from jdiff.train import clip as clip_lib

    module, params, info = clip_lib.load_clip(directory)
    if info["noised"]:
        raise ValueError(f"clip_workdir: {directory!r} is a noised CLIP; unCLIP embeds clean images, expected a CLIP "
                         "trained without --noised")
    if tuple(dataset.image_shape) != (info["resolution"], info["resolution"], 3):
        raise ValueError(f"clip_workdir: {directory!r} sees {info['resolution']}x{info['resolution']} RGB images, dataset "
                         f"{dataset.name!r} has {tuple(dataset.image_shape)}")
    source = dict(dataset.source)
    images, tokens = source["image"], source["tokens"]
    image_emb, text_emb = clip_lib.embed(module, params, images, np.zeros(len(images), np.int32), tokens, tokens != 0)
    if role == "decoder":
        source["context"] = image_emb[:, None, :].astype(np.float32)
        return dataset._replace(source=source)
    D = image_emb.shape[-1]
    source["image"] = (image_emb * np.sqrt(D))[:, None, None, :].astype(np.float32)
    source["context"] = text_emb[:, None, :].astype(np.float32)
    return dataset._replace(source=source, image_shape=(1, 1, D))


def _encoded(dataset: Dataset, directory: str) -> Dataset:
    """``dataset`` with its images replaced by their latents (jdiff.latent.encode)."""
    from jdiff import latent

    if not isinstance(dataset.source, dict):
        raise ValueError(f"autoencoder: latents are computed from in-memory arrays; dataset {dataset.name!r} is a TFDS "
                         "source (convert it to an 'arrays' .npz first)")
    module, params, info = latent.load_autoencoder(directory)
    _check_autoencoder_shape(info, directory, dataset.image_shape, dataset.name)
    source = dict(dataset.source)
    source["image"] = latent.encode(module, params, source["image"], info["scale"])
    return dataset._replace(source=source, image_shape=tuple(source["image"].shape[1:]))


def _check_autoencoder_shape(info: dict, directory: str, image_shape: tuple, name: str) -> None:
    if tuple(info["image_shape"]) != tuple(image_shape):
        raise ValueError(f"autoencoder: {directory!r} was trained on {tuple(info['image_shape'])} images, dataset "
                         f"{name!r} has {tuple(image_shape)}")


def image_shape_of(config: Any) -> tuple[int, int, int]:
    """``(H, W, C)`` of a data section: ``image_shape`` when it is set (an imported model's
    workdir, which has no dataset), else that of :func:`get_dataset`'s images, without deriving
    anything from them: control images and a decoder's CLIP embeddings keep the images' shape, a
    CLIP prior's embeddings are ``(1, 1, D)`` and latents ``(H/f, W/f, c)``, both read off the CLIP
    or autoencoder directory's JSON. So sampling a ControlNet, unCLIP or latent workdir does not
    compute edges, embeddings or latents of its whole training set, and JAX is not touched (a
    launch command reads the shape before it configures devices). Fashion-MNIST's shape follows
    from ``split`` and ``resolution`` (checked as :func:`get_dataset` checks them): its files are
    not read, so a workdir trained on it samples where they are absent."""
    if not hasattr(config, "get"):
        raise ValueError(f"config: expected the data section as a dict or ConfigDict, got {type(config).__name__}")
    shape = tuple(config.get("image_shape", ()) or ())
    if not shape:
        _, clip_role, autoencoder = _derived(config)
        name = config.get("name", None)
        if name in ("fashion_mnist", "fashion_mnist_sample"):  # known without reading 60,000 images
            shape = _fashion_mnist_shape(name, config.get("split", "train"), config.get("resolution", None))
        else:
            shape = tuple(_get_dataset(config, None).image_shape)
        if clip_role == "prior":
            from jdiff.models.text import CLIP
            from jdiff.train.clip import CLIP_PREFIX

            info = module_files.read_info(config.get("clip_workdir", "") or "", CLIP_PREFIX, "launch.train_clip")
            return (1, 1, int(module_files.module_from_info(CLIP, info).embed_dim))
        if autoencoder:
            from jdiff.latent import AUTOENCODER_PREFIX
            from jdiff.models.autoencoder import Autoencoder

            info = module_files.read_info(autoencoder, AUTOENCODER_PREFIX, "launch.train_autoencoder")
            _check_autoencoder_shape(info, autoencoder, shape, config.get("name"))
            ae = module_files.module_from_info(Autoencoder, info)
            return (shape[0] // ae.factor, shape[1] // ae.factor, int(ae.latent_channels))
        return shape
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"image_shape: expected () or (H, W, C) positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _load_arrays(path: Any) -> tuple[dict, int | None]:
    import os

    if not isinstance(path, str) or not path:
        raise ValueError(f"path: expected the .npz file of the 'arrays' dataset, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file; expected an .npz with 'image' [N, H, W, C]")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    if "image" not in arrays or arrays["image"].ndim != 4 or not len(arrays["image"]):
        raise ValueError(f"path: {path!r} needs 'image' [N, H, W, C] with N > 0; it has "
                         f"{ {k: v.shape for k, v in arrays.items()} }")
    n = len(arrays["image"])
    unknown = sorted(set(arrays) - {"image", "label", "loss_weight", "num_classes"})
    if unknown:
        raise ValueError(f"path: {path!r} has unknown arrays {unknown}; expected image, label, loss_weight, num_classes")
    source = {"image": arrays["image"].astype(np.float32)}
    num_classes = None
    if "label" in arrays:
        source["label"] = arrays["label"].astype(np.int32)
        num_classes = int(arrays["num_classes"]) if "num_classes" in arrays else int(source["label"].max()) + 1
    if "loss_weight" in arrays:
        source["loss_weight"] = arrays["loss_weight"].astype(np.float32)
    for k, v in source.items():
        if len(v) != n:
            raise ValueError(f"path: {path!r}: {k!r} has {len(v)} rows, 'image' has {n}")
    return source, num_classes


def _fashion_mnist_shape(name: str, split: Any, resolution: Any) -> tuple[int, int, int]:
    """(R, R, 1) of Fashion-MNIST at ``resolution``, after the checks :func:`get_dataset` makes."""
    if split not in fashion_mnist_lib.FASHION_MNIST_FILES:
        raise ValueError(f"split: expected one of {tuple(fashion_mnist_lib.FASHION_MNIST_FILES)} for {name}, got {split!r}")
    fashion_mnist_lib._check_resolution(resolution)  # the same message as the loader's
    side = fashion_mnist_lib.FASHION_MNIST_SHAPE[0] if resolution is None else int(resolution)
    return (side, side, 1)


def _get_dataset(config: Any, split: str | None) -> Dataset:
    if not hasattr(config, "get"):
        raise ValueError(f"config: expected the data section as a dict or ConfigDict, got {type(config).__name__}")
    get = config.get
    name = get("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected 'digits', 'shapes' or a TFDS dataset name in the data config, got {name!r}")
    split = split if split is not None else get("split", "train")
    resolution = get("resolution", None)

    if name == NO_DATASET:
        raise ValueError(
            f"name: {NO_DATASET!r}: this workdir has no dataset (an imported model; sampling needs only "
            f"data.image_shape = {tuple(get('image_shape', ()) or ())}); training and evaluation need one: "
            "set data.name (e.g. --config.data.name=cifar10, or launch.convert --data cifar10)"
        )
    if name == "digits":
        side = digits_lib.DIGITS_SHAPE[0]
        if resolution not in (None, side):
            raise ValueError(f"resolution: the digits are {side}x{side}; expected None or {side}, got {resolution!r}")
        images, labels = digits_lib.load_digits(split)
        source = {"image": images, "label": labels}
        return Dataset(source, digits_lib.DIGITS_SHAPE, digits_lib.DIGITS_NUM_CLASSES, name, split)

    if name in ("fashion_mnist", "fashion_mnist_sample"):
        _fashion_mnist_shape(name, split, resolution)
        if name == "fashion_mnist":
            images, labels = fashion_mnist_lib.load_fashion_mnist(split, get("data_dir", None), resolution)
        else:
            images, labels = fashion_mnist_lib.load_fashion_mnist_sample(resolution)
        source = {"image": images, "label": labels}
        if get("captions", False):
            source["tokens"] = captions_lib.tokenizer_of(config).encode(captions_lib.fashion_mnist_captions(labels))[0]
        return Dataset(source, images.shape[1:], fashion_mnist_lib.FASHION_MNIST_NUM_CLASSES, name, split)

    if name == "arrays":
        source, num_classes = _load_arrays(get("path", None))
        return Dataset(source, tuple(source["image"].shape[1:]), num_classes, name, split)

    if name in ("shapes", "captioned_shapes"):
        if split not in _SHAPES_SPLITS:
            raise ValueError(f"split: expected one of {_SHAPES_SPLITS} for the {name} dataset, got {split!r}")
        resolution = 32 if resolution is None else resolution
        num_examples = get("num_examples", None)
        num_examples = _SHAPES_DEFAULT_NUM_EXAMPLES[split] if num_examples is None else num_examples
        seed = get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int for the {name} dataset, got {seed!r}")
        if name == "captioned_shapes":
            if resolution < captions_lib.MIN_RESOLUTION:
                raise ValueError(f"resolution: expected at least {captions_lib.MIN_RESOLUTION} for captioned_shapes "
                                 f"(a small triangle must cover pixel centres), got {resolution!r}")
            scene = captions_lib.scenes(num_examples, [int(seed), _SHAPES_SPLITS.index(split)], get("max_objects", 2))
            images, _ = captions_lib.render_scenes(scene, resolution)
            tokens, _ = captions_lib.tokenizer_of(config).encode(captions_lib.captions(scene))
            return Dataset({"image": images, "tokens": tokens}, (resolution, resolution, 3), None, name, split)
        images, labels, masks = shapes_lib.shapes(num_examples, resolution, [int(seed), _SHAPES_SPLITS.index(split)])
        source = {"image": images, "label": labels, "mask": masks}
        return Dataset(source, (resolution, resolution, 3), len(shapes_lib.SHAPE_NAMES), name, split)

    try:
        source = tfds_source(
            name,
            split,
            get("data_dir", None),
            image_key=get("image_key", "image"),
            label_key=get("label_key", "label"),
            resolution=resolution,
            download=get("download", False),
        )
    except UnknownDatasetError as e:
        raise UnknownDatasetError(f"{e}; the built-in datasets are {BUILTIN_DATASETS}") from None
    return Dataset(source, source.image_shape, source.num_classes, name, split)
