"""Training losses, time weightings, the variational bound and bits/dim.

Shapes: ``x0: [B, ...]``, ``t: [B]`` int. Per-example losses are returned as [B] arrays
(mean over all non-batch dimensions), so callers choose how to reduce and weight them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.schedules import Schedule

__all__ = [
    "mean_flat",
    "snr",
    "loss_weight",
    "WEIGHTINGS",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "vlb_term",
    "prior_bpd",
    "LossTerms",
    "diffusion_loss",
    "BitsPerDim",
    "nll_bpd",
]

WEIGHTINGS = ("uniform", "snr", "truncated_snr", "min_snr", "p2")
"""The time weightings of :func:`loss_weight` and :func:`diffusion_loss`: ``uniform`` (L_simple),
``snr`` (Kingma et al. 2021), ``truncated_snr`` (Salimans & Ho 2022), ``min_snr`` (Hang et al.
2023) and ``p2`` (Choi et al. 2022)."""


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, eq. 2), shape [B]."""
    diffusion.check_timesteps(schedule, t)
    # alpha_t / sigma_t from their float64-derived values; 1 - abar_t in float32 would lose
    # ~1e-4 of SNR where abar_t ~ 1.
    return (jnp.take(schedule.sqrt_alphas_cumprod, t) / jnp.take(schedule.sqrt_one_minus_alphas_cumprod, t)) ** 2


def loss_weight(
    schedule: Schedule,
    t: jax.Array,
    parameterization: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
) -> jax.Array:
    """Per-example weight [B] for the MSE in the ``parameterization``'s own target space.

    ``uniform`` is 1 (L_simple for eps; Ho et al. 2020 eq. 14). The others are defined by
    their weight lambda(t) on ||x_0 - x0_hat||^2 and converted with
    ||x_0 err||^2 = ||eps err||^2 / SNR = ||v err||^2 / (1 + SNR):
      ``snr``           lambda = SNR (the eps loss; Kingma et al. 2021),
      ``truncated_snr`` lambda = max(SNR, 1) (Salimans & Ho 2022, sec. 4),
      ``min_snr``       lambda = min(SNR, gamma) (Hang et al. 2023, eq. 9),
      ``p2``            lambda = SNR / (k + SNR)^gamma (Choi et al. 2022, eq. 8).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    if parameterization not in ("eps", "x0", "v"):
        raise ValueError(f"parameterization: expected 'eps', 'x0' or 'v' for a training loss, got {parameterization!r}")
    s = snr(schedule, t)
    if weighting == "uniform":
        return jnp.ones_like(s)
    # lambda(t) / SNR, written without dividing by a possibly tiny SNR where avoidable.
    if weighting == "snr":
        lam_over_snr = jnp.ones_like(s)
    elif weighting == "truncated_snr":
        lam_over_snr = jnp.maximum(1.0, 1.0 / s)
    elif weighting == "min_snr":
        lam_over_snr = jnp.minimum(1.0, min_snr_gamma / s)
    else:
        lam_over_snr = 1.0 / (p2_k + s) ** p2_gamma
    if parameterization == "eps":
        return lam_over_snr
    if parameterization == "x0":
        return lam_over_snr * s
    return lam_over_snr * s / (1.0 + s)


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Written as expm1(d) - d, d = logvar1 - logvar2: the textbook -1 + exp(d) rounds to
    ~1e-7 in float32 and swamps the prior term L_T (~1e-5 nats or less).
    """
    d = logvar1 - logvar2
    return 0.5 * (jnp.expm1(d) - d + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by the reference DDPM code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log p(x) for data in [-1, 1] quantized to 256 bins of width 2/255 (DDPM sec. 3.3, eq. 13).

    Edge bins extend to -inf and +inf. ``log_scales`` is log of the standard deviation.
    Returns elementwise log-likelihoods in nats, shaped like ``x``.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )


def vlb_term(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array, mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """One term of the variational bound in bits/dim, shape [B] (DDPM eq. 5).

    t > 0: L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
    t = 0: L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder (eq. 13).
    """
    true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, xt, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_variance)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape [B]."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = diffusion.q_mean_variance(schedule, x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


class LossTerms(NamedTuple):
    """Per-example loss terms, each [B]. ``loss`` is what is minimised."""

    loss: jax.Array
    mse: jax.Array
    vlb: jax.Array


