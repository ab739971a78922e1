"""Guidance as wrappers: each takes a model function and returns a model function of the same form.

Nothing here samples. A guided model is passed to :func:`jdiff.sample` like any other, so every
sampler (DDPM, DDIM, SDE, ODE, DPM-Solver++) runs it inside its one ``lax.scan``.

  ``classifier_free(model_fn, w, null_cond=...)``   (x_t, t, c) -> (1 + w) eps(x_t, c) - w eps(x_t, null)
                                                     (Ho & Salimans 2022, eq. 6), one batched call, for any
                                                     conditioning pytree (labels, context tokens, ...).
  ``classifier(model_fn, log_prob_fn, scale, schedule)``  (x_t, t, y) -> eps - s sigma_t grad log p(y | x_t)
                                                     (Dhariwal & Nichol 2021, Alg. 2, eq. 14).
  ``energy(model_fn, energy_fn, scale, schedule)``  the same with any differentiable f(x_t, t)
                                                     (GLIDE's CLIP guidance, Nichol et al. 2022, sec. 2.5).
  ``classifier_hook`` / ``energy_hook``             Alg. 1, the ancestral mean shift mu + s Sigma grad, as a
                                                     per-step hook of ``jdiff.sample`` (Sigma is the step's own).
  ``with_cond(model_fn, c)`` / ``with_label(model_fn, y)``  (x_t, t, c) -> (x_t, t), the form ``sample`` takes
                                                     (or pass ``cond=`` to ``sample``).

Every wrapper is a ``jax.tree_util.Partial`` of a module-level function whose arrays (params,
weights, labels, the schedule) are pytree leaves: ``sample`` traces them, so a new guidance weight,
new labels or new params reuse the compiled loop. Options that change the program (``form``,
``variance``, ...) live in the pytree structure and do recompile. Wrappers compose:
``with_label(energy(classifier_free(m, 3.0, num_classes=10), clip_score, 2.0, schedule), y)``.

Timesteps ``t`` are the trained model's, as samplers pass them (``process.model_time(i)``).
Guidance weights and labels are checked when the wrapper is built (and labels again whenever a
guided model is called with concrete values), so bad input fails before anything compiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.schedules import Schedule

__all__ = ["classifier_free", "classifier", "energy", "classifier_hook", "energy_hook", "with_label", "with_cond", "FORMS"]

FORMS = ("ddim",)
"""Forms of the gradient-guidance model wrappers (:func:`classifier`, :func:`energy`'s ``form``):
``ddim``, the eps form valid for every sampler. Dhariwal & Nichol's Algorithm 1 (the ancestral
mean shift) needs the sampler's step variance and is the hook :func:`classifier_hook` /
:func:`energy_hook`."""

ModelFn = Callable[..., jax.Array]
Partial = jax.tree_util.Partial


# ---------------------------------------------------------------------------
# Static options. Fields marked pytree_node=False sit in the treedef, compared by value, so two
# wrappers built with the same options share one compiled sampler.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class _FreeOptions:
    num_classes: int | None = flax.struct.field(pytree_node=False)
    learned_variance: bool = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class _GradientOptions:
    form: str = flax.struct.field(pytree_node=False)
    variance: str = flax.struct.field(pytree_node=False)
    parameterization: str = flax.struct.field(pytree_node=False)
    conditional: bool = flax.struct.field(pytree_node=False, default=False)
    num_classes: int | None = flax.struct.field(pytree_node=False, default=None)


# ---------------------------------------------------------------------------
# Validation (concrete values only; traced values pass through untouched).
# ---------------------------------------------------------------------------


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_weight(name: str, value) -> Any:
    """A guidance weight: a finite non-negative scalar, or one per example ([B])."""
    if _is_traced(value):
        return value
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - anything np cannot read is a bad weight
        raise ValueError(f"{name}: expected a finite non-negative float, got {value!r}") from e
    if arr.dtype == np.bool_ or not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
        raise ValueError(f"{name}: expected a finite non-negative float, got {value!r} (dtype {arr.dtype})")
    if arr.ndim > 1:
        raise ValueError(f"{name}: expected a scalar or a [batch] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}: expected a finite non-negative float, got {value!r}")
    return jnp.asarray(arr, jnp.float32)


def _check_num_classes(num_classes, required: bool) -> None:
    if num_classes is None and not required:
        return
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int (the null label is num_classes), got {num_classes!r}")


def _check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def _check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise ValueError(f"{name}: expected a callable, got {type(fn).__name__}")


def _check_labels(y, num_classes: int | None, allow_null: bool, batch: int | None = None, name: str = "y"):
    """Integer labels of shape [] or [B]; in [0, K] (K the null label) or [0, K) when concrete."""
    y_arr = y if hasattr(y, "dtype") else np.asarray(y)
    if not jnp.issubdtype(y_arr.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer class labels, got dtype {y_arr.dtype}")
    if y_arr.ndim > 1 or (batch is not None and y_arr.ndim == 1 and y_arr.shape[0] != batch):
        want = "[]" if batch is None else f"[] or [{batch}]"
        raise ValueError(f"{name}: expected labels of shape {want}, got {tuple(y_arr.shape)}")
    if num_classes is not None and not _is_traced(y_arr):
        values = np.asarray(y_arr)
        hi = num_classes if allow_null else num_classes - 1
        if values.size and (values.min() < 0 or values.max() > hi):
            what = f"{num_classes} classes and the null label {num_classes}" if allow_null else f"{num_classes} classes"
            raise ValueError(f"{name}: expected labels in [0, {hi}] ({what}), got min {values.min()}, max {values.max()}")
    return y_arr


def _per_example(w, x: jax.Array, name: str) -> jax.Array:
    """A scalar or [B] weight broadcast against x [B, ...]."""
    w = jnp.asarray(w)
    if w.ndim == 1 and w.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected a scalar or one weight per example, shape ({x.shape[0]},), got {tuple(w.shape)}")
    return w.reshape(w.shape + (1,) * (x.ndim - w.ndim))


# ---------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------


def classifier_free(
    model_fn: ModelFn,
    w: float | jax.Array,
    *,
    null_cond: Any = None,
    num_classes: int | None = None,
    learned_variance: bool = False,
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), for any conditioning.

    eps_hat(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null). The conditional and the null pass
    run as ONE call of ``model_fn`` on a 2B batch in which each example sits next to its null
    copy (x_t and t repeated per example, the conditioning interleaved with the null one), so a
    batch sharded along its first axis stays on its devices; w = 0 returns the conditional output
    unchanged. The combination has weights summing to one, so it is the same guidance whether
    the network predicts eps, x_0, v or the score (each is affine in eps at fixed x_t, t).

    Args:
      model_fn: ``(x_t [B, ..., C], t [B], cond) -> output [B, ..., C]`` (or ``2C`` with
        ``learned_variance``), trained with conditioning dropout to the null value
        (``jdiff.conditioning.drop``).
      w: guidance weight >= 0, a scalar or one per example ([B]). Traced, so new values do not
        recompile a sampler.
      null_cond: the null conditioning, a pytree matching (part of) ``cond``: each of its leaves
        replaces the corresponding entry of ``cond`` in the null pass, broadcast per example
        (``{"label": 10}``, or ``{"context": 0.0, "context_mask": False}``); entries of a dict
        ``cond`` that ``null_cond`` lacks (a super-resolution model's low-res image) are kept.
      num_classes: the bare-label form: ``cond`` is a label array ``y`` [B] (or a scalar) and the
        null label is ``num_classes`` (K). Give exactly one of ``null_cond`` and ``num_classes``.
      learned_variance: the output is [prediction, variance] along the last axis (2C channels):
        only the prediction is guided and the conditional variance half is kept (as GLIDE does).

    Returns:
      ``guided(x_t, t, cond) -> output`` of the model's shape. Pass it to :func:`jdiff.sample`
      with ``cond=`` or fix the conditioning with :func:`with_cond` / :func:`with_label`.
    """
    _check_callable("model_fn", model_fn)
    if (null_cond is None) == (num_classes is None):
        raise ValueError(
            f"null_cond, num_classes: expected exactly one of them (null_cond for a conditioning pytree, num_classes "
            f"for bare labels), got null_cond={null_cond!r}, num_classes={num_classes!r}"
        )
    if num_classes is not None:
        _check_num_classes(num_classes, required=True)
        num_classes = int(num_classes)
    else:
        null_cond = jax.tree.map(jnp.asarray, null_cond)
    if not isinstance(learned_variance, (bool, np.bool_)):
        raise ValueError(f"learned_variance: expected a bool, got {learned_variance!r}")
    w = _check_weight("w", w)
    return Partial(_classifier_free_output, model_fn, w, null_cond, _FreeOptions(num_classes, bool(learned_variance)))


