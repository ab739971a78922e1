"""The forward process, its posterior, parameterization conversions and the reverse Gaussian.

Shapes: data ``x0, x_t: [B, ...]`` (any rank, e.g. NHWC images or [B, D] points);
timesteps ``t: [B]`` int (0-indexed) or a scalar applied to the whole batch.
Equations are from Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM),
Salimans & Ho 2022 (v-prediction) and Song et al. 2021 (score SDE).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.schedules import Schedule

__all__ = [
    "extract",
    "check_timesteps",
    "q_mean_variance",
    "q_sample",
    "q_posterior",
    "predict_x0",
    "predict_eps",
    "predict_v",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "score_from_eps",
    "eps_from_score",
    "to_x0_eps",
    "x0_eps_from_output",
    "output_from_eps",
    "threshold_x0",
    "MeanVariance",
    "p_mean_variance",
    "PARAMETERIZATIONS",
    "VARIANCE_TYPES",
]

PARAMETERIZATIONS = ("eps", "x0", "v", "score", "flow")
"""What a network may predict: ``eps``, ``x0``, ``v`` = alpha eps - sigma x_0 (Salimans & Ho 2022),
``score`` = -eps / sigma, or ``flow``, the rectified-flow velocity eps - x_0. The schedule-table
conversions (``to_x0_eps``, ``p_mean_variance``) take the first four; ``flow`` needs
alpha + sigma = 1 and is converted by :func:`x0_eps_from_output` from the process's (alpha, sigma)."""

SCHEDULE_PARAMETERIZATIONS = PARAMETERIZATIONS[:4]
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
"""The reverse-step variances of :func:`p_mean_variance`: ``fixed_small`` (beta_tilde_t) and
``fixed_large`` (beta_t) of DDPM, ``learned_range`` (the interpolation of improved DDPM, eq. 15;
the network outputs 2C channels) and ``learned`` (the network's log-variance itself)."""


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_timesteps(schedule: Schedule, t, x=None, name: str = "t") -> None:
    """Raise a ValueError if ``t`` is not an int array in [0, T) of shape [] or [B].

    Runs only where values are concrete (outside ``jit``), so it costs nothing when traced;
    shapes and dtypes are checked in both cases.
    """
    t_arr = t if hasattr(t, "dtype") else np.asarray(t)
    if not jnp.issubdtype(t_arr.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer timesteps (0-indexed), got dtype {t_arr.dtype}")
    if t_arr.ndim > 1:
        raise ValueError(f"{name}: expected shape [] or [batch], got {tuple(t_arr.shape)}")
    if x is not None and t_arr.ndim == 1 and t_arr.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name}: expected shape [{x.shape[0]}] to match the batch of x, got {tuple(t_arr.shape)}")
    if _is_concrete(t_arr):
        T = schedule.num_timesteps
        values = np.asarray(t_arr)
        if values.size and (values.min() < 0 or values.max() >= T):
            raise ValueError(
                f"{name}: expected timesteps in [0, {T}) (0-indexed; t=0 is the first noising step), "
                f"got min {values.min()}, max {values.max()}"
            )


def _check_same_shape(**arrays) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("expected equal shapes, got " + ", ".join(f"{k}: {s}" for k, s in shapes.items()))


def extract(coef: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """Gather ``coef[t]`` and reshape to broadcast against ``x`` ([B] -> [B, 1, ..., 1])."""
    out = jnp.take(coef, jnp.asarray(t), axis=0)
    return out.reshape(out.shape + (1,) * (x.ndim - out.ndim))


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
    """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4)."""
    check_timesteps(schedule, t, x0)
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
    # Not 1 - alphas_cumprod: in float32 that loses ~1e-4 of the variance where abar ~ 1.
    var = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) ** 2
    log_var = extract(schedule.log_one_minus_alphas_cumprod, t, x0)
    return mean, jnp.broadcast_to(var, x0.shape), jnp.broadcast_to(log_var, x0.shape)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    check_timesteps(schedule, t, x0)
    _check_same_shape(x0=x0, noise=noise)
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
    """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) (DDPM eqs. 6-7).

    Returns ``(mean, variance, log_variance_clipped)``, each shaped like ``x0``.
    """
    check_timesteps(schedule, t, xt)
    _check_same_shape(x0=x0, xt=xt)
    mean = extract(schedule.posterior_mean_coef1, t, xt) * x0 + extract(schedule.posterior_mean_coef2, t, xt) * xt
    var = jnp.broadcast_to(extract(schedule.posterior_variance, t, xt), xt.shape)
    log_var = jnp.broadcast_to(extract(schedule.posterior_log_variance_clipped, t, xt), xt.shape)
    return mean, var, log_var


