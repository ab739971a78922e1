"""Exact "models" to test samplers and guidance with, no training needed.

A mixture of Gaussians with diagonal covariances stays a mixture of Gaussians under the
forward process: if x_0 ~ sum_k pi_k N(mu_k, diag(s_k^2)) then
x_t ~ sum_k pi_k N(sqrt(abar_t) mu_k, diag(abar_t s_k^2 + 1 - abar_t)). Its score, the exact
eps*(x_t, t) = -sqrt(1 - abar_t) grad log q(x_t), and the class posterior p(k | x_t) are closed
form. Data may be points ([B, D]) or any event shape ([B, H, W, C]).
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.schedules import Schedule

__all__ = ["GaussianMixture", "gaussian_mixture"]


@flax.struct.dataclass
class GaussianMixture:
    """weights [K], means [K, D], stds [K, D] (D = prod(event_shape))."""

    weights: jax.Array
    means: jax.Array
    stds: jax.Array
    event_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    def _flat(self, x: jax.Array) -> jax.Array:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x: expected shape [B, {', '.join(map(str, self.event_shape))}], got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def component_log_probs(self, x_t: jax.Array, abar: jax.Array) -> jax.Array:
        """log(pi_k N(x_t; sqrt(abar) mu_k, abar s_k^2 + 1 - abar)) for each k: [B, K]. abar: [B]."""
        x = self._flat(x_t)
        abar = jnp.asarray(abar, x.dtype).reshape(-1, 1, 1)
        var = abar * self.stds[None] ** 2 + (1.0 - abar)  # [B, K, D]
        diff = x[:, None, :] - jnp.sqrt(abar) * self.means[None]
        log_n = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
        return jnp.log(self.weights)[None] + log_n

    def component_log_probs_at(self, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
        """log(pi_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2)) for any process x_t = alpha x_0 + sigma eps: [B, K]."""
        x = self._flat(x_t)
        a = jnp.broadcast_to(jnp.asarray(alpha, x.dtype), (x.shape[0],)).reshape(-1, 1, 1)
        s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],)).reshape(-1, 1, 1)
        var = a**2 * self.stds[None] ** 2 + s**2
        diff = x[:, None, :] - a * self.means[None]
        return jnp.log(self.weights)[None] - 0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)

    def score_at(self, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, component: jax.Array | None = None) -> jax.Array:
        """grad_x log q_t(x_t) for x_t = alpha x_0 + sigma eps (any process: VP, EDM, flow matching)."""
        x = self._flat(x_t)
        a = jnp.broadcast_to(jnp.asarray(alpha, x.dtype), (x.shape[0],)).reshape(-1, 1, 1)
        s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],)).reshape(-1, 1, 1)
        var = a**2 * self.stds[None] ** 2 + s**2
        comp_scores = -(x[:, None, :] - a * self.means[None]) / var
        if component is None:
            resp = jax.nn.softmax(self.component_log_probs_at(x_t, alpha, sigma), axis=-1)
        else:
            resp = jax.nn.one_hot(component, self.num_components, dtype=x.dtype)
        return jnp.einsum("bk,bkd->bd", resp, comp_scores).reshape(x_t.shape)

    def class_log_posterior(self, x_t: jax.Array, abar: jax.Array) -> jax.Array:
        """log p(k | x_t) at noise level abar: [B, K]."""
        return jax.nn.log_softmax(self.component_log_probs(x_t, abar), axis=-1)

    def score(self, x_t: jax.Array, abar: jax.Array, component: jax.Array | None = None) -> jax.Array:
        """grad_x log q_t(x_t) of the noised mixture, or of one component k ([B] ints) if given."""
        x = self._flat(x_t)
        a = jnp.asarray(abar, x.dtype).reshape(-1, 1, 1)
        var = a * self.stds[None] ** 2 + (1.0 - a)
        comp_scores = -(x[:, None, :] - jnp.sqrt(a) * self.means[None]) / var  # [B, K, D]
        if component is None:
            resp = jax.nn.softmax(self.component_log_probs(x_t, abar), axis=-1)
        else:
            resp = jax.nn.one_hot(component, self.num_components, dtype=x.dtype)
        return jnp.einsum("bk,bkd->bd", resp, comp_scores).reshape(x_t.shape)

    def posterior(self, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The exact posterior p(x_0 | x_t) for x_t = alpha x_0 + sigma eps: again a mixture.

        Component k has weight ~ pi_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2), mean
        mu_k + alpha s_k^2 (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2) and variance
        s_k^2 sigma^2 / (alpha^2 s_k^2 + sigma^2) (Gaussian conditioning, per dimension).
        Returns (weights [B, K], means [B, K, D], stds [B, K, D]); alpha, sigma: [B] or scalars.
        """
        x = self._flat(x_t)
        a = jnp.broadcast_to(jnp.asarray(alpha, x.dtype), (x.shape[0],)).reshape(-1, 1, 1)
        s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],)).reshape(-1, 1, 1)
        var = a**2 * self.stds[None] ** 2 + s**2
        diff = x[:, None, :] - a * self.means[None]
        log_w = jnp.log(self.weights)[None] - 0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
        means = self.means[None] + a * self.stds[None] ** 2 * diff / var
        stds = jnp.sqrt(self.stds[None] ** 2 * s**2 / var)
        return jax.nn.softmax(log_w, axis=-1), means, stds

    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """n exact draws from the clean mixture: (x0 [n, *event_shape], component [n])."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.categorical(k1, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k2, (n, self.means.shape[1]))
        x = self.means[comp] + self.stds[comp] * z
        return x.reshape((n,) + self.event_shape), comp

    # -- model functions in the forms samplers and guidance take ------------------------

    def model_fn(self, schedule: Schedule, parameterization: str = "eps") -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The exact network: ``(x_t [B, ...], t [B]) -> output`` in ``parameterization``.

        ``schedule`` is any process (a discrete :class:`Schedule` or a continuous one such as
        :func:`jdiff.schedules.continuous_vp`); ``t`` is its model time: the trained model's
        timestep of a discrete schedule (pass the original schedule even when sampling on a
        respaced one: samplers call models with ``schedule.timesteps[i]``), or the float time of
        a continuous process.
        """
        return jax.tree_util.Partial(_mixture_output, self, schedule, parameterization)

    def conditional_model_fn(self, schedule: Schedule, parameterization: str = "eps") -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """Exact class-conditional output: ``(x_t, t, y) -> eps`` (or another parameterization, for
        any process); y = k selects component k and y = K (the null label) gives the
        unconditional output, as classifier-free guidance expects."""
        if isinstance(schedule, Schedule) and parameterization == "eps":
            return jax.tree_util.Partial(_mixture_conditional_eps, self, schedule)
        return jax.tree_util.Partial(_mixture_conditional_output, self, schedule, parameterization)

    def class_log_prob_fn(self, schedule: Schedule) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """Exact noisy classifier ``(x_t, t, y) -> log p(y | x_t)`` [B], for classifier guidance."""
        return jax.tree_util.Partial(_mixture_class_log_prob, self, schedule)


