"""Guidance as wrappers: each takes a model function and returns a model function of the same form.

Nothing here samples. A guided model is passed to :func:`jdiff.sample` like any other, so every
sampler (DDPM, DDIM, SDE, ODE, DPM-Solver++) runs it inside its one ``lax.scan``.

  ``classifier_free(model_fn, w, num_classes=K)``  (x_t, t, y) -> (1 + w) eps(x_t, y) - w eps(x_t, null)
                                                     (Ho & Salimans 2022, eq. 6), one batched call.
  ``classifier(model_fn, log_prob_fn, scale, schedule)``  (x_t, t, y) -> eps - s sqrt(1 - abar_t)
                                                     grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2,
                                                     eq. 14), or their Alg. 1 mean shift (``form="ddpm"``).
  ``energy(model_fn, energy_fn, scale, schedule)``  the same with any differentiable f(x_t, t)
                                                     (GLIDE's CLIP guidance, Nichol et al. 2022, sec. 2.5).
  ``with_label(model_fn, y)``                       (x_t, t, y) -> (x_t, t), the form ``sample`` takes.

Every wrapper is a ``jax.tree_util.Partial`` of a module-level function whose arrays (params,
weights, labels, the schedule) are pytree leaves: ``sample`` traces them, so a new guidance weight,
new labels or new params reuse the compiled loop. Options that change the program (``form``,
``variance``, ...) live in the pytree structure and do recompile. Wrappers compose:
``with_label(energy(classifier_free(m, 3.0, num_classes=10), clip_score, 2.0, schedule), y)``.

Timesteps ``t`` are the trained model's, as samplers pass them (``schedule.timesteps[i]``).
Guidance weights and labels are checked when the wrapper is built (and labels again whenever a
guided model is called with concrete values), so bad input fails before anything compiles.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.diffusion import extract
from jdiff.schedules import Schedule

__all__ = ["classifier_free", "classifier", "energy", "with_label", "FORMS"]

FORMS = ("ddim", "ddpm")

ModelFn = Callable[..., jax.Array]
Partial = jax.tree_util.Partial


# ---------------------------------------------------------------------------
# Static options. Fields marked pytree_node=False sit in the treedef, compared by value, so two
# wrappers built with the same options share one compiled sampler.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class _FreeOptions:
    num_classes: int = flax.struct.field(pytree_node=False)
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


def classifier_free(model_fn: ModelFn, w: float | jax.Array, *, num_classes: int, learned_variance: bool = False) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6).

    eps_hat(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t, null). The conditional and the
    unconditional pass run as ONE call of ``model_fn`` on a 2B batch (x_t and t repeated, labels
    ``concat([y, null])``); w = 0 returns the conditional output unchanged. The combination has
    weights summing to one, so it is the same guidance whether the network predicts eps, x_0, v
    or the score (each is affine in eps at fixed x_t, t).

    Args:
      model_fn: ``(x_t [B, ..., C], t [B] int, y [B] int) -> output [B, ..., C]`` (or ``2C`` with
        ``learned_variance``), trained with label dropout to the null label ``num_classes``.
      w: guidance weight >= 0, a scalar or one per example ([B]). Traced, so new values do not
        recompile a sampler.
      num_classes: K, the number of real classes; the null label is K. Never inferred.
      learned_variance: the output is [prediction, variance] along the last axis (2C channels):
        only the prediction is guided and the conditional variance half is kept (as GLIDE does).

    Returns:
      ``guided(x_t, t, y) -> output`` of the model's shape; labels y in [0, K] (K gives the
      unconditional output). Pass to :func:`jdiff.sample` through :func:`with_label`.
    """
    _check_callable("model_fn", model_fn)
    _check_num_classes(num_classes, required=True)
    if not isinstance(learned_variance, (bool, np.bool_)):
        raise ValueError(f"learned_variance: expected a bool, got {learned_variance!r}")
    w = _check_weight("w", w)
    return Partial(_classifier_free_output, model_fn, w, _FreeOptions(int(num_classes), bool(learned_variance)))


def _classifier_free_output(model_fn, w, opts: _FreeOptions, x_t, t, y):
    B = x_t.shape[0]
    y = jnp.broadcast_to(_check_labels(y, opts.num_classes, allow_null=True, batch=B), (B,))
    t = jnp.broadcast_to(jnp.asarray(t), (B,))
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, opts.num_classes)]))
    C = x_t.shape[-1]
    want = x_t.shape[:-1] + ((2 * C,) if opts.learned_variance else (C,))
    if tuple(out.shape) != (2 * B,) + tuple(want[1:]):
        raise ValueError(
            f"model_fn: expected an output of shape {(2 * B,) + tuple(want[1:])} for the batched conditional and "
            f"unconditional pass (learned_variance={opts.learned_variance}), got {tuple(out.shape)}"
        )
    cond, uncond = out[:B], out[B:]
    w = _per_example(w, x_t, "w")
    if opts.learned_variance:
        guided = (1.0 + w) * cond[..., :C] - w * uncond[..., :C]
        return jnp.concatenate([guided, cond[..., C:]], axis=-1)
    return (1.0 + w) * cond - w * uncond


# ---------------------------------------------------------------------------
# Gradient guidance (classifier, energy).
# ---------------------------------------------------------------------------


