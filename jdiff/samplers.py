"""Reverse processes: one pure step per sampler and one ``lax.scan`` loop that runs any of them.

Every sampler takes ``model_fn(x_t, t) -> output`` where ``t`` is the trained model's timestep
([B] int32) and ``output`` is in the ``parameterization`` the model was trained with. The loop
calls the network exactly once per step; all time bookkeeping is precomputed in NumPy.

Step functions (pure; shapes ``x_t: [B, ...]``, ``t: [B]`` int32):
  ``ddpm_step``   ancestral sampling (Ho et al. 2020, Algorithm 2; improved DDPM variances),
  ``ddim_step``   DDIM with any eta between any two timesteps (Song et al. 2021a, eq. 12),
  ``euler_maruyama_step`` / ``ode_step`` the VP-SDE's reverse SDE and probability-flow ODE
                  (Song et al. 2021b, eqs. 6 and 13) discretized on the schedule,
  ``dpm_solver_step``  DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep history in the carry.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.diffusion import check_timesteps, extract, threshold_x0, to_x0_eps
from jdiff.schedules import Schedule, respace, space_timesteps

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
    "timestep_pairs",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Per-step coefficients. ``t_prev = -1`` stands for the clean data (abar = 1).
# ---------------------------------------------------------------------------


def _padded(coef: jax.Array, at_data: float) -> jax.Array:
    return jnp.concatenate([coef, jnp.full((1,), at_data, coef.dtype)])


def _alpha_sigma(schedule: Schedule, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) broadcast to x, from the float64-derived tables
    (1 - abar in float32 would cancel near t = 0), with (1, 0) at t = -1."""
    idx = jnp.where(jnp.asarray(t) < 0, schedule.num_timesteps, t)
    return (extract(_padded(schedule.sqrt_alphas_cumprod, 1.0), idx, x),
            extract(_padded(schedule.sqrt_one_minus_alphas_cumprod, 0.0), idx, x))


def _check_pair(schedule: Schedule, t, t_prev, x) -> None:
    check_timesteps(schedule, t, x)
    t_prev_arr = jnp.asarray(t_prev)
    if not isinstance(t_prev_arr, jax.core.Tracer):
        tp, tt = np.asarray(t_prev_arr), np.asarray(jnp.asarray(t))
        if tp.size and (tp.min() < -1 or tp.max() >= schedule.num_timesteps):
            raise ValueError(f"t_prev: expected timesteps in [-1, {schedule.num_timesteps}) (-1 = clean data), got {tp}")
        if np.any(np.broadcast_to(tp, np.broadcast_shapes(tp.shape, tt.shape)) >= tt):
            raise ValueError(f"t_prev: expected t_prev < t (a reverse step), got t={tt}, t_prev={tp}")


