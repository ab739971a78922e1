"""Reverse processes: one pure step per sampler, a public registry of them, and one ``lax.scan``.

Every sampler runs on a *process* (:class:`jdiff.schedules.Process`: the discrete
:class:`~jdiff.schedules.Schedule` or a continuous one such as
:class:`~jdiff.schedules.ContinuousVP`), which gives (alpha_t, sigma_t) at each step's time,
and calls ``model_fn(x_t, t)`` (or ``model_fn(x_t, t, cond)``) where ``t`` is the time the
network was trained with and the output is in the ``parameterization`` it was trained with.

The loop (:func:`sample`) walks an explicit time sequence ``times[0] -> times[1] -> ...``:
  * a backward pair (t -> t' earlier) is one step of the chosen sampler;
  * a forward pair (t -> t' later) re-noises with q(x_t' | x_t) (no network call): RePaint's
    resampling jumps;
  * it may start anywhere (``x`` given at ``times[0]``): SDEdit starts at t0;
  * after every step a ``hook(x, info)`` may edit x (RePaint's known-pixel replacement, a
    projection, classifier guidance's mean shift), inside the same scan.
One ``lax.scan`` inside one ``jit`` whatever the sequence, the sampler, the guidance or the hook;
the times are traced data, so a new sequence of the same length does not recompile.

Step functions in the registry (:func:`register`, :data:`METHODS`) share one signature,
``step(process, denoise, x, step: Step, state, options) -> StepResult``; multistep history
(DPM-Solver++'s previous x_0) is the ``state`` of the sampler that needs it. Built in:
  ``ddpm``           ancestral sampling on any chain (Ho et al. 2020, Alg. 2; improved DDPM variances
                     on respaced chains, Nichol & Dhariwal 2021, sec. 4),
  ``ddim``           DDIM with any eta (Song et al. 2021a, eqs. 12 and 16),
  ``euler_maruyama`` / ``ode``  reverse SDE and probability-flow ODE (Song et al. 2021b, eqs. 6, 13),
  ``dpm_solver++``   DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2),
  ``euler`` / ``heun`` / ``heun_churn``  EDM's Euler, deterministic Heun and stochastic sampler
                     (Karras et al. 2022, Algorithms 1 and 2) on any process,
  ``ddim_inverse``   the deterministic DDIM map run forwards (data -> noise), see :func:`ddim_invert`.

The single-step public functions (``ddpm_step``, ``ddim_step``, ...) take a discrete schedule and
integer timesteps, for users who write their own loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, schedules
from jdiff.diffusion import check_timesteps, threshold_x0
from jdiff.schedules import Schedule, space_timesteps

__all__ = [
    "ddpm_step",
    "ddim_step",
    "euler_maruyama_step",
    "ode_step",
    "dpm_solver_step",
    "sample",
    "ddim_invert",
    "SampleOutput",
    "METHODS",
    "SPACINGS",
    "timestep_pairs",
    "time_sequence",
    "register",
    "available",
    "Sampler",
    "Step",
    "StepResult",
    "StepInfo",
    "Prediction",
    "SamplerOptions",
    "DPMSolverState",
]

ModelFn = Callable[..., jax.Array]


# ---------------------------------------------------------------------------
# Updates in (alpha, sigma) form: shared by the single-step functions and the registry.
# ---------------------------------------------------------------------------


def _bcast(a, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a, x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _posterior_fraction(log_snr_t, log_snr_next):
    """1 - r with r = exp(lambda_t - lambda_next) = alpha_t^2 sigma_next^2 / (alpha_next^2 sigma_t^2):
    the fraction of sigma_next^2 that the posterior q(x_next | x_t, x_0) leaves as noise, computed
    without cancellation for short steps (1 at the data, where lambda_next = inf)."""
    return -jnp.expm1(log_snr_t - log_snr_next)


def _ancestral_update(alpha_t, sigma_t, alpha_n, sigma_n, lam_t, lam_n, x0, x, var_out, variance: str, noise):
    """One ancestral step x_t -> x_next ~ p(x_next | x_t) = q(x_next | x_t, x0_hat) with a chosen variance.

    Posterior (any pair of times, DDPM eq. 7 generalised; Kingma et al. 2021, eq. 31):
    mean = r (alpha_n / alpha_t) x_t + alpha_n (1 - r) x0, r = exp(lambda_t - lambda_n)
    = alpha_t^2 sigma_n^2 / (alpha_n^2 sigma_t^2);
    fixed_small: beta_tilde = sigma_n^2 (1 - r); fixed_large: beta = sigma_t^2 (1 - r) (the
    forward variance of the step, 1 - abar_t / abar_n for VP); learned_range:
    exp(v' log beta + (1 - v') log beta_tilde), v' = (v + 1) / 2 (improved DDPM eq. 15);
    learned: exp(v). No noise is added on a step to the data (sigma_n = 0).
    Returns (x_next, variance of the added noise).
    """
    frac = _posterior_fraction(lam_t, lam_n)
    # r alpha_n / alpha_t written without dividing by alpha_t (0 at flow matching's noise end).
    x_coef = alpha_t * sigma_n**2 / (alpha_n * sigma_t**2)
    mean = x_coef * x + alpha_n * frac * x0
    to_data = sigma_n <= 0
    if variance == "fixed_small":
        var = sigma_n**2 * frac
    elif variance == "fixed_large":
        var = sigma_t**2 * frac
    else:
        if variance == "learned_range":
            log_small = jnp.log(jnp.where(to_data, 1.0, sigma_n**2 * frac))
            v = (var_out + 1.0) / 2.0
            log_var = v * jnp.log(sigma_t**2 * frac) + (1.0 - v) * log_small
        else:  # "learned": the network's log-variance itself
            log_var = var_out
        var = jnp.exp(log_var)
    var = jnp.where(to_data, 0.0, var)
    return mean + jnp.sqrt(var) * noise, var


def _ddim_update(alpha_t, sigma_t, alpha_n, sigma_n, lam_t, lam_n, x0, eps, eta, noise):
    """DDIM (Song et al. 2021a, eq. 12): x_next = alpha_n x0 + sqrt(sigma_n^2 - s^2) eps + s z with
    s^2 = eta^2 sigma_n^2 (1 - exp(lambda_t - lambda_n)), eq. 16's
    eta^2 (1 - abar_n) / (1 - abar_t) (1 - abar_t / abar_n) for a VP process."""
    s2 = eta**2 * sigma_n**2 * _posterior_fraction(lam_t, lam_n)
    return alpha_n * x0 + jnp.sqrt(jnp.maximum(sigma_n**2 - s2, 0.0)) * eps + jnp.sqrt(s2) * noise, s2


def _noise(key: jax.Array, x: jax.Array) -> jax.Array:
    return jax.random.normal(key, x.shape, x.dtype)


# ---------------------------------------------------------------------------
# Single-step functions on a discrete schedule (integer timesteps; -1 = the data).
# ---------------------------------------------------------------------------


def _coefs(schedule: Schedule, t, x):
    alpha, sigma = schedule.alpha_sigma(t)
    return _bcast(alpha, x), _bcast(sigma, x), _bcast(schedule.log_snr(t), x)


def _check_pair(schedule: Schedule, t, t_prev, x) -> None:
    check_timesteps(schedule, t, x)
    t_prev_arr = jnp.asarray(t_prev)
    if not isinstance(t_prev_arr, jax.core.Tracer):
        tp, tt = np.asarray(t_prev_arr), np.asarray(jnp.asarray(t))
        if tp.size and (tp.min() < -1 or tp.max() >= schedule.num_timesteps):
            raise ValueError(f"t_prev: expected timesteps in [-1, {schedule.num_timesteps}) (-1 = clean data), got {tp}")
        if np.any(np.broadcast_to(tp, np.broadcast_shapes(tp.shape, tt.shape)) >= tt):
            raise ValueError(f"t_prev: expected t_prev < t (a reverse step), got t={tt}, t_prev={tp}")


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    key: jax.Array,
    variance: str = "fixed_small",
    parameterization: str = "eps",
    clip: Any = None,
) -> jax.Array:
    """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2; improved DDPM eq. 15).

    x_{t-1} = mu_theta(x_t, t) + sigma_t z with z ~ N(0, I) for t > 0 and z = 0 at t = 0.
    ``variance``: fixed_small (beta_tilde), fixed_large (beta), learned_range, learned.
    Shapes: ``xt [B, ...]``, ``t [B]`` int, ``model_output`` like xt (2C channels if learned).
    """
    check_timesteps(schedule, t, xt)
    pred, var_out = diffusion.split_variance_output(model_output, variance)
    if pred.shape != xt.shape:
        raise ValueError(f"model_output: expected prediction shape {tuple(xt.shape)} (like x_t), got {tuple(pred.shape)}")
    t = jnp.asarray(t)
    a_t, s_t, l_t = _coefs(schedule, t, xt)
    a_n, s_n, l_n = _coefs(schedule, t - 1, xt)
    x0, _ = diffusion.x0_eps_from_output(pred, xt, a_t, s_t, parameterization)
    x0 = threshold_x0(x0, clip)
    return _ancestral_update(a_t, s_t, a_n, s_n, l_t, l_n, x0, xt, var_out, variance, _noise(key, xt))[0]


def ddim_step(
    schedule: Schedule,
    eps: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eta: float,
    key: jax.Array,
    clip: Any = None,
) -> jax.Array:
    """One DDIM update from t to any earlier t_prev (Song et al. 2021a, eqs. 12 and 16).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    ``t_prev = -1`` steps to the data (abar = 1). ``eps`` is the model's noise prediction;
    with ``clip`` the x_0 prediction is thresholded and eps recomputed from it.
    """
    _check_pair(schedule, t, t_prev, xt)
    if not isinstance(eta, jax.core.Tracer) and not float(eta) >= 0:
        raise ValueError(f"eta: expected a non-negative float, got {eta}")
    a_t, s_t, l_t = _coefs(schedule, t, xt)
    a_n, s_n, l_n = _coefs(schedule, t_prev, xt)
    x0 = (xt - s_t * eps) / a_t
    if clip is not None:
        x0 = threshold_x0(x0, clip)
        eps = (xt - a_t * x0) / s_t
    return _ddim_update(a_t, s_t, a_n, s_n, l_t, l_n, x0, eps, eta, _noise(key, xt))[0]


def _sde_update(process, t, t_next, x, eps, sigma_t, noise, ode: bool):
    int_f, int_g2 = (_bcast(v, x) for v in process.sde_increments(t, t_next))
    score = -eps / sigma_t
    if ode:  # dx = [f x - g^2 / 2 score] dt, backwards
        return x - int_f * x + 0.5 * int_g2 * score
    return x - int_f * x + int_g2 * score + jnp.sqrt(jnp.maximum(int_g2, 0.0)) * noise


def euler_maruyama_step(schedule: Schedule, eps: jax.Array, xt: jax.Array, t, t_prev, key, last: bool | jax.Array = False):
    """Reverse VP-SDE, one Euler–Maruyama step (Song et al. 2021b, eq. 6, VP-SDE eq. 11).

    dx = [-beta/2 x - beta score] dt + sqrt(beta) dw, integrated backwards over
    dB = int_{t_prev}^{t} beta = log(abar_prev / abar_t):
    x_prev = x + (x/2 + score) dB + sqrt(dB) z, score = -eps / sqrt(1 - abar_t).
    The last step (``last``) adds no noise, as the reference predictor does.
    """
    _, s_t, _ = _coefs(schedule, t, xt)
    last = jnp.asarray(last)
    noise = jnp.where(_bcast(last, xt) > 0, 0.0, _noise(key, xt))
    return _sde_update(schedule, t, t_prev, xt, eps, s_t, noise, ode=False)


def ode_step(schedule: Schedule, eps: jax.Array, xt: jax.Array, t, t_prev):
    """Probability-flow ODE of the VP-SDE, one Euler step (Song et al. 2021b, eq. 13):
    dx/dt = -beta/2 (x + score); backwards over dB: x_prev = x + (x + score) dB / 2."""
    _, s_t, _ = _coefs(schedule, t, xt)
    return _sde_update(schedule, t, t_prev, xt, eps, s_t, None, ode=True)


class DPMSolverState(NamedTuple):
    """Multistep history carried through the scan: the previous x_0 prediction and step size h."""

    x0_prev: jax.Array
    h_prev: jax.Array


def _dpm_solver_update(alpha_t, sigma_t, alpha_n, sigma_n, x0, xt, state: DPMSolverState, first_order):
    # e^{-h} = (sigma_n / alpha_n) / (sigma_t / alpha_t): finite (0) when stepping to the data.
    exp_neg_h = (sigma_n * alpha_t) / (alpha_n * sigma_t)
    h = -jnp.log(exp_neg_h)
    r = jnp.where(first_order, 1.0, state.h_prev / jnp.where(first_order, 1.0, h))
    D = jnp.where(first_order, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * state.x0_prev)
    x_next = (sigma_n / sigma_t) * xt - alpha_n * (exp_neg_h - 1.0) * D
    return x_next, DPMSolverState(x0_prev=x0, h_prev=h)


def dpm_solver_step(schedule: Schedule, x0: jax.Array, xt: jax.Array, t, t_prev, state: DPMSolverState, first_order):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), in the data-prediction form.

    With lambda = log(alpha / sigma) and h = lambda_prev - lambda_t:
    x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D,
    D = x0 (first order) or (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h.
    ``first_order`` is used at the first step (no history) and at the last step to the data
    (h = inf there; the update then returns D itself). Returns (x_prev, new state).
    """
    a_t, s_t, _ = _coefs(schedule, t, xt)
    a_n, s_n, _ = _coefs(schedule, t_prev, xt)
    return _dpm_solver_update(a_t, s_t, a_n, s_n, x0, xt, state, first_order)


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------


