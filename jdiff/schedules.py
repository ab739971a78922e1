"""Noise schedules as immutable pytrees.

A discrete schedule has ``T`` steps indexed ``t = 0 .. T-1`` (``t = 0`` is the first
noising step, the paper's ``t = 1``). Every coefficient is computed once in float64 NumPy
and cast to float32, following Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021
(improved DDPM). Continuous-time schedules are functions of ``t in [0, 1]`` returning the
log signal-to-noise ratio ``lambda(t) = log(alpha^2 / sigma^2)`` (Kingma et al. 2021, VDM).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "linear",
    "cosine",
    "scaled_linear",
    "from_betas",
    "from_alphas_cumprod",
    "respace",
    "space_timesteps",
    "vp_linear_log_snr",
    "cosine_log_snr",
    "alpha_sigma_from_log_snr",
    "from_log_snr",
    "get",
    "Process",
    "ContinuousVP",
    "continuous_vp",
    "EDMProcess",
    "edm",
    "FlowProcess",
    "flow",
    "karras_sigmas",
]


@flax.struct.dataclass
class Schedule:
    """Coefficients of a discrete Gaussian diffusion, each a float32 array of shape [T].

    ``timesteps`` ([T] int32) maps an index of this schedule to the timestep of the
    schedule the network was trained on: the identity for a fresh schedule, the kept
    timesteps for a respaced one. Samplers call ``model_fn(x_t, schedule.timesteps[i])``.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timesteps: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of this schedule (the length of every coefficient array)."""
        return int(self.betas.shape[-1])

    # -- the process interface (see :class:`Process`): time i in [-1, T), -1 = the data --------

    def alpha_sigma(self, time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_i, sigma_i) = (sqrt(abar_i), sqrt(1 - abar_i)) at schedule indices ``time``
        (any int shape), (1, 0) at -1; read from the float64-derived tables, since 1 - abar in
        float32 would cancel near i = 0."""
        idx = jnp.where(jnp.asarray(time) < 0, self.num_timesteps, time)
        pad = lambda a, v: jnp.concatenate([a, jnp.full((1,), v, a.dtype)])  # noqa: E731
        return (jnp.take(pad(self.sqrt_alphas_cumprod, 1.0), idx), jnp.take(pad(self.sqrt_one_minus_alphas_cumprod, 0.0), idx))

    def log_snr(self, time: jax.Array) -> jax.Array:
        """lambda_i = log(alpha_i^2 / sigma_i^2) (+inf at the data, i = -1)."""
        alpha, sigma = self.alpha_sigma(time)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def sde_increments(self, time: jax.Array, time_next: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(int f, int g^2) of the VP-SDE dx = f x dt + g dw over (time_next, time] (Song et al.
        2021b, eq. 11): f = -beta/2, g^2 = beta, int beta = log(abar_next / abar_time)."""
        (a, _), (a_n, _) = self.alpha_sigma(time), self.alpha_sigma(time_next)
        d_beta = 2.0 * (jnp.log(a_n) - jnp.log(a))
        return -0.5 * d_beta, d_beta

    def model_time(self, time: jax.Array) -> jax.Array:
        """The time the network was trained with: ``timesteps[i]`` (the identity unless respaced)."""
        return jnp.take(self.timesteps, jnp.asarray(time))

    def check_times(self, times: np.ndarray, name: str = "timesteps") -> np.ndarray:
        """Concrete integer times in [-1, T) as int32 (-1 = the data); ValueError otherwise."""
        times = np.asarray(times)
        if times.ndim != 1 or times.size < 2 or not np.issubdtype(times.dtype, np.integer):
            raise ValueError(f"{name}: expected a 1-D integer sequence of at least 2 schedule indices, got {times!r}")
        T = self.num_timesteps
        if times.min() < -1 or times.max() >= T:
            raise ValueError(f"{name}: expected indices in [-1, {T}) (-1 = the data), got min {times.min()}, max {times.max()}")
        return times.astype(np.int32)

    def is_data(self, times: np.ndarray) -> np.ndarray:
        """Where a schedule index is the data end of the process (i = -1), as a bool array of ``times``' shape."""
        return np.asarray(times) < 0


def _check_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
        bad = betas[~((betas > 0) & (betas <= 1))]
        raise ValueError(f"betas: expected every value in (0, 1], got {bad[:5]} (first offending values)")


def from_betas(betas: Sequence[float] | np.ndarray, timesteps: Sequence[int] | np.ndarray | None = None) -> Schedule:
    """Build a :class:`Schedule` from betas (Ho et al. 2020, eqs. 4, 6, 7).

    alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]); the posterior q(x_{t-1} | x_t, x_0)
    has variance beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) and mean
    coef1 * x_0 + coef2 * x_t with coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
    coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t). The log-variance is clipped at
    t = 0 (where beta_tilde is 0) by using beta_tilde_1, as the reference code does.

    Args:
      betas: [T] noise variances in (0, 1].
      timesteps: [T] the trained-model timestep of each index (default: 0..T-1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    _check_betas(betas)
    T = betas.shape[0]
    if timesteps is None:
        timesteps = np.arange(T)
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (T,):
        raise ValueError(f"timesteps: expected shape ({T},) to match betas, got {timesteps.shape}")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # beta_tilde_0 = 0; the log is clipped with beta_tilde_1 (T == 1 has nothing better).
    post_logvar = np.log(np.append(post_var[1], post_var[1:]) if T > 1 else np.maximum(post_var, 1e-20))
    # Cast in NumPy and placed with device_put: building a schedule compiles nothing, so errors
    # found after it (a bad config, a bad sampler argument) still come before any compilation.
    f32 = lambda a: jax.device_put(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
        timesteps=jax.device_put(np.asarray(timesteps, dtype=np.int32)),
    )


def from_alphas_cumprod(alphas_cumprod: np.ndarray, max_beta: float = 0.999, timesteps=None) -> Schedule:
    """Schedule whose cumulative products are ``alphas_cumprod`` ([T], decreasing in (0, 1)).

    beta_t = 1 - abar_t / abar_{t-1} (abar_{-1} = 1), clipped at ``max_beta``
    (Nichol & Dhariwal 2021, sec. 3.2).
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if ac.ndim != 1 or np.any(ac <= 0) or np.any(ac >= 1) or np.any(np.diff(ac) > 0):
        raise ValueError(f"alphas_cumprod: expected a 1-D non-increasing array in (0, 1), got {ac!r}")
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return from_betas(np.minimum(betas, max_beta), timesteps)


def _check_num_timesteps(num_timesteps) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")


def linear(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM linear schedule (Ho et al. 2020, sec. 4): betas = linspace(beta_start, beta_end, T).

    The defaults are the paper's values for T = 1000; for small T pass a larger
    ``beta_end`` so that alphas_cumprod[T-1] is near 0 (check ``alphas_cumprod[-1]``).
    """
    _check_num_timesteps(num_timesteps)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def scaled_linear(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Schedule:
    """Latent diffusion's schedule (Rombach et al. 2022; diffusers' "scaled_linear"): betas =
    linspace(sqrt(beta_start), sqrt(beta_end), T)^2. The defaults are Stable Diffusion's."""
    _check_num_timesteps(num_timesteps)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return from_betas(np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2)


def cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at ``max_beta``."""
    _check_num_timesteps(num_timesteps)
    if s < 0:
        raise ValueError(f"s: expected a non-negative offset, got {s}")
    f = lambda u: np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2  # noqa: E731
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    betas = 1.0 - f(u[1:]) / f(u[:-1])
    return from_betas(np.minimum(betas, max_beta))


def space_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """``steps`` timesteps of 0..num_timesteps-1, evenly spread and always containing the
    last (pure-noise) step and the first: round(linspace(0, T-1, steps))."""
    _check_num_timesteps(num_timesteps)
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: expected an int in [1, {num_timesteps}] (the schedule's T), got {steps!r}")
    if steps == 1:
        return np.array([num_timesteps - 1])
    ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    return ts


def respace(schedule: Schedule, timesteps: Sequence[int] | np.ndarray) -> Schedule:
    """Keep only ``timesteps`` of ``schedule`` (Nichol & Dhariwal 2021, sec. 4).

    New betas are beta'_i = 1 - abar[k_i] / abar[k_{i-1}] for the sorted kept timesteps k,
    so the kept alphas_cumprod are unchanged. The result's ``timesteps`` record the kept
    timesteps of the original model, so networks are called with the times they know.
    """
    ts = np.asarray(timesteps)
    T = schedule.num_timesteps
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps: expected a non-empty 1-D integer array, got {ts!r}")
    if np.any(np.diff(ts) <= 0):
        raise ValueError(f"timesteps: expected strictly increasing values, got {ts.tolist()}")
    if ts[0] < 0 or ts[-1] >= T:
        raise ValueError(f"timesteps: expected values in [0, {T}), got min {ts[0]}, max {ts[-1]}")
    # Recompute the products in float64, taking each alpha_t from the stored float32 value
    # that holds it to full precision: 1 - beta_t for small betas, abar_t / abar_{t-1} for
    # betas near 1 (1 - float32(0.999) is off by 1.3e-5).
    betas = np.asarray(schedule.betas, dtype=np.float64)
    ac = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where(betas > 0.5, ac / np.append(1.0, ac[:-1]), 1.0 - betas)
    kept = np.cumprod(alphas)[ts]
    betas = 1.0 - kept / np.append(1.0, kept[:-1])
    return from_betas(betas, np.asarray(schedule.timesteps)[ts])


# ---------------------------------------------------------------------------
# Continuous time: log-SNR schedules lambda(t), t in [0, 1].
# ---------------------------------------------------------------------------


def vp_linear_log_snr(t: jax.Array, beta_min: float = 0.1, beta_max: float = 20.0) -> jax.Array:
    """log-SNR of the VP-SDE with linear beta(t) (Song et al. 2021, eq. 33):
    abar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2), lambda = log(abar / (1 - abar))."""
    log_abar = -beta_min * t - 0.5 * (beta_max - beta_min) * t**2
    return log_abar - jnp.log(-jnp.expm1(log_abar))


def cosine_log_snr(t: jax.Array, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> jax.Array:
    """Cosine log-SNR (Ho & Salimans 2022, CFG paper, sec. 4 / Kingma et al. 2021):
    lambda(t) = -2 log tan(a t + b), with a, b chosen so lambda(0)=logsnr_max, lambda(1)=logsnr_min."""
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    # Past pi/4 the angle u = a t + b heads for pi/2, where float32 tan(u) loses ~1e-3 of
    # lambda; there use -log tan(u) = log tan(pi/2 - u), pi/2 - u = a (1 - t) + c.
    c = math.atan(math.exp(0.5 * logsnr_min))
    return jnp.where(a * t + b < math.pi / 4, -2.0 * jnp.log(jnp.tan(a * t + b)), 2.0 * jnp.log(jnp.tan(a * (1.0 - t) + c)))


def alpha_sigma_from_log_snr(log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) of a variance-preserving process: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


def from_log_snr(log_snr_fn, num_timesteps: int, max_beta: float = 0.999) -> Schedule:
    """Discretize a continuous log-SNR schedule at t_i = (i + 1) / T, i = 0..T-1."""
    _check_num_timesteps(num_timesteps)
    u = (np.arange(num_timesteps, dtype=np.float64) + 1.0) / num_timesteps
    # lambda is evaluated in float64: betas are differences of neighbouring abar, so a
    # float32 lambda (relative error ~1e-7 of |lambda| ~ 10) would cost ~1e-4 in each beta.
    with jax.enable_x64(True):
        lam = np.asarray(jax.device_get(log_snr_fn(jnp.asarray(u, dtype=jnp.float64))), dtype=np.float64)
    ac = 1.0 / (1.0 + np.exp(-lam))
    return from_alphas_cumprod(np.minimum.accumulate(ac), max_beta)


class Process:
    """What a sampler needs from a diffusion process, at a process time (an array of any shape).

    x_t = alpha(t) x_0 + sigma(t) eps. Implemented by the discrete :class:`Schedule` (time = an
    index in [-1, T), -1 the data) and :class:`ContinuousVP` (time in [t_min, 1], float); EDM's
    sigma(t) (alpha = 1) and flow matching's (alpha, sigma) = (1 - t, t) are further instances.
    This class documents the interface (duck-typed; samplers only call these methods):

      ``alpha_sigma(time) -> (alpha, sigma)``
      ``log_snr(time) -> log(alpha^2 / sigma^2)``
      ``sde_increments(time, time_next) -> (int f, int g^2)`` of the forward SDE over the step
      ``model_time(time)`` what the network is fed
      ``check_times(times, name) -> times`` validate a concrete time sequence (NumPy)
      ``is_data(times) -> bool array`` where a time is the clean-data end of the process
    """


@flax.struct.dataclass
class ContinuousVP:
    """A continuous-time variance-preserving process given by its log-SNR lambda(t), t in [t_min, 1]
    (Kingma et al. 2021, VDM; Song et al. 2021b, VP-SDE): alpha^2 = sigmoid(lambda),
    sigma^2 = sigmoid(-lambda). Times are floats; the network is fed t itself.

    ``log_snr_fn``: a jit-able function of t (e.g. :func:`cosine_log_snr`, :func:`vp_linear_log_snr`);
    a static field, so it must be hashable (a module-level function or a ``functools.partial``).
    """

    log_snr_fn: object = flax.struct.field(pytree_node=False)
    t_min: float = flax.struct.field(pytree_node=False, default=0.0)

    def log_snr(self, time: jax.Array) -> jax.Array:
        """lambda(t) = ``log_snr_fn(t)`` at times ``time`` (any shape), evaluated in float32."""
        return self.log_snr_fn(jnp.asarray(time, jnp.float32))

    def alpha_sigma(self, time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_t, sigma_t) = (sqrt(sigmoid(lambda(t))), sqrt(sigmoid(-lambda(t)))) at times ``time`` (any shape)."""
        return alpha_sigma_from_log_snr(self.log_snr(time))

    def sde_increments(self, time: jax.Array, time_next: jax.Array) -> tuple[jax.Array, jax.Array]:
        """VP: f = d log alpha / dt and g^2 = -2 f, integrated exactly: int f = log(alpha_t / alpha_next)."""
        (a, _), (a_n, _) = self.alpha_sigma(time), self.alpha_sigma(time_next)
        int_f = jnp.log(a) - jnp.log(a_n)
        return int_f, -2.0 * int_f

    def model_time(self, time: jax.Array) -> jax.Array:
        """The time the network is fed: t itself, as float32."""
        return jnp.asarray(time, jnp.float32)

    def time_range(self) -> tuple[float, float]:
        """(the data end, the noise end) of the time axis."""
        return self.t_min, 1.0

    def time_from_scaled_sigma(self, s: jax.Array) -> jax.Array:
        """The time t with sigma_t / alpha_t = s, i.e. lambda(t) = -2 log s (bisection; lambda decreases)."""
        target = -2.0 * jnp.log(jnp.asarray(s, jnp.float32))

        def body(_, lo_hi):
            lo, hi = lo_hi
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > target
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, body, (jnp.full_like(target, self.t_min), jnp.ones_like(target)))
        return 0.5 * (lo + hi)

    def check_times(self, times: np.ndarray, name: str = "timesteps") -> np.ndarray:
        """Concrete float times in [t_min, 1] as float32 (t_min = the data); ValueError otherwise."""
        return _check_float_times(times, self.t_min, 1.0, name)

    def is_data(self, times: np.ndarray) -> np.ndarray:
        """Where a time is the data end of the process (t <= t_min), as a bool array of ``times``' shape."""
        return np.asarray(times) <= self.t_min


