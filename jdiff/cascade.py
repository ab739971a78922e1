"""Cascaded diffusion: a base model at low resolution, then super-resolution models conditioned on
the upsampled output of the stage before (Ho, Saharia et al. 2022, "Cascaded Diffusion Models for
High Fidelity Image Generation", JMLR 23, hereafter CDM; Saharia et al. 2021, SR3).

A super-resolution (SR) stage is an ordinary network with ``image_channels`` > 0 and
``aug_level_embedding=True``: it sees ``cond["image"]``, the low-resolution image upsampled to its
own size (:func:`upsample`) and concatenated to x_t, and ``cond["aug_level"]``, the timestep of
the noise the low-resolution image was corrupted with, embedded like t. Training makes that
input from the training image with the same :func:`downsample` the cascade's base stage was
trained on (the ``super_resolution`` batch transform of :mod:`jdiff.train.transforms`), so
nothing differs between training and test time but where the low-resolution image comes from.

Conditioning augmentation (CDM sec. 4), the paper's key ingredient: without it, an SR model
trained on clean downsampled images meets the base model's artefacts only at test time and the
cascade's errors compound.

* Gaussian noise ("non-truncated" augmentation): the low-resolution image z_0 becomes
  ``z_s = alpha_s z_0 + sigma_s eps`` (DDPM eq. 4 with the SR model's own schedule) at an
  augmentation timestep s drawn per example during training; at test time s is chosen, one
  value per stage (CDM sweeps it at inference). The level is a fraction ``a`` of the schedule:
  ``s = round(a T) - 1`` (:func:`aug_timestep`), so a = 0 is s = -1, the clean image (the
  library's convention for "the data"), and a = 1 is s = T - 1, pure noise.
* Truncation ("truncated" augmentation, CDM sec. 4): instead of sampling the
  lower stage to the data and noising the result, stop its reverse process at s and hand over
  z_s itself. Cheaper (the lower stage skips its last steps) and exact when both stages share
  the forward process, which is checked. The SR model is trained the same way in both cases.
* Blur (CDM sec. 4, used for its higher-resolution stages): a Gaussian blur of random width
  applied to the low-resolution image with some probability during training only.

:func:`cascade` runs the stages with one key and one class label per sample; each stage is a
:class:`Stage` (network, params, schedule, sampler settings, augmentation level).
:func:`super_resolve` runs one SR stage on given low-resolution images.

Shapes: images NHWC in [-1, 1]; a stage of factor f maps [N, H/f, W/f, C] to [N, H, W, C].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import samplers
from jdiff.schedules import Schedule

__all__ = [
    "AUG_MODES",
    "UPSAMPLE_METHODS",
    "Stage",
    "aug_timestep",
    "augment",
    "blur",
    "cascade",
    "check_aug_level",
    "conditioning_of_noisy",
    "downsample",
    "sr_conditioning",
    "super_resolve",
    "upsample",
]

AUG_MODES = ("non_truncated", "truncated")
"""The conditioning-augmentation modes of :func:`cascade`'s ``aug_mode`` (CDM sec. 4):
``non_truncated`` samples the lower stage to the data and noises its output to the SR stage's
level; ``truncated`` stops the lower stage's reverse process at that level and hands over z_s itself."""

UPSAMPLE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5")
"""The ``jax.image.resize`` methods :func:`upsample` accepts: a :class:`Stage`'s
``upsample_method`` and the ``super_resolution`` batch transform's ``method`` (SR3 and CDM use ``bicubic``)."""


def _check_factor(factor: Any, name: str = "factor") -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"{name}: expected a positive int, got {factor!r}")
    return int(factor)


