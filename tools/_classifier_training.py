"""The training loop shared by ``train_digits_classifier.py`` and ``train_fashion_mnist_classifier.py``.

Seeded and deterministic: ``seed`` splits into the init, data and step keys; batches are
per-epoch permutations drawn from ``fold_in(data_key, epoch)``, augmentation and dropout
noise from ``fold_in(step_key, step)``. Cross-entropy, AdamW with linear warm-up and cosine
decay to 0.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def check_int_args(int_args: Mapping[str, tuple[Any, int]]) -> None:
    """Each ``name: (value, low)`` must be an int >= low (not a bool)."""
    for name, (value, low) in int_args.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def train_classifier(
    model: nn.Module,
    images: jax.Array,
    labels: jax.Array,
    augment: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    log_every: int,
) -> dict[str, Any]:
    """Train ``model`` (returning ``(features, logits)``) on ``images``/``labels``; returns its variables.

    ``augment(key, batch)`` perturbs each batch; ``log_every`` > 0 prints the loss that often.
    """
    n = images.shape[0]
    steps_per_epoch = n // batch_size
    init_key, data_key, step_key = jax.random.split(jax.random.key(seed), 3)
    params = model.init(init_key, images[:1])
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, num_steps)
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, step):
        epoch, position = jnp.divmod(step, steps_per_epoch)
        order = jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
        idx = jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, step))
        x = augment(aug_key, images[idx])

        def loss_fn(p):
            _, logits = model.apply(p, x, train=True, rngs={"dropout": dropout_key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.time()
    for step in range(num_steps):
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(step, jnp.int32))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{num_steps}  loss {float(loss):.4f}  {time.time() - start:.1f}s", flush=True)
    return params


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Random integer shifts in [-max_shift, max_shift]^2, padding with the -1 background; images [B, H, W, C]."""
    if max_shift > 0:
        b, h, w, c = images.shape
        padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
        offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
        images = jax.vmap(lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    return images


def random_noise(std_key: jax.Array, noise_key: jax.Array, images: jax.Array, max_noise_std: float) -> jax.Array:
    """Gaussian noise with a per-image std uniform in [0, max_noise_std], then clipping to [-1, 1]."""
    if max_noise_std > 0:
        std = jax.random.uniform(std_key, (images.shape[0], 1, 1, 1), maxval=max_noise_std)
        images = jnp.clip(images + std * jax.random.normal(noise_key, images.shape), -1.0, 1.0)
    return images
