"""EDM (Karras et al. 2022) and flow matching (Lipman et al. 2023; Liu et al. 2023): the model
wrapper and the training objectives. Their processes (:func:`jdiff.schedules.edm`,
:func:`jdiff.schedules.flow`) and samplers (``heun``, ``heun_churn``, ``ddim`` = Euler, any
other) are the core's, so guidance, editing and sharding work unchanged.

  ``precondition(net_fn, sigma_data)``  D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (Table 1)
  ``edm_sigmas(key, n)`` / ``edm_loss``  log-normal sigma, lambda(sigma) weighting (sec. 5, eq. 8)
  ``flow_times(key, n)`` / ``flow_loss``  uniform or logit-normal t (Esser et al. 2024), v = eps - x_0
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["precondition", "preconditioning", "edm_sigmas", "edm_loss", "flow_times", "flow_loss", "TIME_SAMPLERS", "Preconditioning"]

Partial = jax.tree_util.Partial
TIME_SAMPLERS = ("uniform", "logit_normal")
"""The training-time distributions of :func:`flow_times` (``config.diffusion.flow_time``):
``uniform`` on (0, 1) (Lipman et al. 2023) and ``logit_normal`` (Esser et al. 2024, sec. 3.1)."""


class Preconditioning(NamedTuple):
    """EDM's coefficients at sigma (Karras et al. 2022, Table 1), each shaped like sigma."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def preconditioning(sigma: jax.Array, sigma_data: float = 0.5) -> Preconditioning:
    """c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    return Preconditioning(sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total), 0.25 * jnp.log(sigma))


def _check_sigma_data(sigma_data) -> float:
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not np.isfinite(sigma_data) or sigma_data <= 0:
        raise ValueError(f"sigma_data: expected a positive float (the data's standard deviation), got {sigma_data!r}")
    return float(sigma_data)


def precondition(net_fn: Callable, sigma_data: float = 0.5) -> Callable:
    """Wrap a raw network F(x, c_noise, *cond) into EDM's denoiser D(x; sigma, *cond) (Karras et
    al. 2022, eq. 7 and Table 1), an ``x0``-parameterized ``model_fn`` on the EDM process:
    ``jdiff.sample(precondition(F), jdiff.schedules.edm(), shape, key, method="heun",
    parameterization="x0")``. ``sigma`` is [B]; the network sees c_in x and c_noise = ln(sigma)/4.
    """
    if not callable(net_fn):
        raise ValueError(f"net_fn: expected a callable F(x, c_noise, ...), got {type(net_fn).__name__}")
    return Partial(_preconditioned, net_fn, _check_sigma_data(sigma_data))


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _preconditioned(net_fn, sigma_data, x, sigma, *args):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c = preconditioning(sigma, sigma_data)
    out = net_fn(_bcast(c.c_in, x) * x, c.c_noise, *args)
    return _bcast(c.c_skip, x) * x + _bcast(c.c_out, x) * out


def edm_sigmas(key: jax.Array, n: int, p_mean: float = -1.2, p_std: float = 1.2) -> jax.Array:
    """Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, sec. 5, Table 1): [n]."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (n,)))


def edm_loss(net_fn: Callable, x0: jax.Array, sigma: jax.Array, noise: jax.Array, sigma_data: float = 0.5, *args) -> jax.Array:
    """Per-example EDM loss lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 with lambda =
    (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, eq. 8 and Table 1), written as the
    unit-weight regression of F onto (x0 - c_skip x) / c_out (their eq. 8's right-hand side).
    x0, noise: [B, ...]; sigma: [B]. Returns [B] (mean over the data dimensions)."""
    c = preconditioning(sigma, sigma_data)
    x = x0 + _bcast(sigma, x0) * noise
    out = net_fn(_bcast(c.c_in, x0) * x, c.c_noise, *args)
    target = (x0 - _bcast(c.c_skip, x0) * x) / _bcast(c.c_out, x0)
    return jnp.mean((out - target).reshape(x0.shape[0], -1) ** 2, axis=1)


def flow_times(key: jax.Array, n: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Training times t in (0, 1): ``uniform`` (Lipman et al. 2023) or ``logit_normal``,
    t = sigmoid(mean + std z) (Esser et al. 2024, sec. 3.1). [n]."""
    if kind == "uniform":
        return jax.random.uniform(key, (n,), minval=1e-5, maxval=1.0)
    if kind == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))
    raise ValueError(f"kind: expected one of {TIME_SAMPLERS}, got {kind!r}")


def flow_loss(model_fn: Callable, x0: jax.Array, t: jax.Array, noise: jax.Array, *args) -> jax.Array:
    """Per-example conditional flow matching loss ||v(x_t, t) - (eps - x0)||^2 on the linear
    path x_t = (1 - t) x0 + t eps (Lipman et al. 2023, eq. 23 with sigma_min = 0; rectified
    flow, Liu et al. 2023, eq. 1). x0, noise: [B, ...]; t: [B] in [0, 1]. Returns [B]."""
    tb = _bcast(jnp.asarray(t, x0.dtype), x0)
    x_t = (1.0 - tb) * x0 + tb * noise
    out = model_fn(x_t, t, *args)
    return jnp.mean((out - (noise - x0)).reshape(x0.shape[0], -1) ** 2, axis=1)

