"""Read a training workdir: its config, and the newest checkpoint's EMA params with the network and
schedule they were trained with. What sampling, evaluation and ``config.train.init_from`` need;
nothing here trains or writes.

A workdir (written by ``jdiff.train.loop.train_and_evaluate``) holds ``config.json`` and
``checkpoints/<step>/`` with a :class:`~jdiff.train.state.TrainState`; the network is rebuilt
from the config through the model registry (``config.model_name``, ``jdiff.models.build``).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh

from jdiff import data as data_lib
from jdiff import parallel
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.train.checkpoint import Checkpointer
from jdiff.train.state import create_train_state, make_optimizer, merge_params

__all__ = ["Loaded", "config_from_dict", "load_config", "load_for_sampling", "load_params"]


class Loaded(NamedTuple):
    """A trained network ready to sample: ``params`` are the EMA params (frozen parts merged in)."""

    config: ml_collections.ConfigDict
    model: Any  # a Flax module, built by jdiff.models.build(config.model_name, config.model)
    params: Any
    schedule: Any
    image_shape: tuple
    step: int


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "model":
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with; keys added to the schema since then get their
    defaults (:func:`jdiff.train.config.base_config`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir: {workdir!r} has no config.json; expected a directory written by launch.train")
    with open(path) as f:
        return config_from_dict(json.load(f))


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A saved config (a workdir's config.json, an adapter's) over today's schema: keys added
    since then get their defaults (:func:`jdiff.train.config.base_config`)."""
    merged = _deep_update(config_lib.base_config().to_dict(), saved)
    s = merged["sample"]
    # Configs written before samplers rejected eta for methods without one stored eta=0.0 for ddpm.
    if s.get("method") == "ddpm" and s.get("eta") == 0.0:
        s["eta"] = None
    # launch.train_classifier writes a noise-aware classifier's fields with the default model_name.
    if merged.get("model_name") == "unet" and "pool" in merged.get("model", {}):
        merged["model_name"] = "classifier"
    return ml_collections.ConfigDict(merged)


def _state_template(config: ml_collections.ConfigDict, model, image_shape) -> Any:
    transform = network.make_transform(config)
    cond = network.example_batch(model, image_shape, transform)["cond"]
    trainable = config.train.get("trainable", "")
    optimizer = make_optimizer(config.optim)
    return jax.eval_shape(
        lambda k: create_train_state(network.init_params(model, image_shape, k, cond=cond), optimizer, k, trainable),
        jax.random.key(0),
    )


def _restore(workdir: str, config, model, image_shape, mesh: Mesh | None):
    template = _state_template(config, model, image_shape)
    # Restoring onto explicit target shardings is what lets a checkpoint written on 8 devices
    # load on 1 (orbax would otherwise try the writer's device layout).
    mesh = parallel.make_mesh() if mesh is None else mesh
    template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template,
                            parallel.param_shardings(template, mesh))
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
        state = ckpt.restore(template, move_aside=False)  # reading must not change the workdir
    finally:
        ckpt.close()
    if state is None:
        raise ValueError(f"workdir: {workdir!r} has no checkpoint yet")
    return state


def load_for_sampling(workdir: str, mesh: Mesh | None = None) -> Loaded:
    """The newest checkpoint's EMA params with the network and schedule they were trained with,
    replicated on ``mesh`` (default: all devices), whatever mesh the checkpoint was written on."""
    config = load_config(workdir)
    image_shape = data_lib.image_shape_of(config.data)
    model = network.build_model(config)
    state = _restore(workdir, config, model, image_shape, mesh)
    params = merge_params(state.ema_params, state.frozen)
    return Loaded(config, model, params, config_lib.make_schedule(config), image_shape, int(state.step))


def load_params(workdir: str, mesh: Mesh | None = None) -> tuple[Any, int]:
    """``(params, step)``: the whole network's EMA params (frozen parts merged in) of the newest
    checkpoint in ``workdir``, e.g. to initialise another run (``config.train.init_from``)."""
    loaded = load_for_sampling(workdir, mesh)
    return loaded.params, loaded.step
