"""The training state: step, params, EMA params, optimizer state and the base PRNG key."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-identically (data order is a function of step).

    ``rng`` holds raw key data (uint32) so checkpoints need no special key handling; step s
    draws its randomness from ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def make_optimizer(optim) -> optax.GradientTransformation:
    """optax chain from the config's ``optim`` section: global-norm clipping, then Adam(W)
    with a linear warm-up to ``lr`` (DDPM: Adam, lr 2e-4, warm-up 5000, clip 1.0)."""
    if optim.optimizer not in ("adam", "adamw"):
        raise ValueError(f"optim.optimizer: expected 'adam' or 'adamw', got {optim.optimizer!r}")
    if not optim.lr > 0:
        raise ValueError(f"optim.lr: expected a positive learning rate, got {optim.lr}")
    lr = optax.linear_schedule(0.0, optim.lr, max(int(optim.warmup_steps), 1))
    if optim.optimizer == "adam":
        opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    else:
        opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    chain = [opt]
    if optim.grad_clip:
        chain.insert(0, optax.clip_by_global_norm(optim.grad_clip))
    return optax.chain(*chain)


def create_train_state(params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh state at step 0; the EMA starts at the initial params."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.array, params),
        opt_state=optimizer.init(params),
        rng=jnp.array(jax.random.key_data(key)),  # a copy: train_step donates the state
    )
