"""Adapting a trained model: a config with ``base_workdir`` takes over that workdir's network.

ControlNet (Zhang et al. 2023), DreamBooth (Ruiz et al. 2023) and LoRA (Hu et al. 2021) all
train against a frozen, already trained U-Net. Their configs name only what they add (the
ControlNet's control channels and hint encoder, the LoRA rank and targets, the identifier
class of DreamBooth) and ``config.base_workdir``; :func:`resolve_base` fills in the rest from the
base workdir, so the architecture can never disagree with the weights:

- ``config.model``: the base U-Net's fields (class rows grown by
  ``config.train.init_new_classes_from``), merged under the adaptation's own fields
  (``model_name = "controlnet"`` keeps control_channels / control_scale / hint_channels;
  ``"lora"`` wraps them as its inner ``model``);
- ``config.diffusion``: the base's (same process, schedule and parameterization);
- ``config.train.init_from = base_workdir`` and ``config.train.init_map`` (where the base's
  params go: ``base/`` and ``control_0/encoder/`` for a ControlNet, ``model/`` under LoRA).

The resolved config is what the workdir records, so sampling and resuming need only the
adaptation's workdir.
"""

from __future__ import annotations

import copy
import json
import os

import flax.serialization
import jax
import ml_collections
import numpy as np

from jdiff import data as data_lib
from jdiff import workdir as workdir_lib
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.train.state import map_params, overlay_params, param_paths, split_params
from jdiff.workdir import Loaded, config_from_dict, load_config, load_for_sampling

__all__ = ["ADAPTABLE_MODELS", "CONTROL_FIELDS", "resolve_base", "base_init_map"]

ADAPTABLE_MODELS = ("unet", "controlnet", "lora")
"""The ``config.model_name`` values an adaptation of a base workdir may have: the base U-Net
itself (``unet``, fine-tuning or DreamBooth), ``controlnet`` or ``lora``."""

CONTROL_FIELDS = ("control_channels", "control_scale", "hint_channels")
"""The fields a ControlNet adds to its base U-Net's: the only model fields a ControlNet adaptation
config may set (:func:`resolve_base` takes the others from the base workdir)."""


def _plain(section) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def base_init_map(model_name: str, inner_name: str | None = None, num_controls: int = 1) -> tuple[str, ...]:
    """Where a base U-Net's params go in an adapted network: ``"dst=src"`` prefixes
    (``config.train.init_map``). A ControlNet's frozen ``base/`` and every ``control_i/encoder/``
    copy; LoRA's inner network under ``model/``."""
    if model_name == "unet":
        return ()
    if model_name == "controlnet":
        return ("base/=",) + tuple(f"control_{i}/encoder/=encoder/" for i in range(num_controls))
    if model_name == "lora":
        return tuple("model/" + m for m in (base_init_map(inner_name, None, num_controls) or ("=",)))
    raise ValueError(f"config.model_name: expected one of {ADAPTABLE_MODELS} for an adaptation of a base workdir, "
                     f"got {model_name!r}")


def _norm(v):
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def _check_own(own: dict, fields: dict, allowed: tuple, name: str) -> None:
    """The adaptation config may set only its own fields; base fields only to the base's values
    (so resolving a resolved config is a no-op)."""
    conflicts = sorted(k for k in own if k not in allowed and _norm(own[k]) != _norm(fields.get(k, object())))
    if conflicts:
        raise ValueError(f"{name}: {conflicts} differ from the base U-Net's fields, which are taken from "
                         f"config.base_workdir; an adaptation config sets only {allowed or 'none of them'}")


