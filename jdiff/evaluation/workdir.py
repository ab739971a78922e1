"""Evaluate a trained network (a :class:`jdiff.workdir.Loaded`): sample quality with the
configured evaluator (:mod:`jdiff.evaluation.evaluators`) and the bits/dim bound.

Independent of the training loop: ``launch.evaluate`` and the end of training both call
:func:`evaluate_loaded` on what :func:`jdiff.workdir.load_for_sampling` (or the loop) built.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import data as data_lib
from jdiff import losses
from jdiff.evaluation import evaluators
from jdiff.inference import balanced_labels, generate
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.workdir import Loaded

__all__ = ["bits_per_dim", "evaluate_loaded", "quantize_8bit"]


def quantize_8bit(x: np.ndarray) -> np.ndarray:
    """Round [-1, 1] data to the 256-level grid the discretized decoder assumes (DDPM sec. 3.3)."""
    return (np.round((np.asarray(x, np.float32) + 1.0) * 127.5) / 127.5 - 1.0).astype(np.float32)


def _data_cond(loaded: Loaded, images: np.ndarray, key: jax.Array) -> dict:
    """Conditioning derived from data images by the config's transform (e.g. the low-resolution
    copy of a super-resolution model); {} for models that need none."""
    if not network.needs_data_conditioning(loaded.model):
        return {}
    return network.conditioning_from_data(loaded.config, loaded.model, images, None, key)


def bits_per_dim(loaded: Loaded, images: np.ndarray, key: jax.Array, batch_size: int = 100) -> dict:
    """The variational bound L_T + sum_t L_t in bits/dim over every one of ``images`` [N, H, W, C]
    (quantized to 8 bits), averaged over examples, with its prior and decoder (L_0) parts (DDPM
    eq. 5). Class-conditional networks are scored at the null label; conditioning the config's
    transform derives from the image (a low-resolution copy) is given, so the bound is the
    conditional one. Example i draws its noise from ``fold_in(key, i)``, so the numbers do not
    depend on ``batch_size``; the last batch is padded to full size (one compilation) and its
    padding rows are left out of the means."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    x = quantize_8bit(images)
    n = len(x)
    if n < 1:
        raise ValueError(f"images: expected at least one image, got shape {np.shape(images)}")
    cfg = loaded.config
    model = loaded.model
    cond = _data_cond(loaded, x, jax.random.fold_in(key, 1 << 20))
    null = getattr(model, "num_classes", None)
    batch_size = min(batch_size, n)

    @jax.jit
    def bpd(params, x0, c, keys):
        def one(x, ci, k):
            # One example at a time with its own key: the bound of an image does not depend on
            # the batch it was computed in (nor on the padding of the last batch).
            ci = {name: v[None] for name, v in ci.items()}
            if null is not None:
                ci["label"] = jnp.full((1,), null, jnp.int32)

            def fn(x_t, t):
                return model.apply({"params": params}, x_t, t, cond=ci or None)

            out = losses.nll_bpd(loaded.schedule, fn, x[None], k, cfg.diffusion.parameterization, cfg.diffusion.variance)
            return out.total[0], out.prior[0], out.terms[0, 0]

        return jax.vmap(one)(x0, c, keys)

    def pad(a, start):
        part = a[start : start + batch_size]
        return np.pad(part, [(0, batch_size - len(part))] + [(0, 0)] * (part.ndim - 1), mode="edge")

    example_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n + batch_size))
    totals, priors, decoders = [], [], []
    for start in range(0, n, batch_size):
        keep = min(batch_size, n - start)
        total, prior, decoder = bpd(loaded.params, jnp.asarray(pad(x, start)),
                                    {k: jnp.asarray(pad(v, start)) for k, v in cond.items()},
                                    example_keys[start : start + batch_size])
        totals.append(np.asarray(total)[:keep])
        priors.append(np.asarray(prior)[:keep])
        decoders.append(np.asarray(decoder)[:keep])
    return {
        "bits_per_dim": float(np.mean(np.concatenate(totals))),
        "bpd_prior": float(np.mean(np.concatenate(priors))),
        "bpd_decoder": float(np.mean(np.concatenate(decoders))),
        "bpd_examples": int(n),
    }


