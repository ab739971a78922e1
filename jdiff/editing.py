"""Editing and completing images with a trained model: SDEdit, RePaint and guidance inpainting.

All three are built from the core's mechanisms, so none has a loop of its own and each works
with every sampler, every guidance wrapper and every conditioning:

  ``sdedit``   (Meng et al. 2022, sec. 3): noise a guide with q(x_t0 | x_0), then run the reverse
               process from t0 — an explicit time sequence that starts mid-chain.
  ``repaint``  (Lugmayr et al. 2022, Alg. 1): after every reverse step the known entries are
               replaced by a draw from q(x_t | x_0) (a per-step hook), and the sequence jumps
               forward ``jump_length`` steps and redoes them, ``jump_n_sample - 1`` extra times
               (forward pairs of the time sequence, which re-noise with q(x_t' | x_t)).
  ``inpaint_energy`` the DPS-style alternative (Chung et al. 2023): the gradient of
               -||m (x0_hat(x_t) - y)||^2 through :func:`jdiff.guidance.energy`.
  ``inpaint``  a model fine-tuned to inpaint (GLIDE, Nichol et al. 2022, sec. 4; Palette): the
               masked image and the mask are ``cond["image"]`` (:func:`inpaint_cond`), made in
               training by the ``"inpaint"`` batch transform from :func:`random_masks`.

Masks are 1 where ``x_known`` is known (kept) and 0 where it is to be filled, broadcastable to
``x_known`` ([B, H, W, 1] or [H, W, 1] for images; any shape for other data).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, samplers
from jdiff.schedules import Schedule, space_timesteps

__all__ = ["sdedit", "repaint", "repaint_times", "inpaint_energy", "replace_known", "inpaint", "inpaint_cond",
           "paste_known", "random_masks", "mask", "MASK_KINDS"]

Partial = jax.tree_util.Partial


def _check_t0(schedule, t0) -> Any:
    if isinstance(schedule, Schedule):
        T = schedule.num_timesteps
        if isinstance(t0, bool) or not isinstance(t0, (int, np.integer)) or not 0 <= t0 < T:
            raise ValueError(f"t0: expected a model timestep in [0, {T}) (0-indexed), got {t0!r}")
        return int(t0)
    lo = float(getattr(schedule, "t_min", 0.0))
    if not isinstance(t0, (float, int, np.floating, np.integer)) or not lo < float(t0) <= 1.0:
        raise ValueError(f"t0: expected a time in ({lo}, 1] of the continuous process, got {t0!r}")
    return float(t0)


def _check_images(name: str, x) -> jax.Array:
    if isinstance(x, jax.core.Tracer):
        return x
    arr = np.asarray(x)
    if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected a float array [B, ...], got shape {arr.shape} dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got {int(np.sum(~np.isfinite(arr)))} non-finite entries")
    return jnp.asarray(arr, jnp.float32)


def sdedit(
    model_fn: Callable,
    schedule,
    x_guide: jax.Array,
    t0,
    key: jax.Array,
    *,
    method: str = "ddpm",
    steps: int | None = None,
    spacing: str | None = None,
    **sample_kwargs,
) -> jax.Array:
    """SDEdit (Meng et al. 2022, Algorithm 1): x_t0 ~ q(x_t0 | x_guide), then the reverse process.

    x_t0 = alpha_t0 x_guide + sigma_t0 eps, and ``jdiff.sample`` runs from t0 to the data on
    the sequence ``time_sequence(schedule, steps, spacing, start=t0)``. A small t0 stays close
    to the guide (faithful); a large one forgets it (realistic). With the exact score and a
    stochastic sampler the output given x_t0 is a draw of p(x_0 | x_t0).

    Args:
      model_fn: as for :func:`jdiff.sample` (any guidance wrapper).
      schedule: the model's process.
      x_guide: [B, ...] the guide (e.g. a stroke painting, a blurred image), in data scale.
      t0: a model timestep in [0, T) (0-indexed) of a discrete schedule, or a time in (t_min, 1].
      key: PRNG key (noising and sampling).
      method, spacing: the sampler and the spacing of its times between t0 and the data.
      steps: network calls from t0 (default: every timestep up to t0).
      **sample_kwargs: passed to :func:`jdiff.sample` (cond, hook, eta, parameterization, ...).
    Returns: the edited samples, shaped like ``x_guide``.
    """
    samplers._check_key(key)
    t0 = _check_t0(schedule, t0)
    x_guide = _check_images("x_guide", x_guide)
    sampler = samplers._validate(method, schedule, steps, sample_kwargs.get("eta"), sample_kwargs.get("variance", "fixed_small"),
                                 sample_kwargs.get("parameterization", "eps"), spacing, None)
    times = samplers.time_sequence(schedule, steps, spacing or sampler.default_spacing, start=t0)
    # Every argument of the sampling loop is checked before the noising below computes anything.
    plan, _ = samplers._prepare(model_fn, schedule, tuple(x_guide.shape), method=method, timesteps=times, **sample_kwargs)
    noise_key, sample_key = jax.random.split(key)
    alpha, sigma = schedule.alpha_sigma(jax.device_put(times[0]))
    x_t0 = alpha * x_guide + sigma * jax.random.normal(noise_key, x_guide.shape, x_guide.dtype)
    return samplers._execute(plan, sample_key, x_t0)


def repaint_times(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> np.ndarray:
    """RePaint's time sequence on a chain of ``num_steps`` reverse steps (Lugmayr et al. 2022,
    sec. 4.2, the reference code's ``get_schedule_jump``): indices num_steps - 1 .. 0 then -1,
    where every ``jump_length`` steps (before the last ``jump_length``) the sequence goes back up
    ``jump_length`` steps and down again, ``jump_n_sample - 1`` times. ``jump_n_sample=1`` is plain
    replacement. Returns chain indices [n + 1] (-1 = the data)."""
    for name, v, lo in (("num_steps", num_steps, 1), ("jump_length", jump_length, 1), ("jump_n_sample", jump_n_sample, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, times = num_steps, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    times.append(-1)
    return np.asarray(times, np.int32)


def replace_known(process, x_known: jax.Array, mask: jax.Array, x: jax.Array, info: samplers.StepInfo) -> jax.Array:
    """RePaint's per-step replacement (Lugmayr et al. 2022, eq. 8): after a reverse step to t_next,
    x = m * (alpha_t_next x_known + sigma_t_next z) + (1 - m) * x, z ~ N(0, I). Re-noising steps
    (resampling jumps) leave x as the forward process made it. A hook: bind the first three
    arguments with ``jax.tree_util.Partial``."""
    alpha, sigma = process.alpha_sigma(info.t_next)
    known = alpha * x_known + sigma * jax.random.normal(info.key, x.shape, x.dtype)
    replaced = jnp.where(mask > 0, known, x)
    return jnp.where(info.forward, x, replaced)


def _check_mask(mask, x_known) -> jax.Array:
    if isinstance(mask, jax.core.Tracer):
        return mask
    m = np.asarray(mask)
    try:
        np.broadcast_shapes(m.shape, tuple(x_known.shape))
    except ValueError:
        raise ValueError(f"mask: expected a shape broadcastable to x_known's {tuple(x_known.shape)}, got {m.shape}") from None
    if np.broadcast_shapes(m.shape, tuple(x_known.shape)) != tuple(x_known.shape):
        raise ValueError(f"mask: expected a shape broadcastable to x_known's {tuple(x_known.shape)} (not larger), got {m.shape}")
    if not np.all((m == 0) | (m == 1)):
        bad = np.unique(m[(m != 0) & (m != 1)])[:5]
        raise ValueError(f"mask: expected 1 (known) and 0 (to fill) only, got values {bad.tolist()}")
    return jnp.asarray(m, jnp.float32)


def repaint(
    model_fn: Callable,
    schedule: Schedule,
    x_known: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    steps: int | None = None,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    method: str = "ddpm",
    **sample_kwargs,
) -> jax.Array:
    """RePaint (Lugmayr et al. 2022, Algorithm 1) as one ``jdiff.sample`` call.

    The reverse chain has ``steps`` steps (the uniformly respaced chain, or every timestep);
    :func:`repaint_times` adds the resampling jumps, and the :func:`replace_known` hook puts
    q(x_t | x_known) into the known entries after each reverse step. The known entries end
    exactly at ``x_known``. RePaint is an approximation even with the exact score: the
    unknown part does not become p(x_unknown | x_known) (BENCHMARKS.md measures it).

    Args:
      model_fn, schedule: the model and its discrete schedule.
      x_known: [B, ...] the image whose known entries are kept (its unknown entries are ignored).
      mask: 1 where known, 0 where to fill; broadcastable to x_known.
      steps: reverse steps of the chain (default T); network calls = steps * (about) jump_n_sample.
      jump_length, jump_n_sample: RePaint's j and r (r = 1: no resampling).
      method: the sampler of the reverse steps (``ddpm`` as in the paper, or any other).
      **sample_kwargs: passed to :func:`jdiff.sample` (cond, eta, parameterization, clip, ...).
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule: expected a discrete jdiff.schedules.Schedule, got {type(schedule).__name__}")
    x_known = _check_images("x_known", x_known)
    mask = _check_mask(mask, x_known)
    T = schedule.num_timesteps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T):
        raise ValueError(f"steps: expected an int in [1, {T}], got {steps!r}")
    n = T if steps is None else int(steps)
    if jump_length >= n and jump_n_sample > 1:
        raise ValueError(f"jump_length: expected fewer than steps={n} reverse steps to jump back over, got {jump_length}")
    chain = repaint_times(n, jump_length, jump_n_sample)
    kept = space_timesteps(T, n).astype(np.int32)
    times = np.where(chain < 0, -1, kept[np.maximum(chain, 0)])
    if "hook" in sample_kwargs:
        raise ValueError("hook: repaint uses the hook for its replacement; compose yours into model_fn or call jdiff.sample")
    hook = Partial(replace_known, schedule, x_known, mask)
    # x_T ~ N(0, I) at the first time, as in the paper; the hook fixes the known part from step 1.
    return samplers.sample(model_fn, schedule, tuple(x_known.shape), key, method=method, timesteps=times, hook=hook,
                           **sample_kwargs)