def resolve_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` completed from ``config.base_workdir`` (module docstring); ``config``
    itself if it has none. Raises a ValueError, before anything is computed or written, if the
    base workdir is not a trained U-Net of the same image shape."""
    base_dir = config.get("base_workdir", "") or ""
    if not base_dir:
        if config.get("model_name", "") == "controlnet" and not config.train.get("init_from", ""):
            raise ValueError("config.base_workdir: required for model_name 'controlnet' (a ControlNet steers a trained "
                             "U-Net: pass --config.base_workdir=DIR), got ''")
        return config
    if not isinstance(base_dir, str):
        raise ValueError(f"config.base_workdir: expected a workdir path, got {base_dir!r}")
    try:
        base = load_config(base_dir)
    except ValueError as e:
        raise ValueError(f"config.base_workdir: {e}") from None
    if base.model_name != "unet":
        raise ValueError(f"config.base_workdir: {base_dir!r} holds a {base.model_name!r} network; expected a trained "
                         "U-Net (model_name 'unet') to adapt")
    name = config.model_name
    if name not in ADAPTABLE_MODELS:
        raise ValueError(f"config.model_name: expected one of {ADAPTABLE_MODELS} for an adaptation of "
                         f"config.base_workdir, got {name!r}")
    base_shape = data_lib.image_shape_of({**_plain(base.data), "control": ""})
    own_data = {**_plain(config.data), "control": ""}
    shape = data_lib.image_shape_of(own_data)
    if shape != base_shape:
        raise ValueError(f"config.base_workdir: {base_dir!r} was trained on {base_shape} images, but config.data "
                         f"({config.data.name!r}) gives {shape}; expected the same image shape")

    fields = _plain(base.model)
    new_classes = tuple(config.train.init_new_classes_from)
    if new_classes:
        if fields.get("num_classes") is None:
            raise ValueError(f"config.train.init_new_classes_from: {new_classes} adds classes, but {base_dir!r} is not "
                             "class-conditional (model.num_classes is None)")
        fields["num_classes"] = int(fields["num_classes"]) + len(new_classes)
    own = _plain(config.model)
    if name == "lora":
        inner_name = own.get("model_name", "unet")
        if inner_name not in ("unet", "controlnet"):
            raise ValueError(f"config.model.model_name: expected 'unet' or 'controlnet' under LoRA, got {inner_name!r}")
        _check_own(_plain(own.get("model", {})), fields, CONTROL_FIELDS if inner_name == "controlnet" else (),
                   "config.model.model")
    else:
        _check_own(own, fields, CONTROL_FIELDS if name == "controlnet" else (), "config.model")
    out = copy.deepcopy(config)
    with out.unlocked():
        if name == "lora":
            model = {**own, "model_name": inner_name, "model": {**_plain(own.get("model", {})), **fields}}
        else:
            model = {**own, **fields}
        out.model = ml_collections.ConfigDict(model)
        out.diffusion = copy.deepcopy(base.diffusion)
        out.train.init_from = base_dir
        if not tuple(out.train.init_map):
            if name == "lora":
                inner = model["model"]
                out.train.init_map = base_init_map("lora", model["model_name"], len(inner.get("control_channels", (1,))))
            else:
                out.train.init_map = base_init_map(name, None, len(model.get("control_channels", (1,))))
    return out


ADAPTER_FILE = "adapter.msgpack"
_ADAPTER_FORMAT = "jdiff.adapter"


def export_adapter(workdir: str, path: str | None = None) -> str:
    """Write the trained part of an adaptation workdir alone (EMA of the ``config.train.trainable``
    params: LoRA factors, a ControlNet, a new class row) with its resolved config, to ``path``
    (default WORKDIR/adapter.msgpack); :func:`load_adapter` rebuilds the whole network from it and
    the base workdir. Returns the path."""
    config = load_config(workdir)
    if not config.get("base_workdir", "") or not config.train.trainable:
        raise ValueError(f"workdir: {workdir!r} is not an adaptation with frozen params (base_workdir "
                         f"{config.get('base_workdir', '')!r}, train.trainable {config.train.trainable!r})")
    loaded = load_for_sampling(workdir)
    trainable, _ = split_params(loaded.params, config.train.trainable)
    payload = {"format": _ADAPTER_FORMAT, "version": 1, "config": json.dumps(config.to_dict()),
               "image_shape": list(loaded.image_shape), "step": loaded.step,
               "trainable": jax.tree.map(np.asarray, jax.device_get(trainable))}
    path = path or os.path.join(workdir, ADAPTER_FILE)
    with open(path + ".tmp", "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
    os.replace(path + ".tmp", path)
    return path


def _read_adapter(path: str) -> dict:
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"adapter: no file at {path!r}; expected an adapter.msgpack written by jdiff.train.adapt.export_adapter")
    with open(path, "rb") as f:
        try:
            payload = flax.serialization.msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
            raise ValueError(f"adapter: {path!r} is not a msgpack file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != _ADAPTER_FORMAT:
        raise ValueError(f"adapter: {path!r} is not a jdiff adapter file (no {_ADAPTER_FORMAT!r} marker)")
    payload["config"] = json.loads(payload["config"])
    return payload


def adapter_config(path: str) -> ml_collections.ConfigDict:
    """The resolved config stored in an adapter file (reads nothing else)."""
    return config_from_dict(_read_adapter(path)["config"])


def load_adapter(path: str, base_workdir: str | None = None, mesh=None):
    """A :class:`jdiff.workdir.Loaded` rebuilt from an adapter file and its base workdir (default:
    the one it was trained on): the base's EMA params moved by ``train.init_map`` /
    ``init_new_classes_from``, then the adapter's trained params on top. Raises a ValueError if
    the base is not the network the adapter was trained on (a param missing or of another shape)."""
    payload = _read_adapter(path)
    config = adapter_config(path)
    base_dir = base_workdir or config.base_workdir
    base = load_config(base_dir)
    if base.model_name != "unet":
        raise ValueError(f"base_workdir: {base_dir!r} holds a {base.model_name!r} network; expected the U-Net the adapter "
                         "was trained on")
    model = network.build_model(config)
    shape = tuple(payload["image_shape"])
    template = jax.eval_shape(lambda k: network.init_params(model, shape, k, cond=network.example_cond(model, shape)),
                              jax.random.key(0))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    source, _ = workdir_lib.load_params(base_dir, mesh)
    source = map_params(source, tuple(config.train.init_map), tuple(config.train.init_new_classes_from),
                        name="base_workdir")
    try:
        params, from_base = overlay_params(template, source, name="base_workdir")
        params, from_adapter = overlay_params(params, payload["trainable"], name="adapter")
    except ValueError as e:
        raise ValueError(f"{e} (adapter {path!r} on base {base_dir!r})") from None
    missing = sorted(set(param_paths(params)) - set(from_base) - set(from_adapter))
    if missing:
        raise ValueError(f"base_workdir: {base_dir!r} lacks {len(missing)} params the adapter {path!r} needs, e.g. "
                         f"{missing[:3]}; expected the base it was trained on")
    return Loaded(config, model, params, config_lib.make_schedule(config), shape, int(payload["step"]))