def _per_example_leaf(c, B: int, name: str) -> jax.Array:
    c = jnp.asarray(c)
    if c.ndim == 0:
        return jnp.broadcast_to(c, (B,))
    if c.shape[0] != B:
        raise ValueError(f"{name}: expected a leading batch dimension of {B} (or a scalar), got shape {tuple(c.shape)}")
    return c


def _interleave(c: jax.Array, n: jax.Array) -> jax.Array:
    """[c_0, n_0, c_1, n_1, ...] along the first axis: [2B, ...]."""
    n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
    return jnp.stack([c, n], axis=1).reshape((2 * c.shape[0],) + c.shape[1:])


def _with_null(cond, null, B: int):
    """The 2B conditioning of the batched pass: every entry of ``cond`` next to its null value."""
    if isinstance(cond, Mapping) and isinstance(null, Mapping):
        missing = sorted(set(null) - set(cond))
        if missing:
            raise ValueError(f"null_cond: has key(s) {missing} that cond lacks; cond has {sorted(cond)}")
        out = {}
        for k, c in cond.items():
            c = _per_example_leaf(c, B, f"cond[{k!r}]")
            if k not in null:
                out[k] = jnp.repeat(c, 2, axis=0)
            else:
                out[k] = jax.tree.map(lambda cc, nn: _interleave(_per_example_leaf(cc, B, f"cond[{k!r}]"), nn), c, null[k])
        return type(cond)(out) if not isinstance(cond, dict) else out
    return jax.tree.map(lambda c, n: _interleave(_per_example_leaf(c, B, "cond"), n), cond, null)