def continuous_vp(log_snr_fn=None, t_min: float = 0.0) -> ContinuousVP:
    """A :class:`ContinuousVP` process (default: the cosine log-SNR, lambda in [-20, 20])."""
    if log_snr_fn is None:
        log_snr_fn = cosine_log_snr
    if not callable(log_snr_fn):
        raise ValueError(f"log_snr_fn: expected a callable lambda(t), got {type(log_snr_fn).__name__}")
    if not 0.0 <= float(t_min) < 1.0:
        raise ValueError(f"t_min: expected a float in [0, 1), got {t_min!r}")
    return ContinuousVP(log_snr_fn=log_snr_fn, t_min=float(t_min))


def _check_float_times(times, lo: float, hi: float, name: str) -> np.ndarray:
    times = np.asarray(times)
    if times.ndim != 1 or times.size < 2 or not np.issubdtype(times.dtype, np.floating):
        raise ValueError(f"{name}: expected a 1-D float sequence of at least 2 times in [{lo}, {hi}], got {times!r}")
    if not np.all(np.isfinite(times)) or times.min() < lo or times.max() > hi:
        raise ValueError(f"{name}: expected times in [{lo}, {hi}], got min {times.min()}, max {times.max()}")
    return times.astype(np.float32)


@flax.struct.dataclass
class EDMProcess:
    """The EDM formulation (Karras et al. 2022, sec. 2 and Table 1): x = x_0 + sigma n, so
    alpha = 1 and the time *is* sigma, in [0, sigma_max] (0 = the data). The network is fed sigma
    (wrap it with :func:`jdiff.edm.precondition`, which turns sigma into c_noise = ln(sigma) / 4).
    Samples start from N(0, sigma_max^2 I)."""

    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)

    def alpha_sigma(self, time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha, sigma) = (1, t): the time is sigma itself (Karras et al. 2022, x = x_0 + sigma n)."""
        sigma = jnp.asarray(time, jnp.float32)
        return jnp.ones_like(sigma), sigma

    def log_snr(self, time: jax.Array) -> jax.Array:
        """lambda = log(1 / sigma^2) = -2 log sigma (+inf at the data, sigma = 0)."""
        return -2.0 * jnp.log(jnp.asarray(time, jnp.float32))

    def sde_increments(self, time: jax.Array, time_next: jax.Array) -> tuple[jax.Array, jax.Array]:
        """dx = sqrt(d sigma^2 / dt) dw (Karras et al. 2022, eq. 6 with s = 1): f = 0, int g^2 = sigma^2 - sigma_next^2."""
        sigma, sigma_n = jnp.asarray(time, jnp.float32), jnp.asarray(time_next, jnp.float32)
        return jnp.zeros_like(sigma), sigma**2 - sigma_n**2

    def model_time(self, time: jax.Array) -> jax.Array:
        """The time the network is fed: sigma itself, as float32 (:func:`jdiff.edm.precondition`
        turns it into c_noise = ln(sigma) / 4)."""
        return jnp.asarray(time, jnp.float32)

    def prior_std(self, time) -> float:
        """x at the first time is drawn from N(0, sigma^2 I) (sigma_data is negligible there)."""
        return float(np.asarray(time))

    def time_from_scaled_sigma(self, s: jax.Array) -> jax.Array:
        """The time t with sigma_t / alpha_t = s: s itself, since alpha = 1 and the time is sigma."""
        return s

    def time_range(self) -> tuple[float, float]:
        """(the data end, the noise end) of the time axis: (0, sigma_max)."""
        return 0.0, self.sigma_max

    default_spacing = "karras"

    def check_times(self, times: np.ndarray, name: str = "timesteps") -> np.ndarray:
        """Concrete float sigmas in [0, sigma_max] as float32 (0 = the data); ValueError otherwise."""
        return _check_float_times(times, 0.0, self.sigma_max, name)

    def is_data(self, times: np.ndarray) -> np.ndarray:
        """Where a time is the data end of the process (sigma <= 0), as a bool array of ``times``' shape."""
        return np.asarray(times) <= 0


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> EDMProcess:
    """An :class:`EDMProcess` (defaults: Karras et al. 2022, Table 1: sigma in [0.002, 80], sigma_data 0.5)."""
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("sigma_data", sigma_data)):
        if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a positive finite float, got {v!r}")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return EDMProcess(float(sigma_min), float(sigma_max), float(sigma_data))


