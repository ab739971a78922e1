"""The pure training step: (state, batch) -> (state, metrics), one jit, state donated."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jdiff import losses
from jdiff.schedules import Schedule
from jdiff.train.state import TrainState


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """One key per example from its index in the global batch, so that the noise, timestep and
    label drop of an example do not depend on how the batch is split across devices."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step)) so that short
    runs are not dominated by the initialisation."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    config: Any,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    ``apply_fn(params, x_t, t, y=None, cond=None, train=True, rngs=...)`` is the network (e.g.
    ``UNet.apply`` on ``{"params": params}``); ``batch`` holds ``image`` [B, H, W, C] in
    [-1, 1] and, for conditional models, ``label`` [B] int. The loss is
    ``jdiff.losses.diffusion_loss`` with the config's ``diffusion`` section; labels are
    replaced by the null label ``num_classes`` with probability ``p_uncond`` (classifier-free
    guidance training, Ho & Salimans 2022, Algorithm 1).
    """
    d = config.diffusion
    o = config.optim
    num_classes = config.model.get("num_classes", None)
    T = schedule.num_timesteps

    def loss_fn(params, batch, key):
        x0 = batch["image"]
        B = x0.shape[0]
        keys = example_keys(key, B)
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, T))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:], x0.dtype))(keys)
        y = None
        if num_classes is not None:
            drop = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(keys) < d.p_uncond
            y = jnp.where(drop, num_classes, batch["label"])
        dropout_key = jax.random.fold_in(key, 1 << 30)

        def model_fn(x_t, t_model):
            return apply_fn(params, x_t, t_model, y=y, cond=batch.get("cond"), train=True, rngs={"dropout": dropout_key})

        terms = losses.diffusion_loss(
            schedule, model_fn, x0, t, noise,
            parameterization=d.parameterization, weighting=d.weighting, variance=d.variance,
            vlb_weight=d.vlb_weight, min_snr_gamma=d.min_snr_gamma,
        )
        return jnp.mean(terms.loss), terms

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, o.ema_decay, o.ema_warmup)
        ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
        metrics = {
            "loss": loss,
            "mse": jnp.mean(terms.mse),
            "vlb": jnp.mean(terms.vlb),
            "grad_norm": optax.global_norm(grads),
        }
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, metrics

    return train_step