def downsample(x: jax.Array, factor: int) -> jax.Array:
    """Area downsampling by an integer ``factor``: the mean of each f x f block,
    ``[B, H, W, C] -> [B, H/f, W/f, C]``. The same operator as
    :func:`jdiff.data.fashion_mnist.area_downsample` (which a base model's 14x14 data goes
    through) for integer factors, so an SR model is trained on exactly the low-resolution images
    a base model is trained to produce."""
    factor = _check_factor(factor)
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"factor: {factor} does not divide the image size {h}x{w}")
    return jnp.mean(jnp.reshape(x, (b, h // factor, factor, w // factor, factor, c)), axis=(2, 4))


def upsample(x: jax.Array, size: tuple[int, int], method: str = "bicubic") -> jax.Array:
    """``x`` [B, h, w, C] resized to [B, H, W, C] = ``size`` with ``jax.image.resize``; what an SR
    network sees as ``cond["image"]`` (SR3 and CDM upsample bicubically)."""
    if method not in UPSAMPLE_METHODS:
        raise ValueError(f"method: expected one of {UPSAMPLE_METHODS}, got {method!r}")
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, int(size[0]), int(size[1]), c), method)


def check_aug_level(level: Any, name: str = "aug_level") -> float:
    """A Python float in [0, 1], or a ValueError naming ``name``."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a fraction of the schedule in [0, 1], got {level!r}") from None
    if isinstance(level, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a fraction of the schedule in [0, 1], got {level!r}")
    return value


def aug_timestep(level: jax.Array | float, num_timesteps: int) -> jax.Array:
    """The augmentation timestep ``s = round(a T) - 1`` of a level ``a`` in [0, 1] (any shape):
    -1 (the clean image) at a = 0, T - 1 (pure noise) at a = 1; int32."""
    return (jnp.round(jnp.asarray(level, jnp.float32) * num_timesteps) - 1).astype(jnp.int32)


def augment(schedule: Schedule, low: jax.Array, s: jax.Array, noise: jax.Array) -> jax.Array:
    """Gaussian conditioning augmentation (CDM sec. 4): ``z_s = alpha_s low + sigma_s eps`` with
    (alpha_s, sigma_s) = (sqrt(abar_s), sqrt(1 - abar_s)) of ``schedule`` (DDPM eq. 4), and
    (1, 0) at s = -1. ``low`` [B, h, w, C], ``s`` [B] int in [-1, T), ``noise`` eps like ``low``."""
    alpha, sigma = schedule.alpha_sigma(s)
    shape = (-1,) + (1,) * (low.ndim - 1)
    return jnp.reshape(alpha, shape).astype(low.dtype) * low + jnp.reshape(sigma, shape).astype(low.dtype) * noise


def blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """A separable Gaussian blur per example: ``x`` [B, H, W, C], ``sigma`` [B] in pixels (0: the
    identity), kernel taps -radius..radius normalised to sum 1, edges reflected (no darkening at
    the border)."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    safe = jnp.maximum(sigma, 1e-6)[:, None]
    k = jnp.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    k = jnp.where(sigma[:, None] > 0, k, (offsets[None, :] == 0).astype(jnp.float32))
    k = k / jnp.sum(k, axis=1, keepdims=True)  # [B, 2r + 1]
    pad = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = x.shape[1], x.shape[2]
    rows = sum(k[:, i, None, None, None] * pad[:, i : i + h, :, :] for i in range(2 * radius + 1))
    return sum(k[:, i, None, None, None] * rows[:, :, i : i + w, :] for i in range(2 * radius + 1))


def sr_conditioning(schedule: Schedule, low: jax.Array, size: tuple[int, int], s: jax.Array, key: jax.Array,
                    method: str = "bicubic") -> dict:
    """An SR network's conditioning for low-resolution images: ``{"image": upsample(z_s),
    "aug_level": s}`` with z_s = :func:`augment` (``low`` [B, h, w, C], ``s`` [B] int in [-1, T))."""
    z = augment(schedule, low, s, jax.random.normal(key, low.shape, low.dtype))
    return conditioning_of_noisy(z, size, s, method)


def conditioning_of_noisy(z: jax.Array, size: tuple[int, int], s: jax.Array, method: str = "bicubic") -> dict:
    """The conditioning of an already-noised z_s [B, h, w, C] at timesteps ``s`` [B] (a truncated
    lower stage's output, or the training transform's draw): ``{"image": upsample(z_s), "aug_level": s}``."""
    return {"image": upsample(z, size, method), "aug_level": jnp.asarray(s, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a cascade: a network with its params and schedule, what it produces and how it
    is sampled.

    Attributes:
      module, params, schedule: the network (``module.apply({"params": params}, x, t, cond)``) and
        its discrete schedule.
      image_shape: (H, W, C) of the stage's output.
      factor: 0 for the base stage; for an SR stage, the factor between its input and output
        (input [H/f, W/f, C]).
      upsample_method: how an SR stage's input is upsampled (as in its training).
      aug_level: an SR stage's augmentation level a in [0, 1] (s = round(a T) - 1).
      method, steps, eta, guidance, clip, variance, parameterization: the sampler settings of
        :func:`jdiff.inference.generate`.
    """

    module: Any
    params: Any
    schedule: Any
    image_shape: tuple[int, int, int]
    factor: int = 0
    upsample_method: str = "bicubic"
    aug_level: float = 0.0
    method: str = "dpm_solver++"
    steps: int | None = 25
    eta: float | None = None
    guidance: float = 0.0
    clip: Any = True
    variance: str = "fixed_small"
    parameterization: str = "eps"

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """(h, w, C) an SR stage takes, None for a base stage."""
        if not self.factor:
            return None
        h, w, c = self.image_shape
        return (h // self.factor, w // self.factor, c)

    def replace(self, **changes) -> "Stage":
        """A copy of this stage with the fields in ``changes`` replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_loaded(cls, loaded, **overrides) -> "Stage":
        """A stage from a loaded workdir (:func:`jdiff.workdir.load_for_sampling`): network, params,
        schedule and its config's sampler; an SR workdir (``data.transform='super_resolution'``)
        gets its factor and upsampling method from the config. ``overrides`` replace any field."""
        c = loaded.config
        factor, up = 0, "bicubic"
        if c.data.get("transform", "") == "super_resolution":
            kw = c.data.get("transform_kwargs", {})
            factor = int(kw.get("factor", 2))
            up = kw.get("method", "bicubic")
        fields = dict(
            module=loaded.model, params=loaded.params, schedule=loaded.schedule, image_shape=tuple(loaded.image_shape),
            factor=factor, upsample_method=up, aug_level=float(c.sample.get("aug_level", 0.0)),
            method=c.sample.method, steps=c.sample.steps, eta=c.sample.eta, guidance=float(c.sample.guidance),
            clip=c.sample.clip or None, variance=c.diffusion.variance, parameterization=c.diffusion.parameterization,
        )
        fields.update(overrides)
        return cls(**fields)


def _check_stages(stages: Sequence[Stage], aug_mode: str) -> list[Stage]:
    if aug_mode not in AUG_MODES:
        raise ValueError(f"aug_mode: expected one of {AUG_MODES}, got {aug_mode!r}")
    stages = list(stages)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise ValueError(f"stages: expected a non-empty sequence of jdiff.cascade.Stage, got {stages!r}")
    if stages[0].factor:
        raise ValueError(f"stages[0]: expected a base stage (factor 0), got an SR stage of factor {stages[0].factor}")
    for i, st in enumerate(stages):
        if not isinstance(st.schedule, Schedule):
            raise ValueError(f"stages[{i}].schedule: expected a discrete jdiff.schedules.Schedule (conditioning "
                             f"augmentation noises with its table), got {type(st.schedule).__name__}")
        if i == 0:
            continue
        if not st.factor:
            raise ValueError(f"stages[{i}]: expected an SR stage (factor > 0) after the base, got factor 0")
        check_aug_level(st.aug_level, f"stages[{i}].aug_level")
        if not getattr(st.module, "image_channels", 0) or not getattr(st.module, "aug_level_embedding", False):
            raise ValueError(f"stages[{i}].module: expected an SR network (image_channels > 0 and "
                             f"aug_level_embedding=True), got image_channels={getattr(st.module, 'image_channels', 0)}, "
                             f"aug_level_embedding={getattr(st.module, 'aug_level_embedding', False)}")
        h, w, c = st.image_shape
        if h % st.factor or w % st.factor:
            raise ValueError(f"stages[{i}].factor: {st.factor} does not divide its output size {h}x{w}")
        prev = tuple(stages[i - 1].image_shape)
        if prev != st.input_shape:
            raise ValueError(
                f"stages[{i}]: the stage before makes {prev[0]}x{prev[1]}x{prev[2]} images but this SR model takes "
                f"{st.input_shape[0]}x{st.input_shape[1]}x{st.input_shape[2]} (its output {h}x{w} / factor {st.factor})"
            )
        if aug_mode == "truncated":
            lo, hi = stages[i - 1].schedule, st.schedule
            if lo.num_timesteps != hi.num_timesteps or not np.allclose(
                    np.asarray(lo.alphas_cumprod), np.asarray(hi.alphas_cumprod), rtol=1e-5, atol=1e-7):
                raise ValueError(f"aug_mode: 'truncated' hands stage {i - 1}'s z_s to stage {i}, which needs one forward "
                                 f"process; their schedules differ (T = {lo.num_timesteps} and {hi.num_timesteps})")
    return stages


def _truncated_times(stage: Stage, s: int) -> np.ndarray:
    """The stage's own time sequence from T - 1, cut at the augmentation timestep s (kept as the
    last time, where the lower stage hands over z_s)."""
    times = samplers.time_sequence(stage.schedule, stage.steps, _spacing_of(stage))
    kept = times[times > s]
    return np.append(kept, s).astype(np.int32)


def _spacing_of(stage: Stage) -> str:
    """The spacing :func:`jdiff.samplers.sample` would use for the stage's method by default."""
    return getattr(stage.schedule, "default_spacing", None) or samplers._REGISTRY[stage.method].default_spacing


def cascade(
    stages: Sequence[Stage],
    num: int,
    key: jax.Array,
    *,
    labels: np.ndarray | None = None,
    aug_mode: str = "non_truncated",
    batch_size: int = 256,
    return_all: bool = False,
    mesh=None,
) -> np.ndarray | list[np.ndarray]:
    """Sample a cascade: the base stage draws ``num`` images, each SR stage upsamples the stage
    before (CDM sec. 4: Gaussian conditioning augmentation, non-truncated or, with
    ``aug_mode="truncated"``, truncated).

    Stage i > 0 at level a_i (``s_i = round(a_i T) - 1``), non-truncated: the output x of stage
    i - 1 is noised to ``z = alpha_s x + sigma_s eps`` and stage i samples with
    ``cond = {"image": upsample(z), "aug_level": s_i}``. Truncated: stage i - 1's reverse process
    stops at s_i and its z_{s_i} is handed over as it is (no extra noise). Every stage gets the same
    class ``labels`` [num] if it is class-conditional (a stage with ``num_classes=None`` ignores
    them), and its own keys ``fold_in(key, i)``.

    Returns the last stage's images [num, H, W, C] in [-1, 1], or with ``return_all`` the list of
    every stage's (for a truncated stage: the handed-over z_s).
    """
    from jdiff import inference  # inference imports the samplers; keep this module's import light

    stages = _check_stages(stages, aug_mode)
    num_classes = [getattr(st.module, "num_classes", None) for st in stages]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels: expected {num} int labels (shape ({num},)), got shape {labels.shape} dtype {labels.dtype}")
    levels = [None] + [aug_timestep(st.aug_level, st.schedule.num_timesteps) for st in stages[1:]]
    levels = [None if s is None else int(s) for s in levels]
    outputs, x = [], None
    for i, st in enumerate(stages):
        stage_key = jax.random.fold_in(key, i)
        stage_labels = labels if (labels is not None and num_classes[i] is not None) else None
        cond = None
        if i > 0:
            s = np.full((num,), levels[i], np.int32)
            if aug_mode == "truncated" or levels[i] < 0:
                cond = conditioning_of_noisy(jnp.asarray(x), st.image_shape[:2], jnp.asarray(s), st.upsample_method)
            else:
                cond = sr_conditioning(st.schedule, jnp.asarray(x), st.image_shape[:2], jnp.asarray(s),
                                       jax.random.fold_in(stage_key, 1), st.upsample_method)
            cond = {k: np.asarray(v) for k, v in cond.items()}
        timesteps = None
        if aug_mode == "truncated" and i + 1 < len(stages) and levels[i + 1] >= 0:
            timesteps = _truncated_times(st, levels[i + 1])
        x = inference.generate(
            st.module, st.params, st.schedule, tuple(st.image_shape), num, jax.random.fold_in(stage_key, 0),
            labels=stage_labels, cond=cond, guidance_weight=st.guidance, batch_size=batch_size, method=st.method,
            steps=None if timesteps is not None else st.steps, timesteps=timesteps, eta=st.eta, clip=st.clip,
            variance=st.variance, parameterization=st.parameterization, mesh=mesh,
        )
        outputs.append(x)
    return outputs if return_all else outputs[-1]


def super_resolve(
    stage: Stage,
    low_res: np.ndarray,
    key: jax.Array,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 256,
    mesh=None,
) -> np.ndarray:
    """Upsample given images with one SR stage: ``low_res`` [N, h, w, C] in [-1, 1] (h, w, C =
    ``stage.input_shape``), noised at ``stage.aug_level`` (non-truncated augmentation; 0 keeps it
    clean), returns [N, H, W, C]."""
    from jdiff import inference

    if not stage.factor:
        raise ValueError("stage: expected an SR stage (factor > 0), got a base stage")
    level = check_aug_level(stage.aug_level, "stage.aug_level")
    low_res = np.asarray(low_res, np.float32)
    if low_res.ndim != 4 or tuple(low_res.shape[1:]) != stage.input_shape:
        h, w, c = stage.input_shape
        raise ValueError(f"low_res: expected images [N, {h}, {w}, {c}] (the SR model's input: its {stage.image_shape[0]}x"
                         f"{stage.image_shape[1]} output / factor {stage.factor}), got shape {low_res.shape}")
    num = low_res.shape[0]
    base = Stage(module=None, params=None, schedule=stage.schedule, image_shape=stage.input_shape)
    _check_stages([base, stage.replace(aug_level=level)], "non_truncated")
    s = np.full((num,), int(aug_timestep(level, stage.schedule.num_timesteps)), np.int32)
    cond = sr_conditioning(stage.schedule, jnp.asarray(low_res), stage.image_shape[:2], jnp.asarray(s),
                           jax.random.fold_in(key, 1), stage.upsample_method)
    if labels is not None and getattr(stage.module, "num_classes", None) is None:
        raise ValueError("labels: the SR network is not class-conditional (num_classes is None)")
    return inference.generate(
        stage.module, stage.params, stage.schedule, tuple(stage.image_shape), num, jax.random.fold_in(key, 0),
        labels=labels, cond={k: np.asarray(v) for k, v in cond.items()}, guidance_weight=stage.guidance,
        batch_size=batch_size, method=stage.method, steps=stage.steps, eta=stage.eta, clip=stage.clip,
        variance=stage.variance, parameterization=stage.parameterization, mesh=mesh,
    )