def inpaint_energy(
    model_fn: Callable,
    schedule,
    x_known: jax.Array,
    mask: jax.Array,
    *,
    parameterization: str = "eps",
) -> Callable:
    """f(x_t, t) = -||m * (x0_hat(x_t, t) - x_known)||^2 per example, for :func:`jdiff.guidance.energy`
    (DPS, Chung et al. 2023, Algorithm 1, with the measurement y = m * x): guidance climbs f,
    pulling the model's x_0 prediction onto the known entries. Its gradient runs through the
    network. ``schedule`` is the model's process (t is its model time, the index of a fresh
    discrete schedule). Returns ``energy_fn(x_t [B, ...], t [B]) -> [B]``."""
    x_known = _check_images("x_known", x_known)
    mask = _check_mask(mask, x_known)
    return Partial(_inpaint_energy, model_fn, schedule, x_known, mask, parameterization)


def _inpaint_energy(model_fn, schedule, x_known, mask, parameterization, x_t, t):
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = (v.reshape(v.shape + (1,) * (x_t.ndim - v.ndim)) for v in (alpha, sigma))
    x0, _ = diffusion.x0_eps_from_output(model_fn(x_t, t), x_t, alpha, sigma, parameterization)
    r = mask * (x0 - x_known)
    return -jnp.sum(r.reshape(r.shape[0], -1) ** 2, axis=1)


