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

__all__ = ["GaussianMixture", "gaussian_mixture", "cascade_model_fns", "super_resolution_posterior", "downsample_matrix"]


@flax.struct.dataclass
class GaussianMixture:
    """weights [K], means [K, D], stds [K, D] (D = prod(event_shape))."""

    weights: jax.Array
    means: jax.Array
    stds: jax.Array
    event_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def num_components(self) -> int:
        """K, the number of mixture components."""
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


# -- a cascade on the mixture: exact base and super-resolution models ------------------------
#
# With x ~ sum_k pi_k N(mu_k, S_k) (S_k = diag(s_k^2)) and the low-resolution image y = A x
# (A: the area downsampling of jdiff.cascade.downsample, a linear map), y is again a mixture,
# of N(A mu_k, A S_k A^T), and so is x given the augmented z = alpha_s y + sigma_s e (Gaussian
# conditioning): component k has weight ~ pi_k N(z; alpha_s A mu_k, G_k), G_k = alpha_s^2 A S_k A^T
# + sigma_s^2 I, mean mu_k + alpha_s S_k A^T G_k^-1 (z - alpha_s A mu_k) and covariance
# S_k - alpha_s^2 S_k A^T G_k^-1 A S_k. A full-covariance mixture stays one under the forward
# process: x_t = a x + s eps has components N(a m_k, a^2 C_k + s^2 I) and eps* = -s grad log q.


