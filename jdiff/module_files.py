"""A standalone network in a directory: ``<prefix>.json`` (its fields and whatever facts its use
needs) and ``<prefix>.msgpack`` (its params, flax msgpack). For the models trained outside the
diffusion loop: CLIP (:mod:`jdiff.train.clip`) and the autoencoder (:mod:`jdiff.latent`).

Writes go to a temporary file first and are renamed into place, so a reader never sees half a
file; the params template comes from ``jax.eval_shape`` of the module's init, so loading
allocates nothing but the params themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import flax.serialization
import jax
import numpy as np

__all__ = ["save_module", "load_module", "read_info", "module_from_info", "module_fields"]


def module_fields(module: nn.Module) -> dict:
    """A module's constructor fields as JSON values (tuples as lists)."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.init and f.name not in ("parent", "name")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def save_module(directory: str, prefix: str, module: nn.Module, params: Any, info: dict) -> str:
    """Write ``directory/prefix.msgpack`` (params) and ``directory/prefix.json`` (``{"fields": ...,
    **info}``). Returns ``directory``."""
    os.makedirs(directory, exist_ok=True)
    meta = {"fields": module_fields(module), **info}
    params = jax.tree.map(np.asarray, params)
    for name, payload, mode in ((prefix + ".msgpack", flax.serialization.to_bytes(params), "wb"),
                                (prefix + ".json", json.dumps(meta, indent=1), "w")):
        tmp = os.path.join(directory, name + ".tmp")
        with open(tmp, mode) as f:
            f.write(payload)
        os.replace(tmp, os.path.join(directory, name))
    return directory


def read_info(directory: str, prefix: str, what: str) -> dict:
    """``{"fields": ..., **info}`` of :func:`save_module`'s ``prefix.json``, without loading the
    params or touching JAX (a dataset's shape, for example, is read off it before devices are
    configured). ``what`` names the writer in the error for a directory without the files."""
    meta_path = os.path.join(str(directory), prefix + ".json")
    params_path = os.path.join(str(directory), prefix + ".msgpack")
    if not (os.path.isfile(meta_path) and os.path.isfile(params_path)):
        raise ValueError(f"workdir: {directory!r} has no {prefix}.json and {prefix}.msgpack; expected a directory written by {what}")
    with open(meta_path) as f:
        return json.load(f)


def module_from_info(cls: type, info: dict) -> nn.Module:
    """The module :func:`save_module` wrote, rebuilt from its ``info["fields"]`` (JSON lists back to
    tuples); no params, no JAX."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["fields"].items()})


def load_module(directory: str, prefix: str, cls: type, init: Callable[[nn.Module, dict], Any],
                what: str) -> tuple[Any, Any, dict]:
    """``(module, params, info)`` from :func:`save_module`'s files; ``init(module, info)`` returns
    the module's ``init`` variables (traced abstractly for the template). ``what`` names the writer in
    the error for a directory without the files."""
    info = read_info(directory, prefix, what)
    params_path = os.path.join(str(directory), prefix + ".msgpack")
    module = module_from_info(cls, info)
    template = jax.eval_shape(lambda: init(module, info))["params"]
    with open(params_path, "rb") as f:
        params = flax.serialization.from_bytes(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template), f.read())
    return module, params, info