def _abar_at(process, t: jax.Array) -> jax.Array:
    if isinstance(process, Schedule):  # the float64-derived table, exact for integer t
        return jnp.take(process.alphas_cumprod, t)
    return process.alpha_sigma(t)[0] ** 2


def _sigma_at(process, t: jax.Array, x: jax.Array) -> jax.Array:
    sigma = process.alpha_sigma(t)[1]
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def _generic_output(gm: GaussianMixture, process, parameterization: str, x_t, t, component=None):
    """The exact output of any process (x_t = alpha x_0 + sigma eps): eps* = -sigma score, the EDM
    denoiser D* = E[x_0 | x_t] = (x_t + sigma^2 score) / alpha (Tweedie), v*, and the flow
    velocity v* = E[eps - x_0 | x_t] = eps* - D*."""
    alpha, sigma = process.alpha_sigma(t)
    alpha = jnp.broadcast_to(alpha, (x_t.shape[0],))
    sigma = jnp.broadcast_to(sigma, (x_t.shape[0],))
    score = gm.score_at(x_t, alpha, sigma, component)
    if parameterization == "score":
        return score
    a, s = (v.reshape(v.shape + (1,) * (x_t.ndim - 1)) for v in (alpha, sigma))
    # E[x_0 | x_t] from the closed-form posterior rather than (x_t + sigma^2 score) / alpha, so it
    # stays finite where alpha = 0 (flow matching's pure-noise end, where it is the prior mean).
    w, means, _ = gm.posterior(x_t, alpha, sigma)
    if component is not None:
        w = jax.nn.one_hot(component, gm.num_components, dtype=w.dtype)
    x0 = jnp.einsum("bk,bkd->bd", w, means).reshape(x_t.shape)
    eps = -s * score
    outputs = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": eps - x0}
    if parameterization not in outputs:
        raise ValueError(f"parameterization: expected one of {diffusion.PARAMETERIZATIONS}, got {parameterization!r}")
    return outputs[parameterization]


