"""Training the KL autoencoder of latent diffusion (:class:`~jdiff.models.Autoencoder`; LDM,
Rombach et al. 2022, sec. 3.1).

The loss per batch is the VAE's negative ELBO with a small KL weight (LDM's "KL-reg." first
stage, its weight ~1e-6 on summed terms; Kingma & Welling 2014, eq. 10):

    L = mean_pixels (D(z) - x)^2 + kl_weight * mean_latents KL(q(z | x) || N(0, I)),
    KL = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2) per latent component, z = mu + sigma eps.

(LDM adds a perceptual and a patch-GAN loss for sharp 256x256 photographs; small synthetic
images reconstruct well without them, measured by PSNR.) After training, the latent scale
factor is computed from the training images (:func:`jdiff.latent.latent_scale`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import latent
from jdiff.data import batch_at, get_dataset
from jdiff.models.autoencoder import Autoencoder

__all__ = ["autoencoder_loss", "kl_divergence", "train_autoencoder"]


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per component, same shape as ``mean``."""
    return 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_loss(reconstruction: jax.Array, x: jax.Array, mean: jax.Array, logvar: jax.Array,
                     kl_weight: float) -> tuple[jax.Array, dict]:
    """``(loss, {"mse", "kl"})``: pixel MSE + kl_weight * mean KL (the module docstring's L)."""
    mse = jnp.mean((reconstruction - x) ** 2)
    kl = jnp.mean(kl_divergence(mean, logvar))
    return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def train_autoencoder(data_config: Any, num_steps: int = 2000, batch_size: int = 64, seed: int = 0, *,
                      learning_rate: float = 1e-3, kl_weight: float = 1e-6, scale_examples: int = 2000,
                      **fields) -> tuple[Autoencoder, Any, dict]:
    """Train on the train split of ``data_config`` (a data section, e.g. ``{"name":
    "captioned_shapes", "resolution": 16}``) with Adam (warmup, cosine decay).

    ``fields``: :class:`~jdiff.models.Autoencoder` fields (image_channels is the data's).
    Returns ``(module, params, metrics)``: metrics holds the final loss terms, ``scale`` (from
    the first ``scale_examples`` training images), ``psnr_test`` (posterior-mean
    reconstructions of the test split, up to 1,000 images) and ``latent_shape``.
    """
    for name, v, lo in (("num_steps", num_steps, 1), ("batch_size", batch_size, 1), ("scale_examples", scale_examples, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if not (np.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight: expected a finite weight >= 0, got {kl_weight!r}")
    if data_config.get("autoencoder", ""):
        raise ValueError(f"data_config: autoencoder={data_config.get('autoencoder')!r}; an autoencoder trains on pixels, "
                         "expected a data section without one")
    train = get_dataset(data_config, split="train")
    module = Autoencoder(image_channels=train.image_shape[-1], **fields)
    # Jitted: one compiled program, not one per operation of an eager init.
    params = jax.jit(module.init)({"params": jax.random.key(seed)}, jnp.zeros((1,) + tuple(train.image_shape)),
                                  jax.random.key(0))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, num_steps // 10 + 1), num_steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, key):
        def loss_fn(p):
            rec, mean, logvar = module.apply({"params": p}, x, key)
            return autoencoder_loss(rec, x, mean, logvar, kl_weight)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, terms

    base = jax.random.key(seed + 1)
    loss, terms = np.nan, {}
    for i in range(num_steps):
        x = batch_at(train.source, i, batch_size=batch_size, seed=seed)["image"]
        params, state, loss, terms = step(params, state, x, jax.random.fold_in(base, i))
    images = np.asarray(train.source["image"][:scale_examples])
    scale = latent.latent_scale(module, params, images)
    test = np.asarray(get_dataset(data_config, split="test").source["image"][:1000])
    rec = latent.decode(module, params, latent.encode(module, params, test, scale), scale)
    return module, params, {"loss": float(loss), **{k: float(v) for k, v in terms.items()}, "scale": scale,
                            "psnr_test": latent.psnr(rec, test),
                            "latent_shape": list(latent.encode(module, params, test[:1], scale).shape[1:])}
