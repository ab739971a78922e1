"""The network a config names, its example inputs, and the batch the train step sees.

``config.model_name`` (default ``"unet"``) is looked up in the model registry
(``jdiff.models.build(name, config.model)``; a name may also be ``"package.module:Class"``), so
the loop trains any Flax module called as ``module(x, t, cond=None, train=False)`` without
knowing its class. Its params are initialised on an example batch built like a real one
(data labels -> ``cond["label"]``, then the config's batch transform), so every conditioning
kind the module will see during training is present at init.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdiff import models
from jdiff.train import transforms as transforms_lib

DEFAULT_MODEL_NAME = "unet"
"""The model registry name a config without ``model_name`` trains: ``"unet"``."""


def build_model(config: ml_collections.ConfigDict, image_shape: Any = None):
    """The Flax module ``config.model_name`` built from ``config.model`` (``image_shape`` unused,
    kept for callers of the old signature)."""
    del image_shape
    name = config.get("model_name", DEFAULT_MODEL_NAME)
    if not isinstance(name, str) or not name:
        raise ValueError(f"config.model_name: expected a registered model name such as 'unet', got {name!r}")
    try:
        return models.build(name, config.model)
    except ValueError as e:
        raise ValueError(f"config.model_name={name!r}, config.model: {e}") from None


def class_conditional(module) -> bool:
    """Whether ``module`` takes ``cond["label"]`` (a noise-aware classifier has ``num_classes``
    too, but predicts the label: ``predicts_label``)."""
    return getattr(module, "num_classes", None) is not None and not getattr(type(module), "predicts_label", False)


def control_channels(module) -> int:
    """The channels of the ``cond["control"]`` a module reads (a ControlNet's), 0 for none."""
    return int(sum(getattr(module, "control_channels", ()) or ()))


def text_length(module) -> int:
    """The caption length L of the ``cond["tokens"]`` a module reads (a TextUNet's max_length), 0 for none."""
    return int(module.max_length) if getattr(type(module), "reads_tokens", False) else 0


def step_batch(data_batch: Mapping[str, Any], module) -> dict:
    """A data batch ``{"image", "label"?, "control"?, "tokens"?, "loss_weight"?, ...}`` -> the
    train step's ``{"image", "cond", "loss_weight"?}``: labels become ``cond["label"]`` for a
    class-conditional module and are dropped otherwise; control images become ``cond["control"]``
    for a module that reads one (a ControlNet); caption token ids become ``cond["tokens"]`` for a
    text-conditioned module; per-example loss weights pass through."""
    batch = {"image": data_batch["image"], "cond": {}}
    if "loss_weight" in data_batch:
        batch["loss_weight"] = data_batch["loss_weight"]
    if getattr(module, "context_dim", None) and "context" in data_batch:  # e.g. unCLIP's CLIP embeddings
        batch["cond"]["context"] = data_batch["context"]
    if text_length(module):
        if "tokens" not in data_batch:
            raise ValueError("data: the model reads captions (a TextUNet) but the dataset has none; expected a "
                             "captioned dataset such as config.data.name='captioned_shapes'")
        batch["cond"]["tokens"] = data_batch["tokens"]
    if control_channels(module):
        if "control" not in data_batch:
            raise ValueError(f"data: the model reads a control image ({control_channels(module)} channels) but the "
                             "dataset has none; expected config.data.control, e.g. 'canny'")
        batch["cond"]["control"] = data_batch["control"]
    if class_conditional(module):
        if "label" not in data_batch:
            raise ValueError(f"data: the model is class-conditional (num_classes={module.num_classes}) but the "
                             "dataset has no labels")
        batch["cond"]["label"] = data_batch["label"]
    return batch


def example_cond(module, image_shape: tuple[int, int, int], batch_size: int = 1) -> dict:
    """Zeros of every conditioning kind ``module``'s fields ask for (label, image, context,
    aug_level), with a leading ``batch_size``; what init needs when no data batch is at hand."""
    h, w, _ = image_shape
    # NumPy zeros: building an example compiles nothing (the loop checks a config with them first).
    cond: dict[str, Any] = {}
    if class_conditional(module):
        cond["label"] = np.zeros((batch_size,), np.int32)
    image_channels = getattr(module, "image_channels", 0) or 0
    if image_channels:
        cond["image"] = np.zeros((batch_size, h, w, image_channels), np.float32)
    context_dim = getattr(module, "context_dim", None)
    if context_dim:
        cond["context"] = np.zeros((batch_size, 1, context_dim), np.float32)
        cond["context_mask"] = np.ones((batch_size, 1), bool)
    if getattr(module, "aug_level_embedding", False):
        cond["aug_level"] = np.zeros((batch_size,), np.float32)
    if control_channels(module):
        cond["control"] = np.zeros((batch_size, h, w, control_channels(module)), np.float32)
    if text_length(module):
        cond["tokens"] = np.zeros((batch_size, text_length(module)), np.int32)
    return cond


def example_batch(module, image_shape: tuple[int, int, int], transform: Callable | None = None, *,
                  fill: bool = True) -> dict:
    """A one-example train-step batch shaped like the real ones (labels, then ``transform``).
    With ``fill``, kinds the module needs that neither provides are added as zeros (so init
    works; a training batch without them still fails in the network, with its own message)."""
    data = {"image": np.zeros((1,) + tuple(image_shape), np.float32), "label": np.zeros((1,), np.int32)}
    if control_channels(module):
        data["control"] = np.zeros((1,) + tuple(image_shape[:2]) + (control_channels(module),), np.float32)
    if text_length(module):
        data["tokens"] = np.zeros((1, text_length(module)), np.int32)
    batch = step_batch(data, module)
    if transform is not None:
        batch = transform(batch, jax.random.key(0))
    if fill:
        batch["cond"] = {**example_cond(module, image_shape), **batch.get("cond", {})}
    return batch


def init_params(module, image_shape: tuple[int, int, int], key: jax.Array, num_classes: Any = None, *,
                cond: Mapping[str, Any] | None = None):
    """``module.init`` on x [1, H, W, C], t [1] and ``cond`` (default :func:`example_cond`);
    returns the ``params`` collection. ``num_classes`` is ignored (old signature).

    Compiled as one program (cached per module and shapes): run op by op, a U-Net's
    initialisers cost a fresh process seconds of per-op compiles (digits8: 15.5 s, against 4.9 s
    for the one program; BENCHMARKS.md); the values equal the op-by-op ones to ~6e-8."""
    del num_classes
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    cond = example_cond(module, image_shape) if cond is None else dict(cond)
    try:
        hash(module)
    except TypeError:  # a module with an unhashable field (e.g. a list) cannot key the compiled init
        return _module_init(module, key, x, t, cond)
    return _init(module, key, x, t, cond)


def _module_init(module, key, x, t, cond):
    return module.init({"params": key}, x, t, cond=cond or None)["params"]


_init = jax.jit(_module_init, static_argnums=0)


def apply_fn(module) -> Callable[..., jax.Array]:
    """``apply(params, x, t, cond=None, train=False, rngs=None)``, the form ``make_train_step`` takes."""

    def apply(params, x, t, cond=None, train=False, rngs=None):
        return module.apply({"params": params}, x, t, cond=cond, train=train, rngs=rngs)

    return apply


def make_transform(config: ml_collections.ConfigDict):
    """The batch transform ``config.data.transform`` names (None for "")."""
    from jdiff.train import config as config_lib

    return transforms_lib.get(config.data.get("transform", ""), config.data.get("transform_kwargs", None),
                              schedule=config_lib.make_schedule(config))


def conditioning_from_data(config: ml_collections.ConfigDict, module, images: np.ndarray, labels: np.ndarray | None,
                           key: jax.Array) -> dict:
    """The conditioning the transform derives from data images (e.g. the low-resolution copy of
    a super-resolution model), for sample grids and evaluation of models that need more than a
    label: ``{"image": [N, H, W, Ci], ...}`` without the label (the caller picks labels). A
    ControlNet's ``"control"`` is the ``config.data.control`` image of each image
    (:func:`jdiff.data.controls.control_images`)."""
    extra = {}
    if control_channels(module):
        from jdiff.data import controls

        extra["control"] = controls.from_config(config.data, np.asarray(images, np.float32))
    transform = make_transform(config)
    if transform is None:
        return extra
    batch = {"image": jnp.asarray(images, jnp.float32), "cond": {}}
    if labels is not None and class_conditional(module):
        batch["cond"]["label"] = jnp.asarray(labels, jnp.int32)
    batch = transform(batch, key)
    cond = dict(batch.get("cond", {}))
    cond.pop("label", None)
    return {**{k: np.asarray(v) for k, v in cond.items()}, **extra}


def needs_data_conditioning(module) -> bool:
    """Whether sampling the module needs conditioning other than a class label (captions and
    context too: a sample grid takes them from training examples)."""
    return (bool(getattr(module, "image_channels", 0)) or bool(getattr(module, "aug_level_embedding", False))
            or bool(control_channels(module)) or bool(text_length(module)) or bool(getattr(module, "context_dim", None)))