@flax.struct.dataclass
class FlowProcess:
    """Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): the linear path
    x_t = (1 - t) x_0 + t eps, t in [0, 1] (0 = the data, 1 = pure noise), so alpha = 1 - t and
    sigma = t. Networks predict the velocity v = dx_t/dt = eps - x_0 (parameterization "flow")."""

    def alpha_sigma(self, time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha_t, sigma_t) = (1 - t, t), the linear path (Lipman et al. 2023; Liu et al. 2023)."""
        t = jnp.asarray(time, jnp.float32)
        return 1.0 - t, t

    def log_snr(self, time: jax.Array) -> jax.Array:
        """lambda(t) = 2 log((1 - t) / t), computed as 2 (log1p(-t) - log t): +inf at the data (t = 0),
        -inf at pure noise (t = 1)."""
        t = jnp.asarray(time, jnp.float32)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def model_time(self, time: jax.Array) -> jax.Array:
        """The time the network is fed: t itself, as float32."""
        return jnp.asarray(time, jnp.float32)

    def time_from_scaled_sigma(self, s: jax.Array) -> jax.Array:
        """The time t with sigma_t / alpha_t = t / (1 - t) = s, i.e. t = s / (1 + s)."""
        return s / (1.0 + s)  # s = t / (1 - t)

    def time_range(self) -> tuple[float, float]:
        """(the data end, the noise end) of the time axis: (0, 1)."""
        return 0.0, 1.0

    default_spacing = "uniform"
    linear_path = True  # alpha + sigma = 1: the "flow" parameterization is defined

    def check_times(self, times: np.ndarray, name: str = "timesteps") -> np.ndarray:
        """Concrete float times in [0, 1] as float32 (0 = the data); ValueError otherwise."""
        return _check_float_times(times, 0.0, 1.0, name)

    def is_data(self, times: np.ndarray) -> np.ndarray:
        """Where a time is the data end of the process (t <= 0), as a bool array of ``times``' shape."""
        return np.asarray(times) <= 0


def flow() -> FlowProcess:
    """A :class:`FlowProcess` (the rectified-flow linear interpolation)."""
    return FlowProcess()


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i < N, then sigma_N = 0. Returns [steps + 1] float64, decreasing."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not (np.isfinite(sigma_min) and np.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"sigma_min, sigma_max: expected a positive increasing range 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not (np.isfinite(rho) and rho > 0):
        raise ValueError(f"rho: expected a positive float, got {rho!r}")
    i = np.arange(steps, dtype=np.float64)
    frac = i / max(steps - 1, 1)
    sig = (sigma_max ** (1.0 / rho) + frac * (sigma_min ** (1.0 / rho) - sigma_max ** (1.0 / rho))) ** rho
    return np.append(sig, 0.0)


def get(name: str, num_timesteps: int, **kwargs) -> Schedule:
    """Schedule by name: ``"linear"``, ``"scaled_linear"`` or ``"cosine"`` (what configs use)."""
    builders = {"linear": linear, "scaled_linear": scaled_linear, "cosine": cosine}
    if name not in builders:
        raise ValueError(f"schedule: expected one of {sorted(builders)}, got {name!r}")
    return builders[name](num_timesteps, **kwargs)