def _classifier_free_output(model_fn, w, null, opts: _FreeOptions, x_t, t, cond):
    B = x_t.shape[0]
    if opts.num_classes is not None:
        cond = jnp.broadcast_to(_check_labels(cond, opts.num_classes, allow_null=True, batch=B), (B,))
        null = jnp.asarray(opts.num_classes, cond.dtype)
    t = jnp.broadcast_to(jnp.asarray(t), (B,))
    out = model_fn(jnp.repeat(x_t, 2, axis=0), jnp.repeat(t, 2), _with_null(cond, null, B))
    C = x_t.shape[-1]
    want = x_t.shape[:-1] + ((2 * C,) if opts.learned_variance else (C,))
    if tuple(out.shape) != (2 * B,) + tuple(want[1:]):
        raise ValueError(
            f"model_fn: expected an output of shape {(2 * B,) + tuple(want[1:])} for the batched conditional and "
            f"unconditional pass (learned_variance={opts.learned_variance}), got {tuple(out.shape)}"
        )
    out = out.reshape((B, 2) + out.shape[1:])
    conditional, unconditional = out[:, 0], out[:, 1]
    w = _per_example(w, x_t, "w")
    if opts.learned_variance:
        guided = (1.0 + w) * conditional[..., :C] - w * unconditional[..., :C]
        return jnp.concatenate([guided, conditional[..., C:]], axis=-1)
    return (1.0 + w) * conditional - w * unconditional


# ---------------------------------------------------------------------------
# Gradient guidance (classifier, energy).
# ---------------------------------------------------------------------------


def _gradient_options(schedule, scale, form, variance, parameterization, **extra) -> tuple[Any, _GradientOptions]:
    if not hasattr(schedule, "alpha_sigma"):
        raise ValueError(f"schedule: expected a jdiff.schedules.Schedule or another process, got {type(schedule).__name__}")
    if form == "ddpm":
        raise ValueError(
            "form: 'ddpm' (Dhariwal & Nichol's Algorithm 1, the ancestral mean shift) needs the sampler's own step "
            "variance, which a model wrapper cannot see on a respaced chain; use the hook "
            "jdiff.sample(..., hook=guidance.classifier_hook(log_prob_fn, scale, y)) (exact on every chain), or form='ddim'"
        )
    _check_option("form", form, FORMS)
    _check_option("variance", variance, diffusion.VARIANCE_TYPES)
    _check_option("parameterization", parameterization, diffusion.PARAMETERIZATIONS)
    return _check_weight("scale", scale), _GradientOptions(form=form, variance=variance, parameterization=parameterization, **extra)


