"""Training a noise-aware classifier p_phi(y | x_t, t) for classifier guidance
(Dhariwal & Nichol 2021, sec. 4.1): cross-entropy on x_t ~ q(x_t | x_0) at uniform t.

``train_classifier(config, workdir)`` is the thin loop (same checkpoints, data pipeline and
config schema as the diffusion loop); ``log_prob_fn`` turns a trained classifier into the
``log_prob_fn(x_t, t, y)`` that :func:`jdiff.guidance.classifier` takes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jdiff import data as data_lib
from jdiff import diffusion, parallel
from jdiff.models import NoiseAwareClassifier
from jdiff.train import config as config_lib
from jdiff.train.checkpoint import Checkpointer
from jdiff.train.state import TrainState, create_train_state, make_optimizer
from jdiff.train.step import ema_decay, example_keys


def make_classifier_train_step(apply_fn: Callable, schedule, optimizer: optax.GradientTransformation, config):
    """``train_step(state, batch) -> (state, metrics)`` for the noisy classifier; pure, jit it."""
    T = schedule.num_timesteps

    def loss_fn(params, batch, key):
        x0, y = batch["image"], batch["label"]
        keys = example_keys(key, x0.shape[0])
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, T))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:], x0.dtype))(keys)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        logits = apply_fn(params, x_t, schedule.timesteps[t], train=True, rngs={"dropout": jax.random.fold_in(key, 1 << 30)})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(loss), jnp.mean(jnp.argmax(logits, -1) == y)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.key, state.step)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay(state.step, config.optim.ema_decay, config.optim.ema_warmup))
        new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads)}

    return train_step


def _log_softmax_at(module, params, x_t, t, y):
    logits = module.apply({"params": params}, x_t, t)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y)[:, None], axis=1)[:, 0]


def log_prob_fn(module: NoiseAwareClassifier, params: Any) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``(x_t, t, y) -> log p_phi(y | x_t, t)`` [B], params as traced data (for guidance.classifier)."""
    return jax.tree_util.Partial(_log_softmax_at, module, params)


def init_classifier(module: NoiseAwareClassifier, image_shape, key):
    """Fresh params of ``module`` (the ``params`` collection) for images of ``image_shape``
    ``(H, W, C)``, from the PRNG ``key`` (initialised on one zero image at t = 0)."""
    return _init(module, tuple(int(s) for s in image_shape), key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(module, image_shape, key):
    # One compiled program (module and shape static), not one per operation.
    return module.init({"params": key}, jnp.zeros((1,) + image_shape), jnp.zeros((1,), jnp.int32))["params"]


def noisy_accuracy(module, params, schedule, images, labels, key, fractions=(0.0, 0.25, 0.5, 0.75)) -> dict:
    """Test accuracy of the classifier on x_t at t = fraction * T for each fraction."""
    out = {}
    for i, f in enumerate(fractions):
        t = np.full((len(images),), int(f * (schedule.num_timesteps - 1)), np.int32)
        out[f"test_accuracy_t{f:.2f}"] = float(_accuracy(module, params, schedule, images, labels, t, jax.random.fold_in(key, i)))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _accuracy(module, params, schedule, images, labels, t, key):
    """Accuracy on x_t ~ q(x_t | x_0 = images) at the steps ``t``: one compiled program for every level."""
    x_t = diffusion.q_sample(schedule, images, t, jax.random.normal(key, images.shape))
    logits = module.apply({"params": params}, x_t, schedule.timesteps[t])
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def train_classifier(config: ml_collections.ConfigDict, workdir: str, *, mesh: Mesh | None = None) -> dict:
    """Train (resuming from ``workdir``) and write test accuracies by noise level to metrics.json.

    As ``launch.train`` does: the global batch ``config.data.batch_size`` is split along the data
    axis of ``mesh`` (default ``jdiff.parallel.make_mesh()``, all devices of all processes),
    params are replicated, the state is restored onto its abstract shapes and shardings, every
    process reads its slice of each batch, and only process 0 writes logs and metrics (orbax
    coordinates the checkpoint shards).
    """
    config_lib.validate(config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(config.data.batch_size, mesh, "config.data.batch_size")
    writer = jax.process_index() == 0
    dataset = data_lib.get_dataset(config.data)
    if not dataset.num_classes:
        raise ValueError(f"config.data.name: {config.data.name!r} has no labels to train a classifier on")
    module = NoiseAwareClassifier.from_config(config.model)
    if module.num_classes != dataset.num_classes:
        raise ValueError(f"config.model.num_classes: {module.num_classes} does not match the dataset's {dataset.num_classes}")
    schedule = config_lib.make_schedule(config)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    ckpt.check_experiment(config)
    optimizer = make_optimizer(config.optim)
    init_key, state_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)

    def init_state():
        return create_train_state(init_classifier(module, dataset.image_shape, init_key), optimizer, state_key)

    abstract = jax.eval_shape(init_state)
    shardings = parallel.param_shardings(abstract, mesh, False)
    state = ckpt.restore(jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings))
    if state is None:
        state = jax.jit(init_state, out_shardings=shardings)()
    if writer:
        ckpt.write_experiment(config)

    def apply(params, x, t, train=False, rngs=None):
        return module.apply({"params": params}, x, t, train=train, rngs=rngs)

    step_fn = jax.jit(make_classifier_train_step(apply, schedule, optimizer, config), donate_argnums=0,
                      in_shardings=(shardings, parallel.data_sharding(mesh)),
                      out_shardings=(shardings, parallel.replicated(mesh)))
    tc = config.train
    log_path = os.path.join(workdir, "metrics.jsonl")
    for step in range(int(jax.device_get(state.step)), tc.num_steps):
        b = data_lib.batch_at(dataset.source, step, batch_size=config.data.batch_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
        state, m = step_fn(state, parallel.global_batch({"image": b["image"], "label": b["label"]}, mesh))
        done = step + 1
        if done % tc.log_every == 0 or done == tc.num_steps or done % tc.checkpoint_every == 0:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not all(np.isfinite(list(m.values()))):
                raise FloatingPointError(f"non-finite classifier metrics at step {done}: {m}; no checkpoint written")
            if writer:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, **m}) + "\n")
            logging.info("step %d: %s", done, m)
        if done % tc.checkpoint_every == 0 or done == tc.num_steps:
            ckpt.save(state)
    test = data_lib.get_dataset(config.data, split="test")
    result = {"step": int(jax.device_get(state.step))}
    ema = jax.device_get(state.ema_params)  # replicated: every process holds all of it
    result.update(noisy_accuracy(module, ema, schedule, test.source["image"], test.source["label"], eval_key))
    if writer:
        with open(os.path.join(workdir, "metrics.json.tmp"), "w") as f:
            json.dump(result, f, indent=1)
        os.replace(os.path.join(workdir, "metrics.json.tmp"), os.path.join(workdir, "metrics.json"))
    ckpt.close()
    return result