# ---------------------------------------------------------------------------------------------
# Masks, and inpainting with a mask-conditioned model.

MASK_KINDS = ("box", "stroke", "half", "border")
"""The kinds of random inpainting mask :func:`mask` draws (``box``, ``stroke``, ``half``,
``border``); the default ``kinds`` of :func:`random_masks` and of the ``inpaint`` batch transform."""


def _box(key, h, w):
    """An unknown rectangle with sides in [1/4, 3/4] of the image's, anywhere inside it."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    bh = jax.random.randint(k1, (), max(1, h // 4), max(2, (3 * h) // 4 + 1))
    bw = jax.random.randint(k2, (), max(1, w // 4), max(2, (3 * w) // 4 + 1))
    top = jax.random.randint(k3, (), 0, h - bh + 1)
    left = jax.random.randint(k4, (), 0, w - bw + 1)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    hole = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return 1.0 - hole.astype(jnp.float32)


def _half(key, h, w):
    """One half unknown: the left, right, top or bottom (the larger half of an odd side)."""
    side = jax.random.randint(key, (), 0, 4)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    holes = jnp.stack([
        jnp.broadcast_to(cols < (w + 1) // 2, (h, w)),  # left
        jnp.broadcast_to(cols >= w // 2, (h, w)),  # right
        jnp.broadcast_to(rows < (h + 1) // 2, (h, w)),  # top
        jnp.broadcast_to(rows >= h // 2, (h, w)),  # bottom
    ])
    return 1.0 - holes[side].astype(jnp.float32)


def _border(key, h, w):
    """Outpainting: a frame of equal width (1/8 to 1/4 of the smaller side, at least 1) unknown."""
    lo = max(1, min(h, w) // 8)
    hi = max(lo, min(h, w) // 4)
    m = jax.random.randint(key, (), lo, hi + 1)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= m) & (rows < h - m) & (cols >= m) & (cols < w - m)
    return inside.astype(jnp.float32)


def _stroke(key, h, w, vertices: int = 5):
    """Free-form strokes (in the spirit of LaMa's / DeepFill v2's): a brush of radius 1/12 to 1/6
    of the image (at least 0.75 px) along a random walk of ``vertices`` points."""
    k1, k2, k3 = jax.random.split(key, 3)
    size = jnp.asarray([h, w], jnp.float32)
    start = jax.random.uniform(k1, (1, 2)) * size
    steps = jax.random.normal(k2, (vertices - 1, 2)) * size / 3.0
    points = jnp.clip(jnp.concatenate([start, start + jnp.cumsum(steps, axis=0)]), 0.0, size - 1.0)
    radius = jax.random.uniform(k3, (), minval=max(0.75, min(h, w) / 12), maxval=max(1.0, min(h, w) / 6))
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"), -1)
    a, b = points[:-1], points[1:]  # segments [S, 2]
    ab = b - a
    p = grid[:, :, None, :] - a  # [H, W, S, 2]
    u = jnp.clip(jnp.sum(p * ab, -1) / jnp.maximum(jnp.sum(ab * ab, -1), 1e-6), 0.0, 1.0)
    dist = jnp.linalg.norm(p - u[..., None] * ab, axis=-1)  # distance to each segment
    return 1.0 - (jnp.min(dist, axis=-1) <= radius).astype(jnp.float32)


_MASK_FNS = {"box": _box, "stroke": _stroke, "half": _half, "border": _border}


def _check_kinds(kinds, weights, name: str = "kinds") -> tuple[tuple[str, ...], np.ndarray]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in _MASK_FNS]
    if not kinds or bad:
        raise ValueError(f"{name}: expected a non-empty sequence of mask kinds from {MASK_KINDS}, got {kinds!r}")
    if weights is None:
        p = np.full(len(kinds), 1.0 / len(kinds))
    else:
        p = np.asarray(weights, np.float64)
        if p.shape != (len(kinds),) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"weights: expected {len(kinds)} non-negative weights (one per kind of {kinds}) with a "
                             f"positive sum, got {weights!r}")
        p = p / p.sum()
    return kinds, p


def mask(key: jax.Array, kind: str, shape: tuple[int, int]) -> jax.Array:
    """One random mask [H, W] of ``kind`` (one of :data:`MASK_KINDS`), 1 = known, 0 = to fill:
    ``box`` an unknown rectangle, ``stroke`` free-form brush strokes, ``half`` the left / right /
    top / bottom half, ``border`` an unknown frame (outpainting). A pure function of ``key``."""
    _check_kinds((kind,), None, "kind")
    h, w = _check_hw(shape)
    return _MASK_FNS[kind](key, h, w)


def _check_hw(shape) -> tuple[int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 2 for s in shape)):
        raise ValueError(f"shape: expected (H, W) with H, W >= 2, got {shape!r}")
    return int(shape[0]), int(shape[1])


def random_masks(key: jax.Array, num: int, shape: tuple[int, int], kinds=MASK_KINDS, weights=None) -> jax.Array:
    """``num`` masks [num, H, W, 1] (1 = known), each of a kind drawn from ``kinds`` with
    probabilities ``weights`` (default uniform). Example i depends only on ``fold_in(key, i)``,
    so a batch sharded over any number of devices gets the same masks."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num: expected a positive int, got {num!r}")
    h, w = _check_hw(shape)
    kinds, p = _check_kinds(kinds, weights)
    return _random_masks(key, int(num), h, w, kinds, tuple(float(v) for v in p))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _random_masks(key, num, h, w, kinds, p):
    fns = [functools.partial(_MASK_FNS[k], h=h, w=w) for k in kinds]
    logits = jnp.log(jnp.asarray(p, jnp.float32))

    def one(i):
        k_kind, k_mask = jax.random.split(jax.random.fold_in(key, i))
        if len(fns) == 1:
            return fns[0](k_mask)
        which = jax.random.categorical(k_kind, logits)
        return jax.lax.switch(which, fns, k_mask)

    return jax.vmap(one)(jnp.arange(num))[..., None]