def _gradient_options(schedule, scale, form, variance, parameterization, **extra) -> tuple[Any, _GradientOptions]:
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule: expected a jdiff.schedules.Schedule, got {type(schedule).__name__}")
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
    """Classifier guidance with a noise-aware classifier (Dhariwal & Nichol 2021).

    ``form="ddim"`` (Algorithm 2, eq. 14): eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t),
    i.e. the score plus s grad log p(y | x_t); valid for every sampler. With s = 1 and an exact
    noisy classifier, eps_hat is exactly the conditional model's eps.

    ``form="ddpm"`` (Algorithm 1): the ancestral mean is shifted, mu_hat = mu + s Sigma_t grad.
    The ancestral mean is affine in eps, mu = c2 x_t + c1 (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    (c1, c2 = posterior_mean_coef1/2), so the wrapper returns
    eps_hat = eps - s Sigma_t grad / (c1 sqrt(1/abar_t - 1)), which gives exactly that mean under
    ``jdiff.sample(..., method="ddpm", variance=variance)``; no second loop is needed. With
    fixed_small this is eps - s sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t) grad, with
    fixed_large eps - s sqrt(alpha_t) sqrt(1 - abar_t) grad (the DDIM form times sqrt(alpha_t)).
    ``variance`` must be the one passed to ``sample``; ``schedule`` must be the chain the sampler
    runs: for a respaced ancestral chain pass ``respace(schedule, ...)`` both here and to ``sample``
    (with ``steps=None``). With ``clip`` in ``sample`` the guided x_0 is thresholded afterwards,
    so the shift is then no longer exact.

    The gradient is ``jax.grad`` of sum_b log p(y_b | x_t[b]): per-example gradients as long as the
    classifier treats examples independently (no batch statistics).

    Args:
      model_fn: ``(x_t, t) -> output`` or, with ``conditional=True``, ``(x_t, t, y) -> output``.
      log_prob_fn: ``(x_t [B, ...], t [B], y [B]) -> log p(y | x_t)`` [B].
      scale: s >= 0, a scalar or one per example ([B]).
      schedule: the schedule whose timesteps ``schedule.timesteps`` the sampler calls the model
        with (the trained one, or a respaced one); t is mapped back to its index.
      conditional: whether ``model_fn`` takes the label.
      num_classes: if given, labels are checked to lie in [0, num_classes) when concrete.
      form: ``ddim`` (eps form) or ``ddpm`` (mean-shift form).
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

    eps_hat = eps - s sqrt(1 - abar_t) grad_x f(x_t, t) (``form="ddim"``) or the ancestral mean
    shifted by s Sigma_t grad_x f (``form="ddpm"``); see :func:`classifier` for both forms, of
    which ``classifier`` is the case f = log p(y | x_t).

    Args:
      model_fn: ``(x_t, t, *args) -> output``; any extra arguments (a label ``y`` of a
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


def _schedule_index(schedule: Schedule, t: jax.Array) -> jax.Array:
    """The index i of ``schedule`` with schedule.timesteps[i] = t (the identity on a fresh schedule)."""
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


def _apply_gradient(schedule: Schedule, opts: _GradientOptions, scale, out, x_t, t, grad):
    i = _schedule_index(schedule, t)
    pred, var_out = diffusion.split_variance_output(out, opts.variance)
    if pred.shape != x_t.shape:
        raise ValueError(f"model_fn: expected a prediction of shape {tuple(x_t.shape)} (like x_t, variance={opts.variance!r}), got {tuple(pred.shape)}")
    _, eps = diffusion.to_x0_eps(schedule, pred, x_t, i, opts.parameterization)
    if opts.form == "ddim":
        coef = extract(schedule.sqrt_one_minus_alphas_cumprod, i, x_t)
    else:
        sigma2 = diffusion.p_mean_variance(schedule, out, x_t, i, opts.parameterization, opts.variance).variance
        # d mu / d eps = -c1 sqrt(1/abar - 1), as p_mean_variance computes the mean; dividing by
        # it makes the eps change move the mean by exactly s Sigma grad.
        coef = sigma2 / (extract(schedule.posterior_mean_coef1, i, x_t) * extract(schedule.sqrt_recipm1_alphas_cumprod, i, x_t))
    eps = eps - _per_example(scale, x_t, "scale") * coef * grad
    guided = _from_eps(schedule, eps, x_t, i, opts.parameterization)
    return guided if var_out is None else jnp.concatenate([guided, var_out], axis=-1)


def _from_eps(schedule: Schedule, eps, x_t, i, parameterization: str):
    if parameterization == "eps":
        return eps
    if parameterization == "score":
        return diffusion.score_from_eps(schedule, i, eps)
    x0 = diffusion.predict_x0(schedule, x_t, i, eps)
    if parameterization == "x0":
        return x0
    return diffusion.predict_v(schedule, x0, i, eps)


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


def _label_range(model_fn) -> tuple[int | None, bool]:
    """(K, whether the null label K is allowed) of this module's wrappers; (None, True) otherwise."""
    if isinstance(model_fn, Partial):
        if model_fn.func is _classifier_free_output:
            return model_fn.args[2].num_classes, True
        if model_fn.func is _classifier_output:
            return model_fn.args[4].num_classes, False
        if model_fn.func is _energy_output:
            return _label_range(model_fn.args[0])
    return None, True