def predict_x0(schedule: Schedule, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (inverse of DDPM eq. 4)."""
    check_timesteps(schedule, t, xt)
    _check_same_shape(xt=xt, eps=eps)
    return extract(schedule.sqrt_recip_alphas_cumprod, t, xt) * xt - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt) * eps


def predict_eps(schedule: Schedule, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)."""
    check_timesteps(schedule, t, xt)
    _check_same_shape(xt=xt, x0=x0)
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt)


def predict_v(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    check_timesteps(schedule, t, x0)
    _check_same_shape(x0=x0, eps=eps)
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * eps - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def predict_x0_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, appendix D)."""
    check_timesteps(schedule, t, xt)
    _check_same_shape(xt=xt, v=v)
    return extract(schedule.sqrt_alphas_cumprod, t, xt) * xt - extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt) * v


def predict_eps_from_v(schedule: Schedule, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    check_timesteps(schedule, t, xt)
    _check_same_shape(xt=xt, v=v)
    return extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt) * xt + extract(schedule.sqrt_alphas_cumprod, t, xt) * v


def score_from_eps(schedule: Schedule, t: jax.Array, eps: jax.Array) -> jax.Array:
    """grad_x log q(x_t) = -eps / sqrt(1 - abar_t) (Song et al. 2021; Tweedie)."""
    check_timesteps(schedule, t, eps)
    return -eps / extract(schedule.sqrt_one_minus_alphas_cumprod, t, eps)


def eps_from_score(schedule: Schedule, t: jax.Array, score: jax.Array) -> jax.Array:
    """eps = -sqrt(1 - abar_t) * score."""
    check_timesteps(schedule, t, score)
    return -extract(schedule.sqrt_one_minus_alphas_cumprod, t, score) * score


def to_x0_eps(schedule: Schedule, output: jax.Array, xt: jax.Array, t: jax.Array, parameterization: str = "eps"):
    """Convert a network output in any parameterization to ``(x0, eps)``."""
    if parameterization == "eps":
        return predict_x0(schedule, xt, t, output), output
    if parameterization == "x0":
        return output, predict_eps(schedule, xt, t, output)
    if parameterization == "v":
        return predict_x0_from_v(schedule, xt, t, output), predict_eps_from_v(schedule, xt, t, output)
    if parameterization == "score":
        eps = eps_from_score(schedule, t, output)
        return predict_x0(schedule, xt, t, eps), eps
    raise ValueError(f"parameterization: expected one of {SCHEDULE_PARAMETERIZATIONS}, got {parameterization!r}")


def x0_eps_from_output(output: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array, parameterization: str = "eps"):
    """(x0, eps) from a network output at x = alpha x0 + sigma eps, for any process (alpha, sigma
    broadcast to x). v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4; exact also when
    alpha^2 + sigma^2 != 1), score = -eps / sigma, flow = eps - x0 (the rectified-flow velocity
    of x_t = (1 - t) x0 + t eps, Liu et al. 2023, eq. 1; for processes with alpha + sigma = 1)."""
    if parameterization == "eps":
        return (x - sigma * output) / alpha, output
    if parameterization == "x0":
        return output, (x - alpha * output) / sigma
    if parameterization == "v":
        norm = alpha**2 + sigma**2  # 1 for a variance-preserving process
        return (alpha * x - sigma * output) / norm, (sigma * x + alpha * output) / norm
    if parameterization == "score":
        eps = -sigma * output
        return (x - sigma * eps) / alpha, eps
    if parameterization == "flow":  # v = d x_t / dt = eps - x0 on x_t = (1 - t) x0 + t eps (alpha + sigma = 1)
        return x - sigma * output, x + alpha * output
    raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}")


def output_from_eps(eps: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array, parameterization: str = "eps"):
    """The inverse of :func:`x0_eps_from_output`: the network output that implies this eps at x."""
    if parameterization == "eps":
        return eps
    if parameterization == "score":
        return -eps / sigma
    x0 = (x - sigma * eps) / alpha
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return alpha * eps - sigma * x0
    if parameterization == "flow":
        return eps - x0
    raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}")


def threshold_x0(x0: jax.Array, clip: str | float | None = None, percentile: float = 0.995) -> jax.Array:
    """Clip a predicted x_0.

    ``clip=None``: unchanged; ``clip=True`` or a float ``c``: static clip to [-1, 1] or [-c, c];
    ``clip="dynamic"``: dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3):
    s = max(1, quantile(|x_0|, percentile)) per example, x_0 <- clip(x_0, -s, s) / s.
    """
    if clip is None or clip is False:
        return x0
    if clip == "dynamic":
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s
    if isinstance(clip, str):
        raise ValueError(f"clip: expected None, True, a positive float or 'dynamic', got {clip!r}")
    c = 1.0 if clip is True else float(clip)
    if not c > 0:
        raise ValueError(f"clip: expected a positive bound, got {clip!r}")
    return jnp.clip(x0, -c, c)


class MeanVariance(NamedTuple):
    """The reverse-step Gaussian p(x_{t-1} | x_t) and the predictions it came from."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