class Prediction(NamedTuple):
    """What the network says at (x, t): x_0 and eps (thresholded if ``clip``), and the raw
    variance channels of a learned-variance output (None otherwise)."""

    x0: jax.Array
    eps: jax.Array
    var_out: jax.Array | None


class Step(NamedTuple):
    """One step of the loop, as a sampler's step function sees it (all traced).

    t, t_next: process times ([], the step goes t -> t_next); alpha, sigma, log_snr at t and
    alpha_next, sigma_next, log_snr_next at t_next, broadcast to x's rank; key: this step's
    PRNG key; index: the step's position in the sequence; fresh: True when there is no usable
    history (the first step, the step after a forward jump, the step to the data); last: the
    final step of the sequence.
    """

    t: jax.Array
    t_next: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    log_snr: jax.Array
    alpha_next: jax.Array
    sigma_next: jax.Array
    log_snr_next: jax.Array
    key: jax.Array
    index: jax.Array
    fresh: jax.Array
    last: jax.Array


class StepResult(NamedTuple):
    """A step's output: the new x at t_next, the x_0 prediction used, the variance of the
    Gaussian noise the step added (0 for deterministic steps; classifier guidance's DDPM form
    shifts the mean by scale * variance * grad), and the sampler's new state."""

    x: jax.Array
    pred_x0: jax.Array
    variance: jax.Array
    state: Any