def _noise(key: jax.Array, x: jax.Array) -> jax.Array:
    return jax.random.normal(key, x.shape, x.dtype)


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
    """
    pmv = diffusion.p_mean_variance(schedule, model_output, xt, t, parameterization, variance, clip=clip)
    return _ddpm_update(pmv, t, _noise(key, xt))


def _ddpm_update(pmv: diffusion.MeanVariance, t, noise):
    nonzero = (jnp.asarray(t) > 0).astype(noise.dtype)
    nonzero = nonzero.reshape(nonzero.shape + (1,) * (noise.ndim - nonzero.ndim))
    return pmv.mean + nonzero * jnp.exp(0.5 * pmv.log_variance) * noise


def _ddim_update(schedule, x0, eps, xt, t, t_prev, eta, noise):
    alpha_p, sigma_p = _alpha_sigma(schedule, t_prev, xt)
    alpha_t, sigma_t = _alpha_sigma(schedule, t, xt)
    # 1 - abar_t / abar_prev, without cancellation for short steps.
    one_minus_ratio = -jnp.expm1(2.0 * (jnp.log(alpha_t) - jnp.log(alpha_p)))
    sigma = eta * (sigma_p / sigma_t) * jnp.sqrt(one_minus_ratio)
    dir_xt = jnp.sqrt(jnp.maximum(sigma_p**2 - sigma**2, 0.0)) * eps
    return alpha_p * x0 + dir_xt + sigma * noise


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
    x0 = diffusion.predict_x0(schedule, xt, t, eps)
    if clip is not None:
        x0 = threshold_x0(x0, clip)
        eps = diffusion.predict_eps(schedule, xt, t, x0)
    return _ddim_update(schedule, x0, eps, xt, t, t_prev, eta, _noise(key, xt))


def _vp_increment(schedule, t, t_prev, x):
    """Integrated beta over (t_prev, t]: int beta(s) ds = log(abar_prev / abar_t)."""
    return 2.0 * (jnp.log(_alpha_sigma(schedule, t_prev, x)[0]) - jnp.log(_alpha_sigma(schedule, t, x)[0]))


def euler_maruyama_step(schedule: Schedule, eps: jax.Array, xt: jax.Array, t, t_prev, key, last: bool | jax.Array = False):
    """Reverse VP-SDE, one Euler–Maruyama step (Song et al. 2021b, eq. 6, VP-SDE eq. 11).

    dx = [-beta/2 x - beta score] dt + sqrt(beta) dw, integrated backwards over
    dB = int_{t_prev}^{t} beta = log(abar_prev / abar_t):
    x_prev = x + (x/2 + score) dB + sqrt(dB) z, score = -eps / sqrt(1 - abar_t).
    The last step (``last``) adds no noise, as the reference predictor does.
    """
    dB = _vp_increment(schedule, t, t_prev, xt)
    score = -eps / _alpha_sigma(schedule, t, xt)[1]
    last = jnp.asarray(last)
    noise_scale = jnp.where(last.reshape(last.shape + (1,) * (xt.ndim - last.ndim)), 0.0, jnp.sqrt(dB))
    return xt + (0.5 * xt + score) * dB + noise_scale * _noise(key, xt)


def ode_step(schedule: Schedule, eps: jax.Array, xt: jax.Array, t, t_prev):
    """Probability-flow ODE of the VP-SDE, one Euler step (Song et al. 2021b, eq. 13):
    dx/dt = -beta/2 (x + score); backwards over dB: x_prev = x + (x + score) dB / 2."""
    dB = _vp_increment(schedule, t, t_prev, xt)
    score = -eps / _alpha_sigma(schedule, t, xt)[1]
    return xt + 0.5 * (xt + score) * dB


class DPMSolverState(NamedTuple):
    """Multistep history carried through the scan: the previous x_0 prediction and step size h."""

    x0_prev: jax.Array
    h_prev: jax.Array


def dpm_solver_step(schedule: Schedule, x0: jax.Array, xt: jax.Array, t, t_prev, state: DPMSolverState, first_order):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), in the data-prediction form.

    With lambda = log(alpha / sigma) and h = lambda_prev - lambda_t:
    x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D,
    D = x0 (first order) or (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h.
    ``first_order`` is used at the first step (no history) and at the last step to the data
    (h = inf there; the update then returns D itself). Returns (x_prev, new state).
    """
    alpha_t, sigma_t = _alpha_sigma(schedule, t, xt)
    alpha_p, sigma_p = _alpha_sigma(schedule, t_prev, xt)
    # e^{-h} = (sigma_p / alpha_p) / (sigma_t / alpha_t): finite (0) when stepping to the data.
    exp_neg_h = (sigma_p * alpha_t) / (alpha_p * sigma_t)
    h = -jnp.log(exp_neg_h)
    r = jnp.where(first_order, 1.0, state.h_prev / jnp.where(first_order, 1.0, h))
    D = jnp.where(first_order, x0, (1.0 + 0.5 / r) * x0 - (0.5 / r) * state.x0_prev)
    x_prev = (sigma_p / sigma_t) * xt - alpha_p * (exp_neg_h - 1.0) * D
    return x_prev, DPMSolverState(x0_prev=x0, h_prev=h)


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------

METHODS = ("ddpm", "ddim", "euler_maruyama", "ode", "dpm_solver++")