def downsample_matrix(event_shape: tuple[int, int, int], factor: int) -> np.ndarray:
    """The [d_low, d] float64 matrix of area downsampling by ``factor`` (the mean of each f x f
    block, :func:`jdiff.cascade.downsample`) on flattened [H, W, C] images."""
    h, w, c = (int(v) for v in event_shape)
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"factor: expected a positive int dividing {h}x{w}, got {factor!r}")
    rows = np.kron(np.eye(h // factor), np.ones((1, factor))) / factor  # [h/f, h]
    cols = np.kron(np.eye(w // factor), np.ones((1, factor))) / factor  # [w/f, w]
    return np.kron(np.kron(rows, cols), np.eye(c))


def _full_cov_eps(log_pi, means, covs, x, a, s):
    """eps* = s sum_k w_k (a^2 C_k + s^2 I)^-1 (x - a m_k) with w_k ~ pi_k N(x; a m_k, a^2 C_k + s^2 I).
    log_pi [B, K], means [B, K, D], covs [B, K, D, D], x [B, D], a, s [B]."""
    d = x.shape[-1]
    g = a[:, None, None, None] ** 2 * covs + s[:, None, None, None] ** 2 * jnp.eye(d, dtype=x.dtype)
    chol = jnp.linalg.cholesky(g)
    r = x[:, None, :] - a[:, None, None] * means
    sol = jax.scipy.linalg.cho_solve((chol, True), r[..., None])[..., 0]  # G^-1 r, [B, K, D]
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = log_pi - 0.5 * (jnp.sum(r * sol, axis=-1) + logdet)
    w = jax.nn.softmax(log_w, axis=-1)
    return s[:, None] * jnp.einsum("bk,bkd->bd", w, sol)


def super_resolution_posterior(gm: GaussianMixture, z: jax.Array, alpha: jax.Array, sigma: jax.Array, factor: int | jax.Array):
    """x | z for z = alpha A x + sigma e (A = :func:`downsample_matrix`, or ``factor`` may be A
    itself): a mixture, returned as (log weights [B, K], means [B, K, D], covariances [B, K, D, D]).
    ``z`` [B, h, w, C] (or flattened [B, d]); alpha, sigma [B]."""
    A = jnp.asarray(downsample_matrix(gm.event_shape, factor) if np.ndim(factor) == 0 else factor, jnp.float32)
    zf = z.reshape(z.shape[0], -1)
    B, K, d = zf.shape[0], gm.num_components, A.shape[0]
    S = jax.vmap(jnp.diag)(gm.stds**2)  # [K, D, D]
    AS = jnp.einsum("ld,kde->kle", A, S)  # A S_k [K, d, D]
    a = alpha[:, None, None, None]
    G = a**2 * jnp.einsum("kle,me->klm", AS, A)[None] + sigma[:, None, None, None] ** 2 * jnp.eye(d)  # [B, K, d, d]
    r = zf[:, None, :] - alpha[:, None, None] * jnp.einsum("ld,kd->kl", A, gm.means)[None]  # [B, K, d]
    chol = jnp.linalg.cholesky(G)
    sol = jax.scipy.linalg.cho_solve((chol, True), r[..., None])[..., 0]  # G^-1 r
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = jax.nn.log_softmax(jnp.log(gm.weights)[None] - 0.5 * (jnp.sum(r * sol, axis=-1) + logdet), axis=-1)
    means = gm.means[None] + alpha[:, None, None] * jnp.einsum("kld,bkl->bkd", AS, sol)
    g_inv_as = jax.scipy.linalg.cho_solve((chol, True), jnp.broadcast_to(AS[None], (B, K, d, AS.shape[-1])))
    covs = S[None] - a**2 * jnp.einsum("kld,bkle->bkde", AS, g_inv_as)
    return log_w, means, 0.5 * (covs + jnp.swapaxes(covs, -1, -2))


def _cascade_base_eps(gm: GaussianMixture, schedule: Schedule, A: jax.Array, x_t, t):
    B, K = x_t.shape[0], gm.num_components
    means = jnp.broadcast_to(jnp.einsum("ld,kd->kl", A, gm.means)[None], (B, K, A.shape[0]))
    covs = jnp.einsum("ld,kd,md->klm", A, gm.stds**2, A)
    covs = jnp.broadcast_to(covs[None], (B,) + covs.shape)
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = jnp.broadcast_to(alpha, (B,)), jnp.broadcast_to(sigma, (B,))
    log_pi = jnp.broadcast_to(jnp.log(gm.weights)[None], (B, K))
    return _full_cov_eps(log_pi, means, covs, x_t.reshape(B, -1), a, s).reshape(x_t.shape)


def _cascade_sr_eps(gm: GaussianMixture, schedule: Schedule, A: jax.Array, x_t, t, cond):
    B = x_t.shape[0]
    z = cond["image"].reshape(B, -1) @ A.T  # A undoes nearest upsampling exactly
    s_aug = jnp.round(cond["aug_level"]).astype(jnp.int32)
    alpha_aug, sigma_aug = schedule.alpha_sigma(s_aug)
    log_w, means, covs = super_resolution_posterior(gm, z, alpha_aug, sigma_aug, A)
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = jnp.broadcast_to(alpha, (B,)), jnp.broadcast_to(sigma, (B,))
    return _full_cov_eps(log_w, means, covs, x_t.reshape(B, -1), a, s).reshape(x_t.shape)


def cascade_model_fns(gm: GaussianMixture, schedule: Schedule, factor: int):
    """Exact models of a two-stage cascade on ``gm`` (event shape [H, W, C]):

    ``base(x_t [B, H/f, W/f, C], t) -> eps*`` of the low-resolution images y = downsample(x), and
    ``sr(x_t [B, H, W, C], t, cond) -> eps*`` of x given ``cond = {"image": upsample(z, "nearest"),
    "aug_level": s}`` with z = alpha_s y + sigma_s e (the SR stage's input with Gaussian conditioning
    augmentation at timestep s of ``schedule``; s = -1 is the clean y). Both for eps-prediction on
    the discrete ``schedule`` at its own timesteps (not respaced)."""
    A = jnp.asarray(downsample_matrix(gm.event_shape, factor), jnp.float32)
    return (jax.tree_util.Partial(_cascade_base_eps, gm, schedule, A),
            jax.tree_util.Partial(_cascade_sr_eps, gm, schedule, A))
