"""A network fine-tuned by low-rank adaptation (Hu et al. 2021, "LoRA", eq. 3), as a Flax module.

``LoRA(model_name="unet", model={...}, rank=4, alpha=4.0)`` builds the inner network
``jdiff.models.build(model_name, model)`` and is called exactly like it. Its params are

    {"model": <the inner network's params, the very tree it would have on its own>,
     "lora":  <jdiff.lora factors: kernel path P -> {"a": [fan_in, r], "b": [r, out]}>}

and each call applies the inner network to ``jdiff.lora.merge(model, lora, alpha)``, i.e. every
targeted kernel is ``W0 + (alpha / r) * a @ b`` (:mod:`jdiff.lora`). ``b`` starts at zero, so a
fresh LoRA network computes exactly what the inner network computes with ``params["model"]``.
Training only the factors is ``config.train.trainable = "lora/.*"`` (the inner params stay
frozen, with no optimizer state). LoRA adapts a trained network: its params go under ``model/``
(``config.train.init_from`` with ``config.train.init_map = ("model/=",)``). On a freshly
initialised U-Net the frozen, zero-initialised output conv blocks every gradient, so no factor
would ever move (unless the targets include ``decoder/conv_out/kernel``).

Registered as ``"lora"`` in :data:`jdiff.models.registry.MODELS` (by this module: the registry
cannot import it, since this module builds its inner network through the registry), so a
config says::

    config.model_name = "lora"
    config.model = {"model_name": "unet", "model": {<UNet fields>}, "rank": 4, "alpha": 4.0}
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import flax.core
import flax.linen as nn
import jax

from jdiff import lora as lora_lib
from jdiff.models import registry

__all__ = ["LoRA", "merged"]


@contextlib.contextmanager
def _detached() -> Iterator[None]:
    """Build modules with no parent. Flax attaches a module constructed while another module's
    method runs (its ``module_stack``) to that module as a submodule; the inner network is not one
    (its params are a single param of the wrapper, applied with ``inner.apply``)."""
    stack = nn.module._context.module_stack  # noqa: SLF001 - the only handle on flax's parent context
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


def _freeze(value: Any) -> Any:
    """A hashable copy of a config value: mappings -> FrozenDict, lists and tuples -> tuples."""
    if hasattr(value, "to_dict"):  # an ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return flax.core.FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class LoRA(nn.Module):
    """An inner network whose targeted kernels are adapted by trainable low-rank factors.

    Fields:
      model_name: the inner network's name for :func:`jdiff.models.registry.resolve` ("unet",
        "controlnet", "package.module:Class", ...).
      model: the inner network's fields, a mapping or ConfigDict (None: its defaults). Stored
        as a ``FrozenDict`` (lists become tuples) so the module stays hashable (``jax.jit`` with
        the module static).
      rank: r, the rank of every update (an int >= 1, at most min(fan_in, out) of each target).
      alpha: the update is scaled by alpha / r (Hu et al. 2021, sec. 4.1); alpha = rank gives 1.
      targets: regex (``re.fullmatch``) over the inner network's '/'-joined param paths
        selecting the kernels to adapt (:data:`jdiff.lora.DEFAULT_TARGETS`: attention projections
        and residual-block 3x3 convs).

    Call: exactly the inner network's, ``(x, t, cond=None, train=False, **kwargs)`` -> its output
    (for a U-Net ``x: [B, H, W, C]``, ``t: [B]`` -> ``[B, H, W, C_out]``). With ``train=True`` the
    wrapper's ``"dropout"`` rng (if given) feeds the inner network's dropout.

    The attributes jdiff reads off a network (``num_classes``, ``image_channels``, ``context_dim``,
    ``aug_level_embedding``, ``learn_sigma``, ``out_channels``, ``control_channels``) are the inner
    network's, so training, sampling and evaluation treat the wrapper as the network it wraps.
    """

    model_name: str = "unet"
    model: Any = None
    rank: int = 4
    alpha: float = 4.0
    targets: str = lora_lib.DEFAULT_TARGETS

    def __post_init__(self):
        lora_lib.check_rank(self.rank)
        lora_lib.check_alpha(self.alpha)
        lora_lib.check_targets(self.targets)
        cfg = {} if self.model is None else self.model
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        if not isinstance(cfg, Mapping):
            raise ValueError(f"model: expected the inner network's fields as a mapping or ConfigDict (or None), "
                             f"got {type(cfg).__name__}")
        object.__setattr__(self, "model", _freeze(cfg))
        try:
            cls = registry.resolve(self.model_name)
        except ValueError as e:
            raise ValueError(f"model_name: {e}") from None
        if issubclass(cls, LoRA):
            raise ValueError(f"model_name: {self.model_name!r} is a LoRA wrapper; expected the network to adapt "
                             "(e.g. 'unet'), whose kernels the factors target")
        with _detached():
            try:
                inner = registry.build(self.model_name, self.model)
            except ValueError as e:
                raise ValueError(f"model (the fields of {self.model_name!r}): {e}") from None
        object.__setattr__(self, "_inner", inner)
        super().__post_init__()

    @property
    def inner(self) -> nn.Module:
        """The inner network (unbound); ``inner.apply({"params": params["model"]}, ...)`` is the
        network without its LoRA update."""
        return self._inner

    @property
    def scale(self) -> float:
        """alpha / r, the factor of every low-rank update."""
        return float(self.alpha) / int(self.rank)

    @property
    def meta(self) -> dict:
        """What :func:`jdiff.lora.save` should store beside the factors to rebuild this module:
        ``{"model_name", "model", "rank", "alpha", "targets"}`` as plain JSON values."""
        return {"model_name": self.model_name, "model": _thaw(self.model), "rank": int(self.rank),
                "alpha": float(self.alpha), "targets": self.targets}

    # The inner network's attributes, under the defaults jdiff's getattr(module, ...) calls use.
    @property
    def num_classes(self) -> Optional[int]:
        """The inner network's ``num_classes`` (None if it has none: unconditional)."""
        return getattr(self._inner, "num_classes", None)

    @property
    def image_channels(self) -> int:
        """The inner network's ``image_channels``, the channels of ``cond["image"]`` (0 if it has none)."""
        return getattr(self._inner, "image_channels", 0)

    @property
    def context_dim(self) -> Optional[int]:
        """The inner network's ``context_dim``, the width of its cross-attention context (None if it has none)."""
        return getattr(self._inner, "context_dim", None)

    @property
    def aug_level_embedding(self) -> bool:
        """The inner network's ``aug_level_embedding``: whether it reads ``cond["aug_level"]`` (False if it
        has none)."""
        return getattr(self._inner, "aug_level_embedding", False)

    @property
    def learn_sigma(self) -> bool:
        """The inner network's ``learn_sigma``: whether it also outputs a variance (False if it has none)."""
        return getattr(self._inner, "learn_sigma", False)

    @property
    def out_channels(self) -> Optional[int]:
        """The inner network's ``out_channels`` (None if it has none: the channels of ``x``)."""
        return getattr(self._inner, "out_channels", None)

    @property
    def control_channels(self) -> tuple:
        """The inner network's ``control_channels``, one per ControlNet (() if it has none)."""
        return getattr(self._inner, "control_channels", ())

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]] = None,
                 train: bool = False, **kwargs) -> Any:
        inner = self._inner
        # The inner network's params, initialised by the inner network itself on this call's
        # inputs (train=False: initialisation needs no dropout rng), so the tree is its own.
        model_params = self.param(
            "model", lambda key: inner.init({"params": key}, x, t, cond=cond, train=False, **kwargs)["params"])
        factors = self.param("lora", lambda key: lora_lib.init(key, model_params, self.rank, self.targets))
        rngs = {"dropout": self.make_rng("dropout")} if train and self.has_rng("dropout") else None
        merged = lora_lib.merge(model_params, factors, self.alpha)
        return inner.apply({"params": merged}, x, t, cond=cond, train=train, rngs=rngs, **kwargs)


if "lora" not in registry.MODELS:  # a reload of this module re-registers nothing
    registry.register("lora", LoRA)


def merged(module: nn.Module, params: Any) -> tuple[nn.Module, Any]:
    """``(network, params)`` to run at the base network's cost: for a :class:`LoRA`, its inner
    network with the factors merged into the kernels (W + (alpha / r) A B, Hu et al. 2021 sec.
    4.1: "no additional inference latency"); any other module is returned as it is."""
    if not isinstance(module, LoRA):
        return module, params
    return module.inner, lora_lib.merge(params["model"], params["lora"], module.alpha)