def inpaint_cond(x_known: jax.Array, mask: jax.Array) -> dict:
    """The conditioning of a mask-channel inpainting model (GLIDE, Nichol et al. 2022, sec. 4):
    ``{"image": concat([m * x_known, m], -1)}`` for x_known [B, H, W, C] and m [B or 1, H, W, 1]
    (1 = known): the masked image, its unknown pixels 0, and the mask, C + 1 channels."""
    x_known, m = _check_inpaint_inputs(x_known, mask)
    return _inpaint_cond(x_known, m)


def _check_inpaint_inputs(x_known, mask) -> tuple[jax.Array, jax.Array]:
    if not isinstance(x_known, jax.core.Tracer):
        x_known = _check_images("x_known", x_known)
    if getattr(x_known, "ndim", 0) != 4:
        raise ValueError(f"x_known: expected images [B, H, W, C], got shape {tuple(np.shape(x_known))}")
    m = _check_mask(mask, x_known)
    if m.ndim != 4 or m.shape[-1] != 1:
        raise ValueError(f"mask: expected [B or 1, H, W, 1] (one mask for all channels), got shape {tuple(m.shape)}")
    return x_known, m


def _inpaint_cond(x_known: jax.Array, m: jax.Array) -> dict:
    m = jnp.broadcast_to(m, x_known.shape[:-1] + (1,)).astype(x_known.dtype)
    return {"image": jnp.concatenate([x_known * m, m], axis=-1)}