def classifier(
    model_fn: ModelFn,
    log_prob_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    scale: float | jax.Array,
    schedule: Schedule,
    *,
    conditional: bool = False,
    num_classes: int | None = None,
    form: str = "ddim",
    variance: str = "fixed_small",
    parameterization: str = "eps",
) -> ModelFn:
    """Classifier guidance with a noise-aware classifier (Dhariwal & Nichol 2021, Algorithm 2, eq. 14).

    eps_hat = eps - s sigma_t grad_x log p(y | x_t) (sigma_t = sqrt(1 - abar_t)), i.e. the score
    plus s grad log p(y | x_t); valid for every sampler. With s = 1 and an exact noisy classifier,
    eps_hat is exactly the conditional model's eps. Their Algorithm 1 (the ancestral mean shift
    mu + s Sigma grad) is :func:`classifier_hook`.

    The gradient is ``jax.grad`` of sum_b log p(y_b | x_t[b]): per-example gradients as long as the
    classifier treats examples independently (no batch statistics). On XLA:CPU, build the
    classifier's convolutions with :class:`jdiff.models.layers.Conv` (jdiff's networks do): with
    ``flax.linen.Conv`` its input gradient inside the sampler's loop runs as naive loop nests, about
    20x slower per step at XLA's default optimisation level.

    Args:
      model_fn: ``(x_t, t) -> output`` or, with ``conditional=True``, ``(x_t, t, y) -> output``.
      log_prob_fn: ``(x_t [B, ...], t [B], y [B]) -> log p(y | x_t)`` [B].
      scale: s >= 0, a scalar or one per example ([B]).
      schedule: the process whose model times the sampler calls the model with: a
        :class:`~jdiff.schedules.Schedule` (the trained one, or a respaced one: t is mapped back
        to its index) or a continuous process.
      conditional: whether ``model_fn`` takes the label.
      num_classes: if given, labels are checked to lie in [0, num_classes) when concrete.
      form: ``ddim`` (the eps form; see :data:`FORMS`).
      variance: the sampler's variance type; a learned one means a 2C output, whose prediction
        half is guided and whose variance half is kept.
      parameterization: what the network predicts; guidance is applied to the implied eps and the
        result converted back.

    Returns:
      ``guided(x_t, t, y) -> output`` in the model's parameterization and shape.
    """
    _check_callable("model_fn", model_fn)
    _check_callable("log_prob_fn", log_prob_fn)
    if not isinstance(conditional, (bool, np.bool_)):
        raise ValueError(f"conditional: expected a bool, got {conditional!r}")
    _check_num_classes(num_classes, required=False)
    scale, opts = _gradient_options(
        schedule, scale, form, variance, parameterization,
        conditional=bool(conditional), num_classes=None if num_classes is None else int(num_classes),
    )
    return Partial(_classifier_output, model_fn, log_prob_fn, scale, schedule, opts)


def energy(
    model_fn: ModelFn,
    energy_fn: Callable[[jax.Array, jax.Array], jax.Array],
    scale: float | jax.Array,
    schedule: Schedule,
    *,
    form: str = "ddim",
    variance: str = "fixed_small",
    parameterization: str = "eps",
) -> ModelFn:
    """Guidance by the gradient of any differentiable f(x_t, t) (GLIDE's CLIP guidance, Nichol et
    al. 2022, sec. 2.5, with f the image-text similarity; Dhariwal & Nichol 2021, eq. 14).

    eps_hat = eps - s sigma_t grad_x f(x_t, t); :func:`classifier` is the case f = log p(y | x_t),
    and :func:`energy_hook` the ancestral mean-shift form.

    Args:
      model_fn: ``(x_t, t, *args) -> output``; any extra arguments (the conditioning of a
        classifier-free model) are passed through, so wrappers compose.
      energy_fn: ``(x_t [B, ...], t [B]) -> f`` [B], with its conditioning closed over (e.g.
        ``with_label(log_prob_fn, y)`` or a ``Partial`` holding text embeddings). Guidance
        climbs f, like a log-density: for an energy E with p ~ exp(-E) pass f = -E.
      scale, schedule, form, variance, parameterization: as in :func:`classifier`.

    Returns:
      ``guided(x_t, t, *args) -> output`` in the model's parameterization and shape.
    """
    _check_callable("model_fn", model_fn)
    _check_callable("energy_fn", energy_fn)
    scale, opts = _gradient_options(schedule, scale, form, variance, parameterization)
    return Partial(_energy_output, model_fn, energy_fn, scale, schedule, opts)


