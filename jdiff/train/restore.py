"""Load a training workdir for sampling or evaluation: config, network, EMA params."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh

from jdiff import data as data_lib
from jdiff import parallel
from jdiff.models import UNet
from jdiff.schedules import Schedule
from jdiff.train import config as config_lib
from jdiff.train.checkpoint import Checkpointer
from jdiff.train.state import create_train_state, make_optimizer


class Loaded(NamedTuple):
    config: ml_collections.ConfigDict
    model: UNet
    params: Any  # the EMA params
    schedule: Schedule
    image_shape: tuple
    step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir: {workdir!r} has no config.json; expected a directory written by launch.train")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_for_sampling(workdir: str, mesh: Mesh | None = None) -> Loaded:
    """The newest checkpoint's EMA params with the network and schedule they were trained with,
    replicated on ``mesh`` (default: all devices), whatever mesh the checkpoint was written on."""
    config = load_config(workdir)
    dataset = data_lib.get_dataset(config.data)
    model = UNet.from_config(config.model)
    from jdiff.train.loop import init_params

    params = jax.eval_shape(lambda k: init_params(model, dataset.image_shape, k), jax.random.key(0))
    optimizer = make_optimizer(config.optim)
    template = jax.eval_shape(lambda p: create_train_state(p, optimizer, jax.random.key(0)), params)
    # Restoring onto explicit target shardings is what lets a checkpoint written on 8 devices
    # load on 1 (orbax would otherwise try the writer's device layout).
    mesh = parallel.make_mesh() if mesh is None else mesh
    template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template,
                            parallel.param_shardings(template, mesh))
    state = Checkpointer(workdir, keep=config.train.keep_checkpoints).restore(template)
    if state is None:
        raise ValueError(f"workdir: {workdir!r} has no checkpoint yet")
    return Loaded(config, model, state.ema_params, config_lib.make_schedule(config), tuple(dataset.image_shape), int(state.step))