def paste_known(x: jax.Array, x_known: jax.Array, mask: jax.Array) -> jax.Array:
    """m * x_known + (1 - m) * x: the known pixels exactly, the completion elsewhere."""
    return jnp.where(jnp.asarray(mask) > 0, x_known, x)


def inpaint(
    model_fn: Callable,
    schedule,
    x_known: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    cond: dict | None = None,
    paste: bool = True,
    method: str = "ddpm",
    **sample_kwargs,
) -> jax.Array:
    """Complete ``x_known`` where ``mask`` is 0 with a mask-channel inpainting model: one
    ``jdiff.sample`` call with ``cond = {**cond, **inpaint_cond(x_known, mask)}``, then (``paste``)
    the known pixels put back exactly (the model reproduces them only approximately).

    Args:
      model_fn: ``(x_t, t, cond) -> output`` of a network trained with the ``"inpaint"`` batch
        transform (``cond["image"]`` of C + 1 channels); any guidance wrapper over it.
      schedule: its process. x_known: [B, H, W, C]. mask: [B or 1, H, W, 1], 1 = known.
      cond: further conditioning (e.g. ``{"label": y}``), passed along.
      **sample_kwargs: passed to :func:`jdiff.sample` (steps, eta, parameterization, clip, ...).
    Returns: [B, H, W, C].
    """
    samplers._check_key(key)
    x_known, m = _check_inpaint_inputs(x_known, mask)
    cond = dict(cond or {})
    if "image" in cond:
        raise ValueError("cond['image']: inpaint sets it from x_known and mask; expected cond without 'image'")
    # Planned with the conditioning image's shape only, so the sampler's arguments and the
    # network's output are checked before the conditioning is computed (and compiled).
    image = jax.ShapeDtypeStruct(tuple(x_known.shape[:-1]) + (x_known.shape[-1] + 1,), x_known.dtype)
    plan, _ = samplers._prepare(model_fn, schedule, tuple(x_known.shape), method=method, cond={**cond, "image": image},
                                **sample_kwargs)
    x = samplers._execute(plan._replace(cond={**cond, **_inpaint_cond(x_known, m)}), key)
    return paste_known(x, jnp.asarray(x_known, x.dtype), mask) if paste else x
