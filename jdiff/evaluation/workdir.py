"""Evaluate a training workdir: sample quality (digits classifier features) and bits/dim."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import data as data_lib
from jdiff import losses
from jdiff.train.generate import generate
from jdiff.train.restore import Loaded


def quantize_8bit(x: np.ndarray) -> np.ndarray:
    """Round [-1, 1] data to the 256-level grid the discretized decoder assumes (DDPM sec. 3.3)."""
    return (np.round((np.asarray(x, np.float32) + 1.0) * 127.5) / 127.5 - 1.0).astype(np.float32)


def bits_per_dim(loaded: Loaded, images: np.ndarray, key: jax.Array, batch_size: int = 100) -> dict:
    """The variational bound L_T + sum_t L_t in bits/dim over ``images`` (quantized to 8 bits),
    averaged over examples, with its prior and decoder (L_0) parts (DDPM eq. 5)."""
    cfg = loaded.config
    model = loaded.model

    def model_fn(params, x, t, y):
        return model.apply({"params": params}, x, t, y=y)

    null = model.num_classes

    @jax.jit
    def bpd(params, x0, k):
        y = None if null is None else jnp.full((x0.shape[0],), null, jnp.int32)
        fn = lambda x, t: model_fn(params, x, t, y)  # noqa: E731
        return losses.nll_bpd(loaded.schedule, fn, x0, k, cfg.diffusion.parameterization, cfg.diffusion.variance)

    x = quantize_8bit(images)
    n = (len(x) // batch_size) * batch_size or len(x)
    totals, priors, decoders = [], [], []
    for b, start in enumerate(range(0, n, batch_size)):
        out = bpd(loaded.params, jnp.asarray(x[start : start + batch_size]), jax.random.fold_in(key, b))
        totals.append(np.asarray(out.total))
        priors.append(np.asarray(out.prior))
        decoders.append(np.asarray(out.terms[0]))
    return {
        "bits_per_dim": float(np.mean(np.concatenate(totals))),
        "bpd_prior": float(np.mean(np.concatenate(priors))),
        "bpd_decoder": float(np.mean(np.concatenate(decoders))),
        "bpd_examples": int(n),
    }


def evaluate_loaded(
    loaded: Loaded,
    num: int,
    key: jax.Array,
    *,
    guidance_weight: float = 0.0,
    method: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    bpd_examples: int = 0,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Sample ``num`` images (class-balanced labels for conditional models) and score them."""
    from jdiff.evaluation.sample_metrics import evaluate_digit_samples

    cfg = loaded.config
    if cfg.data.name != "digits":
        raise ValueError(f"evaluation: the offline feature network is a digits classifier; workdir data is {cfg.data.name!r}")
    s = cfg.sample
    labels = None
    if loaded.model.num_classes is not None:
        labels = (np.arange(num) % loaded.model.num_classes).astype(np.int32)
    samples = generate(
        loaded.model, loaded.params, loaded.schedule, loaded.image_shape, num, key,
        labels=labels, guidance_weight=guidance_weight, batch_size=batch_size or s.batch_size,
        method=method or s.method, steps=steps if steps is not None else s.steps,
        eta=s.eta if eta is None else eta, clip=s.clip or None,
        variance=cfg.diffusion.variance, parameterization=cfg.diffusion.parameterization,
    )
    result: dict[str, Any] = {
        "step": loaded.step,
        "num_samples": num,
        "guidance": guidance_weight,
        "method": method or s.method,
        "steps": steps if steps is not None else s.steps,
    }
    result.update(evaluate_digit_samples(samples, labels=labels))
    if bpd_examples:
        images, _ = data_lib.load_digits("test")
        result.update(bits_per_dim(loaded, images[:bpd_examples], jax.random.fold_in(key, 7919)))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
