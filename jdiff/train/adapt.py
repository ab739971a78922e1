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

import ml_collections

from jdiff import data as data_lib
from jdiff.workdir import load_config

__all__ = ["ADAPTABLE_MODELS", "CONTROL_FIELDS", "resolve_base", "base_init_map"]

ADAPTABLE_MODELS = ("unet", "controlnet", "lora")
# The fields a ControlNet adds to its base U-Net's.
CONTROL_FIELDS = ("control_channels", "control_scale", "hint_channels")


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
    base_shape = tuple(data_lib.get_dataset({**_plain(base.data), "control": ""}).image_shape)
    own_data = {**_plain(config.data), "control": ""}
    shape = tuple(data_lib.get_dataset(own_data).image_shape)
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