def _classifier_output(model_fn, log_prob_fn, scale, schedule, opts: _GradientOptions, x_t, t, y):
    B = x_t.shape[0]
    y = jnp.broadcast_to(_check_labels(y, opts.num_classes, allow_null=False, batch=B), (B,))
    t = jnp.broadcast_to(jnp.asarray(t), (B,))
    out = model_fn(x_t, t, y) if opts.conditional else model_fn(x_t, t)
    grad = _gradient(lambda x: log_prob_fn(x, t, y), x_t, "log_prob_fn")
    return _apply_gradient(schedule, opts, scale, out, x_t, t, grad)


def _energy_output(model_fn, energy_fn, scale, schedule, opts: _GradientOptions, x_t, t, *args):
    t = jnp.broadcast_to(jnp.asarray(t), (x_t.shape[0],))
    out = model_fn(x_t, t, *args)
    grad = _gradient(lambda x: energy_fn(x, t), x_t, "energy_fn")
    return _apply_gradient(schedule, opts, scale, out, x_t, t, grad)


def _gradient(fn, x: jax.Array, name: str) -> jax.Array:
    """grad_x of sum_b fn(x)[b]: [B, ...]."""

    def total(x_):
        value = fn(x_)
        if jnp.shape(value) != (x.shape[0],):
            raise ValueError(f"{name}: expected one value per example, shape ({x.shape[0]},), got {jnp.shape(value)}")
        return jnp.sum(value)

    return jax.grad(total)(x)


def _schedule_index(schedule, t: jax.Array) -> jax.Array:
    """The process time i with model_time(i) = t: the index of a (respaced) discrete schedule
    (schedule.timesteps[i] = t), t itself for a continuous process."""
    if not isinstance(schedule, Schedule):
        return t
    i = jnp.searchsorted(schedule.timesteps, t).astype(jnp.int32)
    if not _is_traced(t) and not _is_traced(schedule.timesteps):
        ts, tv = np.asarray(schedule.timesteps), np.asarray(t)
        found = np.isin(tv, ts)
        if not np.all(found):
            raise ValueError(
                f"t: expected model timesteps of `schedule` (its .timesteps, {ts.min()}..{ts.max()}, {ts.size} of them), "
                f"got {tv[~found][:5]}"
            )
    return i


def _alpha_sigma(schedule, t, x):
    alpha, sigma = schedule.alpha_sigma(_schedule_index(schedule, t))
    return _bcast(alpha, x), _bcast(sigma, x)


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _apply_gradient(schedule, opts: _GradientOptions, scale, out, x_t, t, grad):
    pred, var_out = diffusion.split_variance_output(out, opts.variance)
    if pred.shape != x_t.shape:
        raise ValueError(f"model_fn: expected a prediction of shape {tuple(x_t.shape)} (like x_t, variance={opts.variance!r}), got {tuple(pred.shape)}")
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    _, eps = diffusion.x0_eps_from_output(pred, x_t, alpha, sigma, opts.parameterization)
    eps = eps - _per_example(scale, x_t, "scale") * sigma * grad
    guided = diffusion.output_from_eps(eps, x_t, alpha, sigma, opts.parameterization)
    return guided if var_out is None else jnp.concatenate([guided, var_out], axis=-1)


# ---------------------------------------------------------------------------
# The ancestral mean shift (Dhariwal & Nichol 2021, Algorithm 1) as a per-step hook.
# ---------------------------------------------------------------------------