def _test_images(loaded: Loaded, num: int, cycle: bool, with_labels: bool = False):
    """The first ``num`` images of the workdir's test split (repeated to ``num`` if ``cycle`` and
    the split is smaller, else at most the whole split); with ``with_labels`` also their labels
    (None if the split has none)."""
    test = data_lib.get_dataset(loaded.config.data, split="test")
    n = min(num, data_lib.source_length(test.source))
    batch = data_lib.batch_at(test.source, 0, batch_size=n, seed=0, shuffle=False)
    images = np.asarray(batch["image"])
    labels = np.asarray(batch["label"], np.int32) if "label" in batch else None
    if cycle:
        images = np.resize(images, (num,) + images.shape[1:])
        labels = None if labels is None else np.resize(labels, (num,))
    return (images, labels) if with_labels else images


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
    evaluator: str | None = None,
) -> dict[str, Any]:
    """Sample ``num`` images (class-balanced labels for conditional models; data-derived
    conditioning such as a low-resolution image from the test split, then with the labels of
    those test images) and score them.

    Samples are clipped to [-1, 1] before scoring (a sampler run with ``clip=False``, or the last
    Euler step of ``ode`` / ``euler_maruyama``, may overshoot); ``out_of_range_fraction`` is the
    fraction of sample values that lay outside. ``evaluator`` (default ``config.eval.evaluator``;
    "" for none) scores the samples; ``bpd_examples`` > 0 adds the bits/dim bound on that many
    test images. Sampler settings default to the config's ``sample`` section.
    """
    cfg = loaded.config
    name = cfg.eval.get("evaluator", "digits") if evaluator is None else evaluator
    ev = evaluators.get(name, "evaluator" if evaluator is not None else "config.eval.evaluator")
    if ev is not None:
        ev.check(loaded.image_shape, getattr(loaded.model, "num_classes", None), cfg.data.name)
        if num < ev.min_samples:
            raise ValueError(f"num: evaluator {name!r} needs at least {ev.min_samples} samples, got {num}")
    if isinstance(bpd_examples, bool) or not isinstance(bpd_examples, int) or bpd_examples < 0:
        raise ValueError(f"bpd_examples: expected an int >= 0, got {bpd_examples!r}")
    s = cfg.sample
    method = method or s.method
    steps = steps if steps is not None else s.steps
    eta = s.eta if eta is None else eta
    result: dict[str, Any] = {"step": loaded.step, "num_samples": num, "guidance": guidance_weight,
                              "method": method, "steps": steps}
    if ev is not None:
        num_classes = getattr(loaded.model, "num_classes", None)
        labels = None if num_classes is None else balanced_labels(num, num_classes)
        cond = {}
        if network.needs_data_conditioning(loaded.model):
            # A sample conditioned on a test image (e.g. its low-resolution copy) gets that image's class.
            images, data_labels = _test_images(loaded, num, cycle=True, with_labels=True)
            cond = _data_cond(loaded, images, jax.random.fold_in(key, 3))
            if labels is not None and data_labels is not None:
                labels = data_labels
        samples = generate(
            loaded.model, loaded.params, loaded.schedule, loaded.image_shape, num, key,
            labels=labels, cond=cond, guidance_weight=guidance_weight, batch_size=batch_size or s.batch_size,
            method=method, steps=steps, eta=eta, clip=s.clip or None,
            variance=cfg.diffusion.variance, parameterization=cfg.diffusion.parameterization,
            sigma_data=config_lib.sigma_data_of(cfg),
        )
        finite = np.isfinite(samples)
        if not finite.all():
            raise FloatingPointError(f"sampling produced {int((~finite).sum())} non-finite values "
                                     f"(method {method!r}, steps {steps}); nothing was scored")
        result["out_of_range_fraction"] = float(np.mean(np.abs(samples) > 1.0))
        result.update(ev.score(np.clip(samples, -1.0, 1.0), labels))
    if bpd_examples and cfg.diffusion.get("process", "vp") == "vp":  # the discrete VLB needs the discrete chain
        images = _test_images(loaded, bpd_examples, cycle=False)
        result.update(bits_per_dim(loaded, images, jax.random.fold_in(key, 7919)))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