class StepInfo(NamedTuple):
    """What a hook receives after each step: ``x_prev`` at ``t`` went to the new x at ``t_next``.

    t, t_next: process times; model_t: ``process.model_time(t)`` broadcast to [B] (what the
    network was called with); pred_x0: the step's x_0 prediction (x_prev on a forward step);
    variance: of the noise the step added; key: a key for the hook (independent of the step's);
    index; forward: whether the step re-noised (t_next > t); last: the final step.
    """

    x_prev: jax.Array
    t: jax.Array
    t_next: jax.Array
    model_t: jax.Array
    pred_x0: jax.Array
    variance: jax.Array
    key: jax.Array
    index: jax.Array
    forward: jax.Array
    last: jax.Array


class SamplerOptions(NamedTuple):
    """Static options of :func:`sample`, passed to every step function (each reads what it uses)."""

    eta: float = 0.0
    variance: str = "fixed_small"
    parameterization: str = "eps"
    clip: Any = None
    inverse_iterations: int = 1
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    num_steps: int = 1


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registered sampler.

    step: ``step(process, denoise, x, step: Step, state, options: SamplerOptions) -> StepResult``,
      where ``denoise(x, time) -> Prediction`` calls the network once at process time ``time``.
    init_state: ``init_state(x) -> state`` (a pytree carried through the scan; () for none).
    direction: "reverse" (from noise to data; forward pairs in a sequence re-noise) or "forward"
      (from data to noise, e.g. DDIM inversion: every pair goes forward).
    options: names of :func:`sample` keyword options the sampler reads ("eta", "variance",
      "churn"); giving another sampler's option raises instead of being ignored.
    default_spacing: the spacing of its time sequences when the caller gives none.
    requires: names of process methods the step calls beyond alpha_sigma / log_snr (e.g.
      "sde_increments"); a process without them is a clear error before compiling.
    """

    name: str
    step: Callable
    init_state: Callable = lambda x: ()
    direction: str = "reverse"
    options: tuple = ()
    default_spacing: str = "uniform"
    requires: tuple = ()


_REGISTRY: dict[str, Sampler] = {}
SPACINGS = ("uniform", "quadratic", "logsnr", "karras")
"""The time-sequence spacings of :func:`time_sequence` (``spacing``, and a sampler's
``default_spacing``): ``uniform``, ``quadratic`` (denser near the data), ``logsnr`` (uniform in
lambda) and ``karras`` (Karras et al. 2022, eq. 5)."""


def register(
    name: str,
    step: Callable,
    *,
    init_state: Callable | None = None,
    direction: str = "reverse",
    options: tuple = (),
    default_spacing: str = "uniform",
    requires: tuple = (),
    overwrite: bool = False,
) -> Sampler:
    """Add a sampler that :func:`sample` runs as ``method=name`` in the same scan, with the same
    guidance wrappers, hooks, conditioning and sharding as the built-in ones.

    ``step(process, denoise, x, step, state, options) -> StepResult``: see :class:`Sampler`,
    :class:`Step` and :class:`StepResult`; ``denoise(x, time) -> Prediction`` evaluates the
    network (each call is one network evaluation, so a 2nd-order method may call it twice).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: a sampler {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(step):
        raise ValueError(f"step: expected a callable, got {type(step).__name__}")
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction: expected 'reverse' or 'forward', got {direction!r}")
    unknown = [o for o in options if o not in _OPTION_NAMES]
    if unknown:
        raise ValueError(f"options: expected names among {_OPTION_NAMES}, got {unknown}")
    if default_spacing not in SPACINGS:
        raise ValueError(f"default_spacing: expected one of {SPACINGS}, got {default_spacing!r}")
    sampler = Sampler(name, step, init_state or (lambda x: ()), direction, tuple(options), default_spacing, tuple(requires))
    _REGISTRY[name] = sampler
    return sampler


_OPTION_NAMES = ("eta", "variance", "churn")


def _step_ddpm(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
    p = denoise(x, step.t)
    x_new, var = _ancestral_update(step.alpha, step.sigma, step.alpha_next, step.sigma_next, step.log_snr,
                                   step.log_snr_next, p.x0, x, p.var_out, opts.variance, _noise(step.key, x))
    return StepResult(x_new, p.x0, var, state)


def _step_ddim(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
    p = denoise(x, step.t)
    x_new, var = _ddim_update(step.alpha, step.sigma, step.alpha_next, step.sigma_next, step.log_snr,
                              step.log_snr_next, p.x0, p.eps, opts.eta, _noise(step.key, x))
    return StepResult(x_new, p.x0, var, state)


def _step_sde(ode: bool):
    def step_fn(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
        p = denoise(x, step.t)
        # The last step adds no noise, as the reference predictor does.
        noise = jnp.where(step.last, 0.0, _noise(step.key, x)) if not ode else None
        x_new = _sde_update(process, step.t, step.t_next, x, p.eps, step.sigma, noise, ode)
        var = 0.0 if ode else jnp.where(step.last, 0.0, _bcast(process.sde_increments(step.t, step.t_next)[1], x))
        return StepResult(x_new, p.x0, jnp.asarray(var, x.dtype), state)

    return step_fn


def _step_dpm_solver(process, denoise, x, step: Step, state: DPMSolverState, opts: SamplerOptions) -> StepResult:
    p = denoise(x, step.t)
    x_new, state = _dpm_solver_update(step.alpha, step.sigma, step.alpha_next, step.sigma_next, p.x0, x, state, step.fresh)
    return StepResult(x_new, p.x0, jnp.zeros((), x.dtype), state)


def _dpm_init(x):
    return DPMSolverState(x0_prev=jnp.zeros_like(x), h_prev=jnp.ones((1,) * x.ndim, x.dtype))


def _step_ddim_inverse(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
    # x sits at t (the data on the first step). The reverse DDIM step from x_next lands on x when
    # x_next = alpha_n (x - sigma_t e) / alpha_t + sigma_n e with e = eps(x_next, t_next): solved
    # by fixed-point iteration from x_next = x, whose first iterate is the usual inversion
    # eps(x_t, t_next) ~ eps(x_next, t_next) (Song et al. 2021a, sec. 4.3; cf. Pan et al. 2023).
    def refine(_, x_next):
        eps = denoise(x_next, step.t_next).eps
        return step.alpha_next * (x - step.sigma * eps) / step.alpha + step.sigma_next * eps

    x_next = jax.lax.fori_loop(0, opts.inverse_iterations, refine, x)
    return StepResult(x_next, x, jnp.zeros((), x.dtype), state)


def _heun_from(denoise, x, p: Prediction, t, alpha, sigma, step: Step) -> jax.Array:
    """Heun's 2nd-order step of the probability-flow ODE in EDM's scaled variables (Karras et al.
    2022, Algorithm 1 with x / alpha and s = sigma / alpha): y = x / alpha, dy/ds = eps, so
    Euler gives x' = alpha_n x0 + sigma_n eps (DDIM's eta = 0 step) and Heun averages eps at both
    ends: x_next = alpha_n (x / alpha + (s_n - s) (eps + eps') / 2). The correction (the second
    network call) is skipped on the step to the data (sigma_n = 0) and from alpha = 0 (flow
    matching's pure-noise end, where s is infinite), which are first order."""
    x_euler = step.alpha_next * p.x0 + step.sigma_next * p.eps

    def correct(_):
        eps_next = denoise(x_euler, step.t_next).eps
        s, s_n = sigma / alpha, step.sigma_next / step.alpha_next
        return step.alpha_next * (x / alpha + (s_n - s) * 0.5 * (p.eps + eps_next))

    second_order = jnp.all(step.sigma_next > 0) & jnp.all(alpha > 0)
    return jax.lax.cond(second_order, correct, lambda _: x_euler, None)


def _step_heun(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
    p = denoise(x, step.t)
    return StepResult(_heun_from(denoise, x, p, step.t, step.alpha, step.sigma, step), p.x0, jnp.zeros((), x.dtype), state)


def _step_heun_churn(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) in scaled variables: raise the
    noise level s -> s_hat = (1 + gamma) s, gamma = min(S_churn / N, sqrt(2) - 1) inside
    [S_tmin, S_tmax], by adding N(0, (s_hat^2 - s^2) S_noise^2) to x / alpha, then a Heun step
    from s_hat to s_next."""
    s = step.sigma / step.alpha
    in_range = (s >= opts.s_tmin) & (s <= opts.s_tmax) & jnp.isfinite(s)
    gamma = jnp.where(in_range, min(opts.s_churn / opts.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    s_hat = s * (1.0 + gamma)
    t_hat = process.time_from_scaled_sigma(jnp.reshape(s_hat, ()))
    alpha_hat, sigma_hat = (_bcast(v, x) for v in process.alpha_sigma(t_hat))
    y_hat = x / step.alpha + jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)) * opts.s_noise * _noise(step.key, x)
    x_hat = jnp.where(gamma > 0, alpha_hat * y_hat, x)
    t_hat = jnp.where(jnp.reshape(gamma, ()) > 0, t_hat, step.t)
    alpha_hat, sigma_hat = jnp.where(gamma > 0, alpha_hat, step.alpha), jnp.where(gamma > 0, sigma_hat, step.sigma)
    p = denoise(x_hat, t_hat)
    variance = jnp.broadcast_to(alpha_hat**2 * (s_hat**2 - s**2) * opts.s_noise**2, x.shape)
    return StepResult(_heun_from(denoise, x_hat, p, t_hat, alpha_hat, sigma_hat, step), p.x0, variance, state)


register("ddpm", _step_ddpm, options=("variance",))
register("ddim", _step_ddim, options=("eta",))
register("euler_maruyama", _step_sde(ode=False), requires=("sde_increments",))
register("ode", _step_sde(ode=True), requires=("sde_increments",))
def _step_euler(process, denoise, x, step: Step, state, opts: SamplerOptions) -> StepResult:
    """Euler's method for the probability-flow ODE in EDM's scaled variables: x_next = alpha_n x0 +
    sigma_n eps, which is DDIM with eta = 0 (Song et al. 2021a, sec. 4.3; on flow matching's
    linear path it is x + (t_n - t) v, the rectified-flow Euler step)."""
    p = denoise(x, step.t)
    return StepResult(step.alpha_next * p.x0 + step.sigma_next * p.eps, p.x0, jnp.zeros((), x.dtype), state)


register("euler", _step_euler)
register("heun", _step_heun, default_spacing="karras")
register("heun_churn", _step_heun_churn, options=("churn",), default_spacing="karras", requires=("time_from_scaled_sigma",))
register("dpm_solver++", _step_dpm_solver, init_state=_dpm_init, default_spacing="quadratic")
register("ddim_inverse", _step_ddim_inverse, direction="forward")

METHODS = ("ddpm", "ddim", "euler_maruyama", "ode", "dpm_solver++", "euler", "heun", "heun_churn")
"""The built-in reverse samplers (:func:`register` adds more; ``jdiff.samplers.available()`` lists all).
``ddim_inverse``, the forward DDIM map, is registered too but is not a reverse sampler."""


def available() -> tuple[str, ...]:
    """Names of every registered reverse sampler (built-in and user-registered)."""
    return tuple(n for n, s in _REGISTRY.items() if s.direction == "reverse")


# ---------------------------------------------------------------------------
# Time sequences.
# ---------------------------------------------------------------------------


class SampleOutput(NamedTuple):
    """Final samples [B, ...] and, when asked for, per-step arrays [S, B, ...] (step order)."""

    samples: jax.Array
    trajectory: jax.Array | None = None
    pred_x0: jax.Array | None = None


def timestep_pairs(schedule: Schedule, steps: int, spacing: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """The (t, t_prev) pairs of a reverse pass with ``steps`` network calls: [steps] int32 each.

    Timesteps run from T-1 down to 0 and then to -1 (the data), spread ``uniform`` in t
    (DDIM's linear skip; the kept timesteps of improved DDPM's respacing), ``quadratic`` in t
    (DDIM sec. D.2, denser near the data), ``uniform in log-SNR`` (``logsnr``; DPM-Solver's
    recommendation, Lu et al. 2022 sec. 3.3) or ``karras`` (the indices nearest Karras et al.
    2022's eq. 5 in s = sigma / alpha, rho = 7). Duplicates after rounding are dropped, so a
    schedule may yield fewer than ``steps``.
    """
    return _spaced_pairs(np.asarray(schedule.betas, np.float64), steps, spacing)


def _spaced_pairs(betas: np.ndarray, steps: int, spacing: str, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    T = len(betas)
    if spacing == "karras":
        # The indices nearest to Karras et al.'s sigma spacing of s_t = sigma_t / alpha_t (EDM sec. 5).
        ac = np.cumprod(1.0 - betas)
        s_table = np.sqrt((1.0 - ac) / ac)  # increasing in t
        targets = schedules.karras_sigmas(steps, s_table[0], s_table[-1], rho)[:-1] if steps > 1 else s_table[-1:]
        ts = np.clip(np.searchsorted(s_table, targets), 0, T - 1)
        ts[0] = T - 1
    elif spacing == "uniform":
        ts = space_timesteps(T, steps)
    elif spacing == "quadratic":
        ts = np.round(np.linspace(0.0, np.sqrt(T - 1), steps) ** 2).astype(np.int64)
    elif spacing == "logsnr":
        ac = np.cumprod(1.0 - betas)
        log_snr = np.log(ac) - np.log1p(-ac)  # decreasing in t
        targets = np.linspace(log_snr[-1], log_snr[0], steps)
        ts = np.clip(np.searchsorted(-log_snr, -targets), 0, T - 1)
        ts[0], ts[-1] = T - 1, 0
    else:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    ts = np.unique(ts)[::-1]
    return ts.astype(np.int32), np.append(ts[1:], -1).astype(np.int32)


def time_sequence(process, steps: int | None = None, spacing: str = "uniform", start: Any = None, rho: float = 7.0) -> np.ndarray:
    """The default reverse time sequence of ``process``: [n + 1] times from the noise end (or
    ``start``) to the data, for n = ``steps`` sampler steps.

    Discrete schedules: :func:`timestep_pairs` on the indices 0..start (default T - 1), or
    ``karras``: the indices nearest to Karras et al.'s sigma spacing (eq. 5, ``rho``) of
    s_i = sigma_i / alpha_i, as EDM does for DDPM models (sec. 5), duplicates dropped. Continuous
    processes: ``steps`` (required) times from ``start`` (default the noise end) to the data end,
    ``uniform`` in t, ``quadratic`` in t (denser near the data), uniform in log-SNR
    (``logsnr``, by bisection on lambda(t)) or ``karras`` in s = sigma / alpha (then mapped to
    times; for an EDM process the times are those sigmas, ending at 0).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    if isinstance(process, Schedule):
        T = process.num_timesteps
        top = T - 1 if start is None else int(start)
        if not 0 <= top < T:
            raise ValueError(f"start: expected a timestep in [0, {T}), got {start!r}")
        n = top + 1 if steps is None else steps
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= top + 1:
            raise ValueError(f"steps: expected an int in [1, {top + 1}] (the timesteps up to {top}), got {steps!r}")
        # The same spacing on the sub-chain 0..top (SDEdit's t0 is its first time).
        ts, _ = _spaced_pairs(np.asarray(process.betas, np.float64)[: top + 1], int(n), spacing, rho)
        return np.append(ts, -1).astype(np.int32)
    if steps is None or isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected a positive int for a continuous process, got {steps!r}")
    lo, noise_end = process.time_range() if hasattr(process, "time_range") else (float(getattr(process, "t_min", 0.0)), 1.0)
    hi = noise_end if start is None else float(start)
    if not lo < hi <= noise_end:
        raise ValueError(f"start: expected a time in ({lo}, {noise_end}], got {start!r}")
    u = np.linspace(0.0, 1.0, int(steps) + 1)
    if spacing == "uniform":
        ts = hi - (hi - lo) * u
    elif spacing == "quadratic":
        ts = lo + (hi - lo) * (1.0 - u) ** 2
    elif spacing == "karras":
        with jax.ensure_compile_time_eval():
            alpha_sigma = lambda t: [float(v) for v in process.alpha_sigma(jnp.float32(t))]  # noqa: E731
            (a_hi, s_hi), (a_lo, s_lo) = alpha_sigma(hi), alpha_sigma(lo)
            s_max = s_hi / a_hi if a_hi > 0 else np.inf
            s_min = getattr(process, "sigma_min", None) if s_lo == 0 else s_lo / a_lo
            if not np.isfinite(s_max) or not s_min:
                raise ValueError(f"spacing: 'karras' needs a finite, positive range of sigma / alpha on ({lo}, {hi}]; "
                                 f"got [{s_min}, {s_max}] (start below the pure-noise end, or use 'uniform')")
            sig = schedules.karras_sigmas(int(steps), s_min, s_max, rho)
            if s_lo == 0:  # the EDM process: times are sigmas, the last one the data
                ts = sig
            else:
                ts = np.append(np.asarray(process.time_from_scaled_sigma(jnp.asarray(sig[:-1], jnp.float32)), np.float64), lo)
            ts[0] = hi
    else:
        with jax.ensure_compile_time_eval():
            lam = lambda t: float(process.log_snr(jnp.float32(t)))  # noqa: E731
            lam_hi, lam_lo = lam(hi), lam(lo)
            if not (np.isfinite(lam_hi) and np.isfinite(lam_lo)):
                raise ValueError(f"spacing: 'logsnr' needs a finite log-SNR at both ends, got {lam_hi} and {lam_lo} (use 'karras')")
            targets = lam_hi + (lam_lo - lam_hi) * u
            ts = []
            for target in targets:  # lambda decreases in t: bisection
                a, b = lo, hi
                for _ in range(40):
                    m = 0.5 * (a + b)
                    a, b = (m, b) if lam(m) > target else (a, m)
                ts.append(0.5 * (a + b))
            ts = np.asarray(ts)
            ts[0], ts[-1] = hi, lo
    return np.asarray(ts).astype(np.float32)


# ---------------------------------------------------------------------------
# Model functions as data: arrays are traced, the rest is the compiled program's identity.
# ---------------------------------------------------------------------------


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or (isinstance(leaf, (float, int, complex)) and not isinstance(leaf, bool))


class _ById:
    """An unhashable static leaf, compared by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.obj is self.obj


class _Closure(NamedTuple):
    """A plain Python closure, taken apart: its code and the static parts of its captured cells.
    Arrays the closure captures (params) become traced inputs, so two closures made by the same
    code over different params share one compiled program, and no cache keeps the params alive."""

    code: types.CodeType
    globals: _ById
    name: str
    defaults: Any
    cells: Any  # the flattened static structure of the cell contents


class _Kept(_ById):
    """A captured object with no arrays in it (a list a callback appends to, a config): passed
    through as the very object, so side effects on it stay visible to the caller."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, _Kept) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _has_arrays(obj) -> bool:
    return any(_is_array(leaf) or (isinstance(leaf, types.FunctionType) and leaf.__closure__)
               for leaf in jax.tree_util.tree_leaves(obj))


def _static_leaf(leaf, dynamic: list, depth: int):
    if isinstance(leaf, types.FunctionType) and leaf.__closure__ and depth < 8:
        try:
            contents = [c.cell_contents for c in leaf.__closure__]
        except ValueError:  # an empty cell (a variable not yet bound): keep the function as it is
            return _ById(leaf)
        cells = [c if _has_arrays(c) else _Kept(c) for c in contents]
        return _Closure(leaf.__code__, _ById(leaf.__globals__), leaf.__name__, _hashable(leaf.__defaults__),
                        _flatten(cells, dynamic, depth + 1))
    return _hashable(leaf)


def _hashable(obj):
    try:
        hash(obj)
    except TypeError:
        return _ById(obj)
    return obj


def _flatten(tree, dynamic: list, depth: int = 0):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    static = []
    for leaf in leaves:
        if _is_array(leaf):
            dynamic.append(leaf)
            static.append(None)
        else:
            static.append(_static_leaf(leaf, dynamic, depth))
    return treedef, tuple(static)


def _unflatten(static, dynamic_iter):
    treedef, leaves = static
    out = []
    for s in leaves:
        if s is None:
            out.append(next(dynamic_iter))
        elif isinstance(s, _Closure):
            cells = tuple(types.CellType(v) for v in _unflatten(s.cells, dynamic_iter))
            defaults = s.defaults.obj if isinstance(s.defaults, _ById) else s.defaults
            out.append(types.FunctionType(s.code, s.globals.obj, s.name, defaults, cells))
        elif isinstance(s, _ById):  # and _Kept
            out.append(s.obj)
        else:
            out.append(s)
    return jax.tree_util.tree_unflatten(treedef, out)


def _split_model_fn(model_fn):
    dynamic: list = []
    static = _flatten(model_fn, dynamic)
    return dynamic, static


def _merge_model_fn(dynamic, static):
    return _unflatten(static, iter(dynamic))


@functools.lru_cache(maxsize=256)
def _model_output_shape(static, avals, shape, cond_avals):
    """Output shape of the model for these abstract inputs, cached: a model_fn rebuilt for every
    call (new params, same network) is traced once. ``static`` holds no arrays (see _Closure)."""
    dyn = [jax.ShapeDtypeStruct(*a) for a in avals]
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((shape[0],), jnp.float32 if cond_avals[0] == "float" else jnp.int32)
    cond_tree = cond_avals[1]
    try:
        if cond_tree is None:
            out = jax.eval_shape(lambda d, x_, t_: _merge_model_fn(d, static)(x_, t_), dyn, x, t)
        else:
            treedef, cavals = cond_tree
            cond = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(*a) for a in cavals])
            out = jax.eval_shape(lambda d, x_, t_, c: _merge_model_fn(d, static)(x_, t_, c), dyn, x, t, cond)
    except (TypeError, ValueError) as e:
        return e
    return tuple(out.shape) if hasattr(out, "shape") else type(out).__name__


def _aval(a):
    return (tuple(np.shape(a)), jnp.result_type(a))


def _check_model_output(dynamic, static, shape, variance, time_kind, cond) -> None:
    """Abstractly evaluate the model so a shape mismatch is reported before compiling."""
    cond_avals = None
    if cond is not None:
        cleaves, ctree = jax.tree_util.tree_flatten(cond)
        cond_avals = (ctree, tuple(_aval(c) for c in cleaves))
    out = _model_output_shape(static, tuple(_aval(d) for d in dynamic), shape, (time_kind, cond_avals))
    want = shape[:-1] + (2 * shape[-1],) if variance in ("learned_range", "learned") else shape
    call = f"x_t of shape {shape} and t of shape ({shape[0]},)" + ("" if cond is None else " and cond")
    if isinstance(out, Exception):
        raise ValueError(f"model_fn: calling it with {call} failed: {out}") from out
    if out != want:
        raise ValueError(f"model_fn: expected an output of shape {want} for x_t of shape {shape} (variance={variance!r}), got {out}")


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def _check_clip(clip) -> None:
    """``clip`` as :func:`jdiff.diffusion.threshold_x0` reads it, checked before tracing."""
    if clip is None or isinstance(clip, (bool, np.bool_)) or (isinstance(clip, str) and clip == "dynamic"):
        return
    if not isinstance(clip, (int, float, np.integer, np.floating)) or not (np.isfinite(clip) and clip > 0):
        raise ValueError(f"clip: expected None, True, a positive float or 'dynamic', got {clip!r}")


def _validate(method, process, steps, eta, variance, parameterization, spacing, timesteps, clip=None):
    if method not in _REGISTRY:
        raise ValueError(f"method: expected one of {tuple(_REGISTRY)} (jdiff.samplers.register adds more), got {method!r}")
    sampler = _REGISTRY[method]
    if steps is not None and timesteps is not None:
        raise ValueError("steps, timesteps: expected at most one of them (timesteps already fixes the number of steps)")
    if isinstance(process, Schedule):
        T = process.num_timesteps
        if steps is not None and (not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T):
            raise ValueError(f"steps: expected an int in [1, {T}] (the schedule's number of timesteps), got {steps!r}")
    elif not hasattr(process, "alpha_sigma"):
        raise ValueError(f"process: expected a jdiff.schedules.Schedule or a process with alpha_sigma(), got {type(process).__name__}")
    if eta is not None:
        if "eta" not in sampler.options:
            raise ValueError(f"eta: method {method!r} has no eta (only samplers with an eta option, e.g. 'ddim'), got eta={eta!r}")
        if isinstance(eta, jax.core.Tracer) or not (isinstance(eta, (int, float)) and np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta: expected a finite non-negative Python float, got {eta!r}")
    if parameterization not in diffusion.PARAMETERIZATIONS:
        raise ValueError(f"parameterization: expected one of {diffusion.PARAMETERIZATIONS}, got {parameterization!r}")
    if parameterization == "flow" and not getattr(process, "linear_path", False):
        raise ValueError(f"parameterization: 'flow' (v = eps - x0) is the velocity of the linear path "
                         f"(jdiff.schedules.flow()), got it with a {type(process).__name__}")
    if variance not in diffusion.VARIANCE_TYPES:
        raise ValueError(f"variance: expected one of {diffusion.VARIANCE_TYPES}, got {variance!r}")
    if variance == "fixed_large" and "variance" not in sampler.options:
        raise ValueError(f"variance: 'fixed_large' applies only to ancestral sampling (method='ddpm'), got method={method!r}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    if spacing is not None and timesteps is not None:
        raise ValueError("spacing: expected None when explicit timesteps are given")
    _check_clip(clip)
    missing = [r for r in sampler.requires if not hasattr(process, r)]
    if missing:
        raise ValueError(f"method: {method!r} needs a process with {missing}, which {type(process).__name__} lacks "
                         f"(e.g. the reverse SDE is defined for VP and EDM processes, not for flow matching)")
    return sampler


def _check_churn(sampler: Sampler, method: str, s_churn, s_tmin, s_tmax, s_noise) -> dict:
    given = {k: v for k, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)) if v is not None}
    if given and "churn" not in sampler.options:
        raise ValueError(f"{', '.join(given)}: method {method!r} has no churn (EDM's stochastic sampler is 'heun_churn'), got {given}")
    for k, v in given.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or np.isnan(v) or v < 0 or (k != "s_tmax" and not np.isfinite(v)):
            raise ValueError(f"{k}: expected a non-negative float, got {v!r}")
    if given.get("s_tmin", 0.0) > given.get("s_tmax", float("inf")):
        raise ValueError(f"s_tmin, s_tmax: expected s_tmin <= s_tmax, got {given['s_tmin']}, {given['s_tmax']}")
    return {k: float(v) for k, v in given.items()}


def sample(
    model_fn: ModelFn,
    schedule,
    shape_or_xT: tuple[int, ...] | jax.Array,
    key: jax.Array,
    *,
    method: str = "ddpm",
    steps: int | None = None,
    timesteps: Any = None,
    cond: Any = None,
    hook: Callable | None = None,
    eta: float | None = None,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip: Any = None,
    spacing: str | None = None,
    s_churn: float | None = None,
    s_tmin: float | None = None,
    s_tmax: float | None = None,
    s_noise: float | None = None,
    return_trajectory: bool = False,
    return_pred_x0: bool = False,
) -> jax.Array | SampleOutput:
    """Draw samples with any registered reverse process, as one ``lax.scan`` inside one ``jit``.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> output`` (or ``(x_t, t, cond)`` when ``cond`` is given)
        in ``parameterization`` (``[B, ..., 2C]`` with a learned variance); ``t`` is the time the
        network was trained with (``process.model_time``). Pass params as data, e.g.
        ``jax.tree_util.Partial(apply_fn, params)``; a plain closure works too: the arrays it
        captures are taken out and traced, so closures over new params reuse the compiled loop.
      schedule: the process: a :class:`~jdiff.schedules.Schedule` (the one the model was trained
        with) or a continuous process such as :func:`jdiff.schedules.continuous_vp`.
      shape_or_xT: the sample shape ``(B, ...)`` (x ~ N(0, I) at the first time, drawn from
        ``key``) or the starting x itself, which sits at ``timesteps[0]`` (e.g. x_t0 for SDEdit).
      key: a PRNG key; with ``k0, k1 = jax.random.split(key)``, x_T is drawn from k0 and step i draws
        its noise from ``fold_in(k1, i)`` (what tests/test_convert.py feeds diffusers for parity).
      method: a registered sampler (:data:`METHODS` and any added with :func:`register`): ``ddpm``
        (ancestral on the chain the times give: respaced when ``steps`` < T, improved DDPM
        sec. 4), ``ddim``, ``euler_maruyama``, ``ode``, ``dpm_solver++`` (2M; 10-25 steps),
        ``heun`` (EDM's 2nd-order ODE solver, 2 network calls per step but the last),
        ``heun_churn`` (EDM's stochastic sampler, with ``s_churn``, ``s_tmin``, ``s_tmax``,
        ``s_noise`` as in Karras et al. 2022, Algorithm 2; thresholds in sigma / alpha).
      steps: number of network calls of the default sequence (default: every timestep).
      timesteps: an explicit time sequence instead of ``steps``: ``[n + 1]`` process times
        (schedule indices with -1 = the data, or floats of a continuous process), visited in
        order; a backward pair is a sampler step, a forward pair re-noises with q(x_t' | x_t).
      cond: conditioning passed to ``model_fn`` as its third argument (a dict of arrays, e.g.
        ``{"label": y}``), traced: new values reuse the compiled loop.
      hook: ``hook(x, info: StepInfo) -> x`` run after every step inside the scan (a pytree such
        as a ``jax.tree_util.Partial``, so its arrays are traced).
      eta: DDIM's noise scale (0 deterministic, 1 DDPM-like); only for samplers with an eta.
      parameterization: what the network predicts: ``eps``, ``x0``, ``v`` or ``score``.
      variance: ``fixed_small``, ``fixed_large``, ``learned_range`` or ``learned`` (ancestral
        sampling uses it; other methods ignore a learned half of the output).
      clip: threshold for the predicted x_0 (None, True, a bound, or "dynamic").
      spacing: where the default sequence's times fall: ``uniform``, ``quadratic``, ``logsnr`` or
        ``karras`` (see :func:`time_sequence`); default: the process's own (``karras`` for EDM,
        ``uniform`` for flow matching), else the sampler's (``quadratic`` for ``dpm_solver++``,
        ``karras`` for Heun, ``uniform`` otherwise).
      return_trajectory / return_pred_x0: also return x after every step / the x_0 predictions.

    Placement: arrays the caller placed (committed to a device, or sharded) decide where the loop
    runs. Otherwise, in a process with several CPU devices (:func:`jdiff.parallel.use_cpu_cores`),
    the batch is split over them (:func:`jdiff.parallel.auto_batch_sharding`; same samples to
    float rounding); else it runs on the default device.

    Returns:
      The samples [B, ...], or a :class:`SampleOutput` when a per-step output is requested.
    """
    _check_key(key)
    plan, x_T = _prepare(model_fn, schedule, shape_or_xT, method=method, steps=steps, timesteps=timesteps, cond=cond,
                         hook=hook, eta=eta, parameterization=parameterization, variance=variance, clip=clip,
                         spacing=spacing, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                         return_trajectory=return_trajectory, return_pred_x0=return_pred_x0)
    return _execute(plan, key, x_T)


def _prepare(model_fn, schedule, shape_or_xT, *, method="ddpm", steps=None, timesteps=None, cond=None, hook=None, eta=None,
             parameterization="eps", variance="fixed_small", clip=None, spacing=None, s_churn=None, s_tmin=None,
             s_tmax=None, s_noise=None, return_trajectory=False, return_pred_x0=False) -> tuple[_Plan, jax.Array | None]:
    """:func:`sample`'s arguments checked (NumPy and abstract evaluation only, nothing compiled) and
    packed: ``(plan, x_T)``. Callers that compute the starting x themselves (SDEdit's noising, a
    sharded draw) pass the shape here, so every check runs before their own first computation,
    then ``_execute(plan, key, x)``."""
    sampler = _validate(method, schedule, steps, eta, variance, parameterization, spacing, timesteps, clip)
    if sampler.direction != "reverse":
        raise ValueError(f"method: {method!r} runs forwards (data -> noise); use ddim_invert or a reverse sampler")
    churn = _check_churn(sampler, method, s_churn, s_tmin, s_tmax, s_noise)
    if timesteps is None:
        times = time_sequence(schedule, steps, spacing or getattr(schedule, "default_spacing", None) or sampler.default_spacing)
    else:
        times = schedule.check_times(np.asarray(timesteps), "timesteps")
    opts = SamplerOptions(eta=0.0 if eta is None else float(eta), variance=variance, parameterization=parameterization, clip=clip,
                          num_steps=len(times) - 1, **churn)
    return _plan(model_fn, schedule, shape_or_xT, sampler, times, opts, cond, hook, return_trajectory, return_pred_x0)


def ddim_invert(
    model_fn: ModelFn,
    schedule,
    x0: jax.Array,
    *,
    steps: int | None = None,
    timesteps: Any = None,
    cond: Any = None,
    parameterization: str = "eps",
    spacing: str = "uniform",
    iterations: int = 1,
) -> jax.Array:
    """Map data to noise along the deterministic DDIM path (Song et al. 2021a, sec. 4.3, eq. 14).

    Runs the eta = 0 update forwards over the times that ``sample(..., method="ddim",
    steps=steps, spacing=spacing)`` visits backwards (or ``timesteps`` reversed), evaluating
    the network at the target time, so ``sample`` of the result reconstructs ``x0`` up to the
    discretization error. ``iterations`` network calls per step solve the inversion as a fixed
    point (1 is the usual approximation eps(x_t, t_next) ~ eps(x_next, t_next); a few more make
    the round trip exact to float precision where the ODE is not expanding; cf. Pan et al.
    2023, AIDI). Returns x at the noisy end, with the shape of ``x0``.
    """
    _validate("ddim_inverse", schedule, steps, None, "fixed_small", parameterization, None if timesteps is not None else spacing, timesteps)
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations: expected a positive int, got {iterations!r}")
    if timesteps is None:
        times = time_sequence(schedule, steps, spacing)
    else:
        times = schedule.check_times(np.asarray(timesteps), "timesteps")
    opts = SamplerOptions(parameterization=parameterization, inverse_iterations=int(iterations))
    plan, x_T = _plan(model_fn, schedule, x0, _REGISTRY["ddim_inverse"], times[::-1].copy(), opts, cond, None, False, False)
    return _execute(plan, jax.random.key(0), x_T)


class _LoopConfig(NamedTuple):
    sampler: Sampler
    options: SamplerOptions
    return_trajectory: bool
    return_pred_x0: bool
    shape: tuple[int, ...]
    has_forward_jumps: bool
    has_cond: bool
    prior_std: float = 1.0
    sharding: Any = None  # of x and the samples (jdiff.parallel.auto_batch_sharding), or None


class _Plan(NamedTuple):
    """The checked, packed arguments of one sampling loop (everything but the key and x_T)."""

    dynamic: list
    static: Any
    hook_dyn: list
    hook_static: Any
    process: Any
    xs: tuple
    cond: Any
    config: _LoopConfig


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_start(shape_or_xT) -> tuple[tuple[int, ...], jax.Array | None]:
    """(shape, x_T or None) of ``shape_or_xT``: a shape of positive ints, or a float array."""
    if isinstance(shape_or_xT, (tuple, list)):
        if not shape_or_xT or not all(_is_int(s) and s >= 1 for s in shape_or_xT):
            raise ValueError(f"shape_or_xT: expected a shape (B, ...) with B >= 1 or an array, got {tuple(shape_or_xT)!r}")
        return tuple(int(s) for s in shape_or_xT), None
    dtype = shape_or_xT.dtype if hasattr(shape_or_xT, "dtype") else np.asarray(shape_or_xT).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"shape_or_xT: expected a shape (B, ...) or a float array x [B, ...], got dtype {dtype}")
    x_T = shape_or_xT if isinstance(shape_or_xT, jax.Array) else jax.device_put(np.asarray(shape_or_xT))
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"shape_or_xT: expected a shape (B, ...) with B >= 1 or an array, got {tuple(x_T.shape)}")
    return tuple(x_T.shape), x_T


def _check_cond_batch(cond, batch: int) -> None:
    """Every array of ``cond`` is one entry per example (leading dimension B) or a scalar."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(cond)[0]:
        shape = tuple(np.shape(leaf))
        if shape and shape[0] != batch:
            raise ValueError(f"cond{jax.tree_util.keystr(path)}: expected a leading batch dimension of {batch} (like x_t) "
                             f"or a scalar, got shape {shape}")


def _check_key(key) -> None:
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and np.ndim(key) == 0:
        return
    if dtype == np.uint32 and np.ndim(key) == 1:  # a raw key from jax.random.PRNGKey
        return
    shown = f"dtype {dtype} shape {tuple(np.shape(key))}" if dtype is not None else repr(key)
    raise ValueError(f"key: expected one PRNG key (jax.random.key(seed)), got {shown}")


def _plan(model_fn, process, shape_or_xT, sampler: Sampler, times: np.ndarray, opts: SamplerOptions, cond, hook,
          return_trajectory, return_pred_x0) -> tuple[_Plan, jax.Array | None]:
    shape, x_T = _check_start(shape_or_xT)
    if hook is not None and not callable(hook):
        raise ValueError(f"hook: expected a callable hook(x, info) -> x, got {type(hook).__name__}")
    if cond is not None:
        _check_cond_batch(cond, shape[0])
    times = np.asarray(times)
    t_from, t_to = times[:-1], times[1:]
    if np.any(t_from == t_to):
        raise ValueError(f"timesteps: expected no repeated consecutive times, got {times.tolist()}")
    forward = t_to > t_from
    if sampler.direction == "forward":
        if not np.all(forward):
            raise ValueError(f"timesteps: method {sampler.name!r} runs forwards and needs increasing times, got {times.tolist()}")
        forward = np.zeros_like(forward)  # its own steps, not re-noising jumps
    elif np.any(process.is_data(t_from)):
        raise ValueError(f"timesteps: a step cannot start at the data (only the last time may be the data), got {times.tolist()}")
    n = len(t_from)
    fresh = np.zeros(n, bool)
    fresh[0] = True
    fresh[1:] |= forward[:-1]  # after a re-noising jump the history no longer applies
    fresh |= process.is_data(t_to)
    last = np.arange(n) == n - 1

    time_kind = "float" if np.issubdtype(times.dtype, np.floating) else "int"
    dynamic, static = _split_model_fn(model_fn)
    _check_model_output(dynamic, static, shape, opts.variance, time_kind, cond)
    hook_dyn, hook_static = _split_model_fn(hook)
    prior_std = float(process.prior_std(times[0])) if hasattr(process, "prior_std") else 1.0
    config = _LoopConfig(sampler, opts, bool(return_trajectory), bool(return_pred_x0), shape, bool(np.any(forward)), cond is not None,
                         prior_std)
    # device_put, not jnp.asarray (which stages NumPy arrays through a small compiled program):
    # nothing may compile before the loop is traced, which can still raise.
    xs = tuple(jax.device_put(a) for a in (np.arange(n, dtype=np.int32), t_from, t_to, fresh, forward, last))
    return _Plan(dynamic, static, hook_dyn, hook_static, process, xs, cond, config), x_T


def _execute(plan: _Plan, key: jax.Array, x_T: jax.Array | None = None) -> jax.Array | SampleOutput:
    """Run a checked plan from ``x_T`` (None: drawn from ``key``): the samples, or a
    :class:`SampleOutput` when the plan asks for per-step outputs."""
    _check_key(key)
    if x_T is not None and tuple(np.shape(x_T)) != plan.config.shape:
        raise ValueError(f"x_T: expected shape {plan.config.shape} (the planned shape), got {tuple(np.shape(x_T))}")
    p = plan
    from jdiff import parallel  # jdiff.parallel does not import the samplers; keep it that way

    sharding = parallel.auto_batch_sharding(p.config.shape[0], p.dynamic, p.hook_dyn, p.cond, p.xs, x_T)
    if sharding is not None:
        p = p._replace(config=p.config._replace(sharding=sharding))
    out = _sample_jit(p.dynamic, p.static, p.hook_dyn, p.hook_static, p.process, x_T, key, p.xs, p.cond, p.config)
    return out if (p.config.return_trajectory or p.config.return_pred_x0) else out.samples


def _full_variance(res: StepResult, x: jax.Array) -> StepResult:
    """The step's noise variance broadcast to x's shape (one form for every branch and hook)."""
    return res._replace(variance=jnp.broadcast_to(jnp.asarray(res.variance, x.dtype), x.shape))


def _sample_impl(dynamic, static, hook_dyn, hook_static, process, x_T, key, xs, cond, config: _LoopConfig) -> SampleOutput:
    model_fn = _merge_model_fn(dynamic, static)
    hook = _merge_model_fn(hook_dyn, hook_static)
    c = config
    opts = c.options
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, c.shape, jnp.float32) * c.prior_std if x_T is None else x_T
    if c.sharding is not None:  # split the batch over the CPU devices (jdiff.parallel.use_cpu_cores)
        x = jax.lax.with_sharding_constraint(x, c.sharding)
    B = c.shape[0]

    def denoise(x_, time) -> Prediction:
        t_model = jnp.broadcast_to(process.model_time(time), (B,))
        out = model_fn(x_, t_model, cond) if c.has_cond else model_fn(x_, t_model)
        pred, var_out = diffusion.split_variance_output(out, opts.variance)
        alpha, sigma = (_bcast(v, x_) for v in process.alpha_sigma(time))
        x0, eps = diffusion.x0_eps_from_output(pred, x_, alpha, sigma, opts.parameterization)
        if opts.clip is not None:
            x0 = threshold_x0(x0, opts.clip)
            eps = (x_ - alpha * x0) / sigma
        return Prediction(x0, eps, var_out)

    def coefs(time):
        alpha, sigma = process.alpha_sigma(time)
        return _bcast(alpha, x), _bcast(sigma, x), _bcast(process.log_snr(time), x)

    def sampler_step(x, state, step: Step):
        return _full_variance(c.sampler.step(process, denoise, x, step, state, opts), x)

    def renoise(x, state, step: Step):
        # q(x_t' | x_t) for t' > t: x_t' = (alpha'/alpha) x_t + sqrt(sigma'^2 - (alpha'/alpha)^2 sigma^2) z.
        ratio = step.alpha_next / step.alpha
        var = step.sigma_next**2 * _posterior_fraction(step.log_snr_next, step.log_snr)
        x_new = ratio * x + jnp.sqrt(jnp.maximum(var, 0.0)) * _noise(step.key, x)
        return _full_variance(StepResult(x_new, x, var, state), x)

    def body(carry, inputs):
        x, state = carry
        i, t, t_next, fresh, forward, last = inputs
        a, s, lam = coefs(t)
        a_n, s_n, lam_n = coefs(t_next)
        step_key = jax.random.fold_in(loop_key, i)
        step = Step(t, t_next, a, s, lam, a_n, s_n, lam_n, step_key, i, fresh, last)
        if c.has_forward_jumps:
            res = jax.lax.cond(forward, renoise, sampler_step, x, state, step)
        else:
            res = sampler_step(x, state, step)
        variance = res.variance
        x_new = res.x
        if hook is not None:
            info = StepInfo(x, t, t_next, jnp.broadcast_to(process.model_time(t), (B,)), res.pred_x0, variance,
                            jax.random.fold_in(step_key, 1 << 20), i, forward, last)
            x_new = hook(x_new, info)
        ys = (x_new if c.return_trajectory else None, res.pred_x0 if c.return_pred_x0 else None)
        return (x_new, res.state), ys

    state = c.sampler.init_state(x)
    (x, _), (traj, x0s) = jax.lax.scan(body, (x, state), xs)
    return SampleOutput(samples=x, trajectory=traj, pred_x0=x0s)


_sample_jit = jax.jit(_sample_impl, static_argnums=(1, 3, 9))