def energy_hook(energy_fn: Callable[[jax.Array, jax.Array], jax.Array], scale: float | jax.Array) -> Callable:
    """The mean-shift guidance of Dhariwal & Nichol 2021, Algorithm 1, as a ``jdiff.sample`` hook.

    After each reverse step x_next ~ N(mu, Sigma) from x_t, the hook adds s Sigma grad_x f(x_t, t),
    so x_next ~ N(mu + s Sigma grad f(x_t, t), Sigma): exactly Algorithm 1's guided step, with
    Sigma the variance of the noise the sampler's step drew (the respaced chain's own on a
    respaced chain, the learned one with a learned variance). It therefore guides only
    stochastic steps: ancestral ``ddpm`` (and DDIM with eta > 0); deterministic samplers add no
    noise and get no shift (use :func:`energy`'s eps form for them). Re-noising steps of a
    sequence are left alone.

    Args:
      energy_fn: ``(x_t [B, ...], t [B]) -> f`` [B] with t the model time (e.g.
        ``with_label(log_prob_fn, y)``).
      scale: s >= 0, a scalar or one per example ([B]); traced.
    Returns: ``hook(x, info) -> x`` (a ``Partial``, so new scales or params do not recompile).
    """
    _check_callable("energy_fn", energy_fn)
    return Partial(_mean_shift_hook, energy_fn, _check_weight("scale", scale))


def classifier_hook(
    log_prob_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    scale: float | jax.Array,
    y: int | jax.Array,
    *,
    num_classes: int | None = None,
) -> Callable:
    """Classifier guidance in its DDPM form (Dhariwal & Nichol 2021, Algorithm 1) as a hook:
    :func:`energy_hook` with f = log p_phi(y | x_t, t). ``y``: a label or one per example [B]
    (checked against [0, num_classes) when given)."""
    _check_callable("log_prob_fn", log_prob_fn)
    _check_num_classes(num_classes, required=False)
    y = _check_labels(y, num_classes, allow_null=False)
    return energy_hook(Partial(_call_with_label, log_prob_fn, jnp.asarray(y, jnp.int32)), scale)


def _mean_shift_hook(energy_fn, scale, x, info):
    grad = _gradient(lambda x_: energy_fn(x_, info.model_t), info.x_prev, "energy_fn")
    shift = _per_example(scale, x, "scale") * info.variance * grad
    return x + jnp.where(info.forward, 0.0, 1.0) * shift


# ---------------------------------------------------------------------------
# Conditioning helper.
# ---------------------------------------------------------------------------


def with_label(model_fn: ModelFn, y: int | jax.Array, *, num_classes: int | None = None) -> ModelFn:
    """Fix the label of a conditional model: ``(x_t, t, y) -> out`` becomes ``(x_t, t) -> out``.

    The result is a ``jax.tree_util.Partial`` holding y as an int32 array, so ``jdiff.sample``
    traces it and new labels of the same shape reuse the compiled loop.

    Args:
      model_fn: any ``(x_t, t, y)`` function (a model, a guidance wrapper, a classifier).
      y: an int label or one per example ([B]).
      num_classes: if given, y must lie in [0, num_classes] (the null label included). Defaults to
        what a wrapper of this module was built with: [0, K] for ``classifier_free``, [0, K) for
        ``classifier(..., num_classes=K)``.
    """
    _check_callable("model_fn", model_fn)
    _check_num_classes(num_classes, required=False)
    if num_classes is None:
        num_classes, allow_null = _label_range(model_fn)
    else:
        allow_null = True
    y = _check_labels(y, num_classes, allow_null)
    if not _is_traced(y):
        y = jnp.asarray(y, jnp.int32)
    return Partial(_call_with_label, model_fn, y)


def _call_with_label(model_fn, y, x_t, t):
    return model_fn(x_t, t, y)


def with_cond(model_fn: ModelFn, cond: Any) -> ModelFn:
    """Fix the conditioning of a model: ``(x_t, t, cond) -> out`` becomes ``(x_t, t) -> out``.

    ``cond`` is any pytree of arrays (e.g. ``{"label": y, "context": tokens, "context_mask": m}``),
    held as traced leaves of a ``Partial``, so new values of the same shapes reuse a compiled
    sampler. Equivalent to passing ``cond=`` to :func:`jdiff.sample`.
    """
    _check_callable("model_fn", model_fn)
    return Partial(_call_with_label, model_fn, jax.tree.map(jnp.asarray, cond))


def _label_range(model_fn) -> tuple[int | None, bool]:
    """(K, whether the null label K is allowed) of this module's wrappers; (None, True) otherwise."""
    if isinstance(model_fn, Partial):
        if model_fn.func is _classifier_free_output:
            return model_fn.args[3].num_classes, True
        if model_fn.func is _classifier_output:
            return model_fn.args[4].num_classes, False
        if model_fn.func is _energy_output:
            return _label_range(model_fn.args[0])
    return None, True