def split_variance_output(output: jax.Array, variance: str):
    """Split a network output into (prediction, variance channels or None) along the last axis."""
    if variance in ("learned_range", "learned"):
        if output.shape[-1] % 2:
            raise ValueError(
                f"variance={variance!r}: expected a model output with 2C channels (prediction, variance), "
                f"got {output.shape[-1]} channels"
            )
        pred, var_out = jnp.split(output, 2, axis=-1)
        return pred, var_out
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"variance: expected one of {VARIANCE_TYPES}, got {variance!r}")
    return output, None


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip: str | float | None = None,
    x0_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> MeanVariance:
    """The reverse Gaussian p_theta(x_{t-1} | x_t) (DDPM eq. 1, 11; improved DDPM eq. 15).

    The mean is the posterior mean q(x_{t-1} | x_t, x0_hat) at the predicted x_0. Variance:
    ``fixed_small`` beta_tilde_t (clipped log), ``fixed_large`` beta_t (with beta_tilde_1 at
    t = 0, as the reference code does, where it is never used for noise),
    ``learned_range`` exp(v log beta_t + (1 - v) log beta_tilde_t) with the network's
    v in [-1, 1] mapped to [0, 1] (improved DDPM eq. 15), ``learned`` the log-variance itself.

    Args:
      model_output: [B, ..., C] or [B, ..., 2C] for learned variances.
      xt: [B, ..., C]; t: [B] int.
      clip, x0_fn: applied to the predicted x_0 (``threshold_x0``, then ``x0_fn``) before the mean.
    """
    check_timesteps(schedule, t, xt)
    pred, var_out = split_variance_output(model_output, variance)
    if pred.shape != xt.shape:
        raise ValueError(f"model_output: expected prediction shape {tuple(xt.shape)} (like x_t), got {tuple(pred.shape)}")
    if variance == "fixed_small":
        var = extract(schedule.posterior_variance, t, xt)
        log_var = extract(schedule.posterior_log_variance_clipped, t, xt)
    elif variance == "fixed_large":
        # A one-step (respaced) schedule has no beta_tilde_1 to substitute.
        large = schedule.betas.at[0].set(schedule.posterior_variance[1]) if schedule.num_timesteps > 1 else schedule.betas
        var = extract(large, t, xt)
        log_var = jnp.log(var)
    elif variance == "learned_range":
        min_log = extract(schedule.posterior_log_variance_clipped, t, xt)
        max_log = extract(jnp.log(schedule.betas), t, xt)
        frac = (var_out + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        var = jnp.exp(log_var)
    else:  # learned
        log_var = var_out
        var = jnp.exp(log_var)
    x0, eps = to_x0_eps(schedule, pred, xt, t, parameterization)
    if clip is not None or x0_fn is not None:
        x0 = threshold_x0(x0, clip)
        if x0_fn is not None:
            x0 = x0_fn(x0)
        eps = predict_eps(schedule, xt, t, x0)
    mean, _, _ = q_posterior(schedule, x0, xt, t)
    return MeanVariance(
        mean=mean,
        variance=jnp.broadcast_to(var, xt.shape),
        log_variance=jnp.broadcast_to(log_var, xt.shape),
        pred_x0=x0,
        pred_eps=eps,
    )
