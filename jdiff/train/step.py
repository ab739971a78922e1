"""The pure training step: (state, batch) -> (state, metrics), one jit, state donated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jdiff import conditioning, edm, losses
from jdiff.schedules import Schedule
from jdiff.train.state import TrainState, merge_params

BATCH_KEYS = ("image", "cond", "loss_weight")
"""The keys a train-step batch may have: ``image`` ``[B, H, W, C]`` (required), ``cond`` (a
conditioning dict, :mod:`jdiff.conditioning`) and ``loss_weight`` ``[B]``; :func:`check_batch`
refuses any other."""

# fold_in constants of the step key: the per-example keys use the example index (< 2^28).
_TRANSFORM_STREAM = 1 << 29
_DROPOUT_STREAM = 1 << 30


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """One key per example from its index in the global batch, so that the noise, timestep and
    conditioning drop of an example do not depend on how the batch is split across devices."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step)) so that short
    runs are not dominated by the initialisation."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def check_batch(batch: Mapping[str, Any]) -> None:
    """Raise a ValueError unless ``batch`` is ``{"image": [B, H, W, C], "cond": {...},
    "loss_weight": [B]}`` (``cond`` and ``loss_weight`` optional). Shapes only: works on tracers."""
    if not isinstance(batch, Mapping) or "image" not in batch:
        raise ValueError(f"batch: expected a dict with 'image' [B, H, W, C], got {type(batch).__name__} "
                         f"with keys {sorted(batch) if isinstance(batch, Mapping) else None}")
    unknown = sorted(k for k in batch if k not in BATCH_KEYS)
    if unknown:
        hint = " (class labels go in batch['cond']['label'])" if "label" in unknown else ""
        raise ValueError(f"batch: unknown key(s) {unknown}{hint}; expected a subset of {BATCH_KEYS}")
    x0 = batch["image"]
    if jnp.ndim(x0) != 4:
        raise ValueError(f"batch['image']: expected [B, H, W, C], got shape {jnp.shape(x0)}")
    b = jnp.shape(x0)[0]
    if batch.get("cond"):
        conditioning.check(batch["cond"], b, name="batch['cond']")
    if "loss_weight" in batch and jnp.shape(batch["loss_weight"]) != (b,):
        raise ValueError(f"batch['loss_weight']: expected shape ({b},), got {jnp.shape(batch['loss_weight'])}")


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    config: Any,
    *,
    transform: Callable[[dict, jax.Array], dict] | None = None,
    num_classes: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    ``apply_fn(params, x_t, t, cond=None, train=True, rngs=...)`` is the network (e.g.
    ``module.apply`` on ``{"params": params}``), called with the whole params (the state's
    trainable part merged with its frozen part). ``batch`` is ``{"image": x0 [B, H, W, C] in
    [-1, 1], "cond": {...} (jdiff.conditioning kinds), "loss_weight": [B] (optional)}``.

    Inside the step, in order: ``transform(batch, key)`` (its own key, e.g.
    :func:`jdiff.train.transforms.downsample_image`); classifier-free dropout, which replaces the
    conditioning kinds ``config.diffusion.uncond_keys`` of each example by their null value
    with probability ``config.diffusion.p_uncond`` (Ho & Salimans 2022, Algorithm 1;
    ``jdiff.conditioning.drop``; the null label is ``num_classes``, default
    ``config.model.num_classes``); the loss ``jdiff.losses.diffusion_loss`` with the config's
    ``diffusion`` section, averaged over the batch as mean(loss_weight * loss). Gradients,
    optimizer and EMA touch only the trainable params; the frozen ones come out bit-identical.
    """
    d = config.diffusion
    o = config.optim
    if num_classes is None:
        num_classes = config.model.get("num_classes", None)
    uncond_keys = tuple(d.get("uncond_keys", ("label", "context", "context_mask", "tokens")))
    process = d.get("process", "vp")
    T = schedule.num_timesteps if process == "vp" else None

    def loss_fn(params, frozen, batch, key):
        x0 = batch["image"]
        B = x0.shape[0]
        keys = example_keys(key, B)
        u = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)  # each example's time key
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:], x0.dtype))(keys)
        cond = dict(batch.get("cond") or {})
        dropped = tuple(k for k in uncond_keys if k in cond)
        if d.p_uncond > 0 and dropped:
            drop = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(keys) < d.p_uncond
            cond = conditioning.drop(cond, drop, num_classes, keys=dropped)
        dropout_key = jax.random.fold_in(key, _DROPOUT_STREAM)
        full = merge_params(params, frozen)

        def model_fn(x_t, t_model):
            return apply_fn(full, x_t, t_model, cond=cond or None, train=True, rngs={"dropout": dropout_key})

        if process == "edm":  # Karras et al. 2022, sec. 5: ln sigma ~ N(P_mean, P_std^2), eq. 8's weighting
            sigma = jnp.exp(d.p_mean + d.p_std * jax.vmap(lambda k: jax.random.normal(k, ()))(u))
            loss = edm.edm_loss(model_fn, x0, sigma, noise, d.sigma_data)
            terms = losses.LossTerms(loss=loss, mse=loss, vlb=jnp.zeros_like(loss))
        elif process == "flow":  # conditional flow matching on the linear path (Lipman et al. 2023)
            t = jax.vmap(lambda k: edm.flow_times(k, 1, d.flow_time)[0])(u)
            loss = edm.flow_loss(model_fn, x0, t, noise)
            terms = losses.LossTerms(loss=loss, mse=loss, vlb=jnp.zeros_like(loss))
        else:
            t = jax.vmap(lambda k: jax.random.randint(k, (), 0, T))(u)
            terms = losses.diffusion_loss(
                schedule, model_fn, x0, t, noise,
                parameterization=d.parameterization, weighting=d.weighting, variance=d.variance,
                vlb_weight=d.vlb_weight, min_snr_gamma=d.min_snr_gamma,
            )
        per_example = terms.loss
        if "loss_weight" in batch:
            per_example = batch["loss_weight"].astype(per_example.dtype) * per_example
        return jnp.mean(per_example), terms

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        check_batch(batch)
        key = jax.random.fold_in(state.key, state.step)
        if transform is not None:
            batch = transform(dict(batch), jax.random.fold_in(key, _TRANSFORM_STREAM))
            check_batch(batch)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen, batch, key)
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
