"""Networks by name, so a config says ``model.name = "unet"`` (score_sde's model registry).

``build("unet", config.model)`` looks the class up in :data:`MODELS` and builds it with
:func:`~jdiff.models.unet.module_from_config` (unknown config keys are refused); a name of the
form ``"package.module:Class"`` imports that class instead, so a network defined outside jdiff
needs no registration. :func:`register` adds a name.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Type

import flax.linen as nn

from jdiff.models.classifier import NoiseAwareClassifier
from jdiff.models.controlnet import ControlledUNet
from jdiff.models.prior import EmbeddingPrior
from jdiff.models.text import TextUNet
from jdiff.models.unet import UNet, module_from_config

__all__ = ["MODELS", "register", "resolve", "build"]

MODELS: Dict[str, Type[nn.Module]] = {
    "unet": UNet, "classifier": NoiseAwareClassifier, "controlnet": ControlledUNet, "text_unet": TextUNet,
    "embedding_prior": EmbeddingPrior,
}
"""The model registry: name -> ``flax.linen.Module`` class, what :func:`build` looks a config's
``model_name`` up in. Built in: ``unet``, ``classifier``, ``controlnet``, ``text_unet`` and
``embedding_prior``; :mod:`jdiff.models.lora` adds ``lora``, :func:`register` any other."""


def _check_module_class(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"cls: expected a flax.linen.Module subclass for {name!r}, got {cls!r}")


def register(name: str, cls: Type[nn.Module]) -> Type[nn.Module]:
    """Add ``cls`` to :data:`MODELS` under ``name``; returns ``cls`` (usable as a decorator's body).

    Raises a ValueError if ``name`` is taken, is not a non-empty string without ":" (that form
    means an import path), or ``cls`` is not a ``flax.linen.Module`` subclass.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name: expected a non-empty string without ':', got {name!r}")
    if name in MODELS:
        raise ValueError(f"name: {name!r} is already registered (to {MODELS[name].__qualname__}); registered: {sorted(MODELS)}")
    _check_module_class(name, cls)
    MODELS[name] = cls
    return cls


def resolve(name: str) -> Type[nn.Module]:
    """The module class called ``name``: a key of :data:`MODELS` or ``"package.module:Class"``."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected a string, got {name!r}")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise ValueError(f"name: expected 'package.module:Class', got {name!r}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"name: cannot import module {module_name!r} of {name!r}: {e}") from e
        cls = module
        for part in attr.split("."):
            if not hasattr(cls, part):
                raise ValueError(f"name: module {module_name!r} has no attribute {attr!r} (from {name!r})")
            cls = getattr(cls, part)
        _check_module_class(name, cls)
        return cls
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; expected one of {sorted(MODELS)} or 'package.module:Class'")
    return MODELS[name]


def build(name: str, cfg: Any = None, **overrides) -> nn.Module:
    """Build the network ``name`` from ``cfg`` (a ConfigDict or mapping of its fields; None for
    the defaults) with ``overrides`` on top. Unknown keys raise a ValueError listing the fields."""
    return module_from_config(resolve(name), {} if cfg is None else cfg, **overrides)