class SampleOutput(NamedTuple):
    """Final samples [B, ...] and, when asked for, per-step arrays [S, B, ...] (step order)."""

    samples: jax.Array
    trajectory: jax.Array | None = None
    pred_x0: jax.Array | None = None


SPACINGS = ("uniform", "quadratic", "logsnr")


def timestep_pairs(schedule: Schedule, steps: int, spacing: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """The (t, t_prev) pairs of a reverse pass with ``steps`` network calls: [steps] int32 each.

    Timesteps run from T-1 down to 0 and then to -1 (the data), spread ``uniform`` in t
    (DDIM's linear skip), ``quadratic`` in t (DDIM sec. D.2, denser near the data) or
    ``uniform in log-SNR`` (``logsnr``; DPM-Solver's recommendation, Lu et al. 2022 sec. 3.3).
    Duplicates after rounding are dropped, so a schedule may yield fewer than ``steps``.
    """
    T = schedule.num_timesteps
    if spacing == "uniform":
        ts = space_timesteps(T, steps)
    elif spacing == "quadratic":
        ts = np.round(np.linspace(0.0, np.sqrt(T - 1), steps) ** 2).astype(np.int64)
    elif spacing == "logsnr":
        ac = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
        log_snr = np.log(ac) - np.log1p(-ac)  # decreasing in t
        targets = np.linspace(log_snr[-1], log_snr[0], steps)
        ts = np.clip(np.searchsorted(-log_snr, -targets), 0, T - 1)
        ts[0], ts[-1] = T - 1, 0
    else:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    ts = np.unique(ts)[::-1]
    return ts.astype(np.int32), np.append(ts[1:], -1).astype(np.int32)


def _validate(method, schedule, steps, eta, variance, parameterization, spacing=None):
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    T = schedule.num_timesteps
    if steps is not None and (not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T):
        raise ValueError(f"steps: expected an int in [1, {T}] (the schedule's number of timesteps), got {steps!r}")
    if isinstance(eta, jax.core.Tracer) or not (isinstance(eta, (int, float)) and np.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite non-negative Python float, got {eta!r}")
    if parameterization not in diffusion.PARAMETERIZATIONS:
        raise ValueError(f"parameterization: expected one of {diffusion.PARAMETERIZATIONS}, got {parameterization!r}")
    if variance not in diffusion.VARIANCE_TYPES:
        raise ValueError(f"variance: expected one of {diffusion.VARIANCE_TYPES}, got {variance!r}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    if variance == "fixed_large" and method != "ddpm":
        raise ValueError(f"variance: 'fixed_large' applies only to method='ddpm', got method={method!r}")


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    shape_or_xT: tuple[int, ...] | jax.Array,
    key: jax.Array,
    *,
    method: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip: Any = None,
    spacing: str | None = None,
    return_trajectory: bool = False,
    return_pred_x0: bool = False,
) -> jax.Array | SampleOutput:
    """Draw samples with any reverse process, as one ``lax.scan`` inside one ``jit``.

    Args:
      model_fn: ``(x_t [B, ...], t [B] int32) -> output`` in ``parameterization``
        (``[B, ..., 2C]`` with a learned variance). Pass params as data, e.g.
        ``jax.tree_util.Partial(apply_fn, params)``: its arrays are traced, so new params
        never recompile. A plain closure also works (it is compiled once per closure), and
        ``sample`` may be called inside the caller's own ``jit``.
      schedule: the schedule the model was trained with.
      shape_or_xT: the sample shape ``(B, ...)`` (x_T ~ N(0, I) drawn from ``key``) or x_T itself.
      key: a PRNG key; step i draws its noise from ``fold_in(key, i)``.
      method: ``ddpm`` (ancestral; ``steps`` respaces the schedule, improved DDPM sec. 4),
        ``ddim`` (any ``eta``), ``euler_maruyama`` (reverse SDE), ``ode`` (probability flow,
        Euler), ``dpm_solver++`` (2M; 10-25 steps).
      steps: number of network calls (default: every timestep).
      eta: DDIM's noise scale (0 deterministic, 1 DDPM-like).
      parameterization: what the network predicts: ``eps``, ``x0``, ``v`` or ``score``.
      variance: ``fixed_small``, ``fixed_large``, ``learned_range`` or ``learned`` (DDPM only
        uses it; other methods ignore a learned half of the output).
      clip: threshold for the predicted x_0 (None, True, a bound, or "dynamic").
      spacing: where the timesteps of the non-ancestral methods fall: ``uniform``,
        ``quadratic`` or ``logsnr`` (see :func:`timestep_pairs`); default ``quadratic`` for
        ``dpm_solver++`` and ``uniform`` otherwise.
      return_trajectory / return_pred_x0: also return x at every step / the x_0 predictions.

    Returns:
      The samples [B, ...], or a :class:`SampleOutput` when a per-step output is requested.
    """
    _validate(method, schedule, steps, eta, variance, parameterization, spacing)
    if spacing is None:
        spacing = "quadratic" if method == "dpm_solver++" else "uniform"
    T = schedule.num_timesteps
    if method == "ddpm":
        if steps is not None and steps < T:
            # Ancestral sampling runs on the respaced chain, whose variances match its own
            # steps (improved DDPM sec. 4); respacing needs concrete values, so it is done here.
            schedule = respace(schedule, space_timesteps(T, steps))
        ts = np.arange(schedule.num_timesteps - 1, -1, -1, dtype=np.int32)
        ts_prev = ts - 1
    else:
        ts, ts_prev = timestep_pairs(schedule, T if steps is None else steps, spacing)
    out = _run(model_fn, schedule, shape_or_xT, key, method, ts, ts_prev, eta, parameterization, variance, clip,
               return_trajectory, return_pred_x0)
    return out if (return_trajectory or return_pred_x0) else out.samples


def ddim_invert(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    *,
    steps: int | None = None,
    parameterization: str = "eps",
    spacing: str = "uniform",
    iterations: int = 1,
) -> jax.Array:
    """Map data to noise along the deterministic DDIM path (Song et al. 2021a, sec. 4.3, eq. 14).

    Runs the eta = 0 update forwards over the timesteps that ``sample(..., method="ddim",
    steps=steps, spacing=spacing)`` visits backwards, evaluating the network at the target
    time, so ``sample`` of the result reconstructs ``x0`` up to the discretization error.
    ``iterations`` network calls per step solve the inversion as a fixed point (1 is the usual
    approximation eps(x_t, t_next) ~ eps(x_next, t_next); a few more make the round trip exact
    to float precision where the ODE is not expanding; cf. Pan et al. 2023, AIDI).
    Returns x_T with the shape of ``x0``.
    """
    _validate("ddim", schedule, steps, 0.0, "fixed_small", parameterization, spacing)
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations: expected a positive int, got {iterations!r}")
    ts, ts_prev = timestep_pairs(schedule, schedule.num_timesteps if steps is None else steps, spacing)
    out = _run(model_fn, schedule, x0, jax.random.key(0), "ddim_inverse", ts_prev[::-1], ts[::-1], 0.0,
               parameterization, "fixed_small", None, False, False, inverse_iterations=int(iterations))
    return out.samples


def _run(model_fn, schedule, shape_or_xT, key, method, ts, ts_prev, eta, parameterization, variance, clip,
         return_trajectory, return_pred_x0, inverse_iterations=1) -> SampleOutput:
    if isinstance(shape_or_xT, (tuple, list)):
        shape, x_T = tuple(int(s) for s in shape_or_xT), None
    else:
        x_T = jnp.asarray(shape_or_xT)
        shape = tuple(x_T.shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape_or_xT: expected a shape (B, ...) with B >= 1 or an array, got {shape}")
    dynamic, static = _split_model_fn(model_fn)
    _check_model_output(dynamic, static, shape, variance)
    config = _LoopConfig(
        method=method, ts=tuple(int(t) for t in ts), ts_prev=tuple(int(t) for t in ts_prev), eta=float(eta),
        parameterization=parameterization, variance=variance, clip=clip,
        return_trajectory=return_trajectory, return_pred_x0=return_pred_x0, shape=shape,
        inverse_iterations=inverse_iterations,
    )
    return _sample_jit(dynamic, static, schedule, x_T, key, config)


class _LoopConfig(NamedTuple):
    method: str
    ts: tuple[int, ...]
    ts_prev: tuple[int, ...]
    eta: float
    parameterization: str
    variance: str
    clip: Any
    return_trajectory: bool
    return_pred_x0: bool
    shape: tuple[int, ...]
    inverse_iterations: int = 1


def _check_model_output(dynamic, static, shape, variance) -> None:
    """Abstractly evaluate the model so a shape mismatch is reported before compiling."""
    avals = tuple(None if d is None else (tuple(np.shape(d)), jnp.result_type(d)) for d in dynamic)
    out = _model_output_shape(static, avals, shape)
    want = shape[:-1] + (2 * shape[-1],) if variance in ("learned_range", "learned") else shape
    if isinstance(out, Exception):
        raise ValueError(f"model_fn: calling it with x_t of shape {shape} and t of shape ({shape[0]},) failed: {out}") from out
    if out != want:
        raise ValueError(f"model_fn: expected an output of shape {want} for x_t of shape {shape} (variance={variance!r}), got {out}")


@functools.lru_cache(maxsize=128)
def _model_output_shape(static, avals, shape):
    """Output shape of the model for these abstract inputs, cached: a model_fn rebuilt for every
    call (new params, same network) is traced once, not once per call. The cache keeps
    ``static`` alive, so its identity-based key cannot be reused by another function."""
    dyn = [None if a is None else jax.ShapeDtypeStruct(*a) for a in avals]
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
    try:
        out = jax.eval_shape(lambda d, x_, t_: _merge_model_fn(d, static)(x_, t_), dyn, x, t)
    except (TypeError, ValueError) as e:
        return e
    return tuple(out.shape) if hasattr(out, "shape") else type(out).__name__


class _Static:
    """Hashable holder of the non-array parts of a model_fn pytree (compared by identity)."""

    def __init__(self, treedef, leaves):
        self.treedef, self.leaves = treedef, leaves

    def __hash__(self):
        return hash((self.treedef, tuple(id(l) for l in self.leaves)))

    def __eq__(self, other):
        return (
            isinstance(other, _Static)
            and self.treedef == other.treedef
            and len(self.leaves) == len(other.leaves)
            and all(a is b for a, b in zip(self.leaves, other.leaves))
        )


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or (isinstance(leaf, (float, int, complex)) and not isinstance(leaf, bool))


def _split_model_fn(model_fn):
    leaves, treedef = jax.tree_util.tree_flatten(model_fn)
    dynamic = [l if _is_array(l) else None for l in leaves]
    static = _Static(treedef, [None if _is_array(l) else l for l in leaves])
    return dynamic, static


def _merge_model_fn(dynamic, static):
    leaves = [d if s is None else s for d, s in zip(dynamic, static.leaves)]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


def _prediction(c: _LoopConfig, sched: Schedule, out, x, t):
    """(x0, eps) from a network output, thresholded if the loop clips."""
    pred, _ = diffusion.split_variance_output(out, c.variance)
    x0, eps = to_x0_eps(sched, pred, x, t, c.parameterization)
    if c.clip is not None:
        x0 = threshold_x0(x0, c.clip)
        eps = diffusion.predict_eps(sched, x, t, x0)
    return x0, eps


def _update_ddpm(c, sched, eval_fn, x, t, t_prev, key, state, first_order):
    out = eval_fn(x)
    pmv = diffusion.p_mean_variance(sched, out, x, t, c.parameterization, c.variance, clip=c.clip)
    return _ddpm_update(pmv, t, _noise(key, x)), pmv.pred_x0, state


def _update_ddim(c, sched, eval_fn, x, t, t_prev, key, state, first_order):
    out = eval_fn(x)
    x0, eps = _prediction(c, sched, out, x, t)
    return _ddim_update(sched, x0, eps, x, t, t_prev, c.eta, _noise(key, x)), x0, state


def _update_euler_maruyama(c, sched, eval_fn, x, t, t_prev, key, state, first_order):
    out = eval_fn(x)
    x0, eps = _prediction(c, sched, out, x, t)
    return euler_maruyama_step(sched, eps, x, t, t_prev, key, last=t_prev < 0), x0, state


def _update_ode(c, sched, eval_fn, x, t, t_prev, key, state, first_order):
    out = eval_fn(x)
    x0, eps = _prediction(c, sched, out, x, t)
    return ode_step(sched, eps, x, t, t_prev), x0, state


def _update_dpm_solver(c, sched, eval_fn, x, t, t_prev, key, state, first_order):
    out = eval_fn(x)
    x0, _ = _prediction(c, sched, out, x, t)
    x_new, state = dpm_solver_step(sched, x0, x, t, t_prev, state, first_order)
    return x_new, x0, state


def _update_ddim_inverse(c, sched, eval_fn, x, t, t_next, key, state, first_order):
    # x sits at level t (-1, the data, on the first step). The reverse DDIM step from x_next
    # lands on x when x_next = sqrt(a_next) (x - sqrt(1 - a_t) e) / sqrt(a_t) + sqrt(1 - a_next) e
    # with e = eps(x_next, t_next): solved by fixed-point iteration from x_next = x, whose first
    # iterate is the usual inversion eps(x_t, t_next) ~ eps(x_next, t_next).
    alpha_t, sigma_t = _alpha_sigma(sched, t, x)
    alpha_n, sigma_n = _alpha_sigma(sched, t_next, x)

    def refine(_, x_next):
        _, eps = _prediction(c, sched, eval_fn(x_next), x_next, t_next)
        return alpha_n * (x - sigma_t * eps) / alpha_t + sigma_n * eps

    x_next = jax.lax.fori_loop(0, c.inverse_iterations, refine, x)
    return x_next, x, state


# method -> (update, evaluate the network at the target time instead of the current one)
_UPDATES = {
    "ddpm": (_update_ddpm, False),
    "ddim": (_update_ddim, False),
    "euler_maruyama": (_update_euler_maruyama, False),
    "ode": (_update_ode, False),
    "dpm_solver++": (_update_dpm_solver, False),
    "ddim_inverse": (_update_ddim_inverse, True),
}


def _sample_impl(dynamic, static, schedule: Schedule, x_T, key, config: _LoopConfig) -> SampleOutput:
    model_fn = _merge_model_fn(dynamic, static)
    c = config
    update, at_target = _UPDATES[c.method]
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, c.shape, jnp.float32) if x_T is None else x_T
    B = c.shape[0]
    n = len(c.ts)

    def body(carry, inputs):
        x, state = carry
        i, t_s, tp_s, first_order = inputs
        t = jnp.full((B,), t_s, jnp.int32)
        t_prev = jnp.full((B,), tp_s, jnp.int32)
        t_eval = schedule.timesteps[t_prev if at_target else t]
        eval_fn = lambda x_: model_fn(x_, t_eval)  # noqa: E731
        x_new, x0, state = update(c, schedule, eval_fn, x, t, t_prev, jax.random.fold_in(loop_key, i), state, first_order)
        ys = (x_new if c.return_trajectory else None, x0 if c.return_pred_x0 else None)
        return (x_new, state), ys

    # Multistep solvers fall back to first order without history and on the step to the data.
    first_order = (np.arange(n) == 0) | (np.asarray(c.ts_prev) < 0)
    state = DPMSolverState(x0_prev=jnp.zeros_like(x), h_prev=jnp.ones((B,) + (1,) * (x.ndim - 1), x.dtype))
    xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(c.ts, jnp.int32), jnp.asarray(c.ts_prev, jnp.int32), jnp.asarray(first_order))
    (x, _), (traj, x0s) = jax.lax.scan(body, (x, state), xs)
    return SampleOutput(samples=x, trajectory=traj, pred_x0=x0s)


_sample_jit = jax.jit(_sample_impl, static_argnums=(1, 5))