def diffusion_loss(
    schedule: Schedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    parameterization: str = "eps",
    weighting: str = "uniform",
    variance: str = "fixed_small",
    vlb_weight: float = 0.001,
    **weight_kwargs,
) -> LossTerms:
    """The denoising loss at timesteps t, per example.

    mse = w(t) * mean ||target - prediction||^2 with target eps, x_0 or v
    (``loss_weight``). With a learned variance (``learned_range``) the loss is the hybrid
    L_simple + vlb_weight * L_vlb of improved DDPM (sec. 3.1), where L_vlb = T * L_t is the
    one-sample estimate of the whole bound and the mean is held fixed by a stop-gradient so
    that L_vlb trains only the variance.

    Args:
      model_fn: (x_t [B, ...], t [B]) -> output [B, ..., C] (or 2C for learned variances).
      x0, noise: [B, ...]; t: [B] int in [0, T).
    """
    if not isinstance(x0, jax.core.Tracer):
        # Called eagerly: the timestep values, then the whole loss traced abstractly, so that a bad
        # name, noise or model output is an error before anything is computed (and compiled).
        diffusion.check_timesteps(schedule, t, x0)
        jax.eval_shape(lambda x0_, t_, noise_: diffusion_loss(schedule, model_fn, x0_, t_, noise_, parameterization, weighting,
                                                              variance, vlb_weight, **weight_kwargs), x0, t, noise)
    # Names are checked (by loss_weight and here) before the network runs or is traced.
    weight = loss_weight(schedule, t, parameterization, weighting, **weight_kwargs)
    if variance not in diffusion.VARIANCE_TYPES:
        raise ValueError(f"variance: expected one of {diffusion.VARIANCE_TYPES}, got {variance!r}")
    xt = diffusion.q_sample(schedule, x0, t, noise)
    output = model_fn(xt, schedule.timesteps[t])
    pred, var_out = diffusion.split_variance_output(output, variance)
    if pred.shape != x0.shape:
        raise ValueError(f"model output: expected prediction shape {tuple(x0.shape)}, got {tuple(pred.shape)}")
    if parameterization == "eps":
        target = noise
    elif parameterization == "x0":
        target = x0
    else:  # "v", the only other name loss_weight accepts
        target = diffusion.predict_v(schedule, x0, t, noise)
    mse = weight * mean_flat((target - pred) ** 2)
    if var_out is None:
        return LossTerms(loss=mse, mse=mse, vlb=jnp.zeros_like(mse))
    frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_out], axis=-1)
    pmv = diffusion.p_mean_variance(schedule, frozen, xt, t, parameterization, variance)
    vlb = vlb_term(schedule, x0, xt, t, pmv.mean, pmv.log_variance)
    return LossTerms(loss=mse + vlb_weight * schedule.num_timesteps * vlb, mse=mse, vlb=vlb)


class BitsPerDim(NamedTuple):
    """Negative log-likelihood bound in bits/dim, per example [B]: total = prior + sum(terms)."""

    total: jax.Array
    prior: jax.Array
    terms: jax.Array  # [T, B], terms[t] = L_t (L_0 the decoder NLL)


def nll_bpd(
    schedule: Schedule,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    key: jax.Array,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip: str | float | None = True,
) -> BitsPerDim:
    """The full variational bound -log p(x_0) <= L_T + sum_t L_t in bits/dim (DDPM eq. 5).

    Every term is estimated with one draw of x_t ~ q(x_t | x_0), as in the reference
    ``calc_bpd_loop``; the loop over t is one ``lax.scan`` (T network calls).
    x0 must be data in [-1, 1] quantized to 256 levels for L_0 to be a likelihood.
    """
    B = x0.shape[0]

    def body(_, t_scalar):
        t = jnp.full((B,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        xt = diffusion.q_sample(schedule, x0, t, noise)
        out = model_fn(xt, schedule.timesteps[t])
        pmv = diffusion.p_mean_variance(schedule, out, xt, t, parameterization, variance, clip=clip)
        return None, vlb_term(schedule, x0, xt, t, pmv.mean, pmv.log_variance)

    # Keys are folded in inside the body: nothing runs (or compiles) before the model's output
    # and the argument names have been checked while tracing it.
    _, terms = jax.lax.scan(body, None, np.arange(schedule.num_timesteps, dtype=np.int32))
    prior = prior_bpd(schedule, x0)
    return BitsPerDim(total=prior + terms.sum(0), prior=prior, terms=terms)