def _mixture_output(gm: GaussianMixture, schedule, parameterization: str, x_t, t):
    if not isinstance(schedule, Schedule):
        return _generic_output(gm, schedule, parameterization, x_t, t)
    score = gm.score(x_t, _abar_at(schedule, t))
    if parameterization == "score":
        return score
    eps = diffusion.eps_from_score(schedule, t, score)
    if parameterization == "eps":
        return eps
    x0 = diffusion.predict_x0(schedule, x_t, t, eps)
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return diffusion.predict_v(schedule, x0, t, eps)
    raise ValueError(f"parameterization: expected one of {diffusion.PARAMETERIZATIONS}, got {parameterization!r}")


def _mixture_conditional_output(gm: GaussianMixture, process, parameterization: str, x_t, t, y):
    K = gm.num_components
    y = jnp.broadcast_to(jnp.asarray(y), (x_t.shape[0],))
    cond = _generic_output(gm, process, parameterization, x_t, t, component=jnp.minimum(y, K - 1))
    uncond = _generic_output(gm, process, parameterization, x_t, t)
    return jnp.where((y == K).reshape((-1,) + (1,) * (x_t.ndim - 1)), uncond, cond)


def _mixture_conditional_eps(gm: GaussianMixture, schedule, x_t, t, y):
    abar = _abar_at(schedule, t)
    K = gm.num_components
    y = jnp.broadcast_to(jnp.asarray(y), (x_t.shape[0],))
    cond = gm.score(x_t, abar, component=jnp.minimum(y, K - 1))
    uncond = gm.score(x_t, abar)
    is_null = (y == K).reshape((-1,) + (1,) * (x_t.ndim - 1))
    score = jnp.where(is_null, uncond, cond)
    if isinstance(schedule, Schedule):
        return diffusion.eps_from_score(schedule, t, score)
    return -_sigma_at(schedule, t, x_t) * score


def _mixture_class_log_prob(gm: GaussianMixture, schedule, x_t, t, y):
    if isinstance(schedule, Schedule):
        logp = gm.class_log_posterior(x_t, _abar_at(schedule, t))
    else:
        alpha, sigma = schedule.alpha_sigma(t)
        logp = jax.nn.log_softmax(gm.component_log_probs_at(x_t, alpha, sigma), axis=-1)
    y = jnp.broadcast_to(jnp.asarray(y), (x_t.shape[0],))
    return jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


def gaussian_mixture(weights, means, stds, event_shape: tuple[int, ...] | None = None) -> GaussianMixture:
    """Build a :class:`GaussianMixture`.

    Args:
      weights: [K] positive, normalised here.
      means: [K, *event_shape] (or [K, D]).
      stds: scalar, [K] (isotropic per component) or like ``means`` (diagonal).
      event_shape: the data shape of one example (default ``means.shape[1:]``).
    """
    w = np.asarray(weights, np.float64)
    m = np.asarray(means, np.float64)
    if w.ndim != 1 or w.size < 1 or np.any(w <= 0):
        raise ValueError(f"weights: expected a 1-D array of positive values, got {w}")
    if m.shape[0] != w.shape[0]:
        raise ValueError(f"means: expected {w.shape[0]} components (len(weights)), got shape {m.shape}")
    event_shape = tuple(m.shape[1:]) if event_shape is None else tuple(event_shape)
    D = int(np.prod(event_shape))
    m = m.reshape(w.shape[0], D)
    s = np.asarray(stds, np.float64)
    if s.ndim == 0:
        s = np.full_like(m, float(s))
    elif s.shape == (w.shape[0],):
        s = np.repeat(s[:, None], D, axis=1)
    else:
        s = s.reshape(w.shape[0], D)
    if np.any(s <= 0):
        raise ValueError(f"stds: expected positive standard deviations, got min {s.min()}")
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return GaussianMixture(weights=f32(w / w.sum()), means=f32(m), stds=f32(s), event_shape=event_shape)
