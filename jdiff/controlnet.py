"""ControlNet at inference (Zhang et al. 2023): the control strength, and several ControlNets at once.

A trained ControlNet workdir holds a :class:`~jdiff.models.controlnet.ControlledUNet` whose
params are ``{"base": <the frozen U-Net>, "control_0": <the ControlNet>}``; it samples like any
network (``jdiff.inference.generate`` with ``cond={"control": [N, H, W, Cc]}``, classifier-free
guidance on the label with the control kept in both halves). This module adds:

- :func:`with_scale`: the same network with other control strengths (the residuals of
  ControlNet i are multiplied by ``s_i``; 0 gives the base model exactly);
- :func:`compose`: ControlNets trained separately on one base, summed (the paper's
  multi-condition composition: ``y = F(x; Theta) + sum_i s_i Z_i(...)``), as one
  ControlledUNet whose ``cond["control"]`` is their control images concatenated on channels.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from jdiff.models.controlnet import ControlledUNet, control_name

__all__ = ["with_scale", "compose"]


def _check_scales(scales: Any, n: int, name: str = "scales") -> tuple[float, ...]:
    if isinstance(scales, (int, float, np.floating)) and not isinstance(scales, bool):
        scales = (float(scales),) * n
    if not isinstance(scales, (tuple, list)) or len(scales) != n or not all(
            isinstance(s, (int, float, np.floating)) and not isinstance(s, bool) and np.isfinite(s) for s in scales):
        raise ValueError(f"{name}: expected one finite control scale or {n} (one per ControlNet), got {scales!r}")
    return tuple(float(s) for s in scales)


def with_scale(module: ControlledUNet, scales: float | Sequence[float]) -> ControlledUNet:
    """``module`` with control strengths ``scales`` (one float for all ControlNets, or one each)."""
    if not isinstance(module, ControlledUNet):
        raise ValueError(f"module: expected a ControlledUNet (a ControlNet workdir's network), got {type(module).__name__}")
    return module.clone(control_scale=_check_scales(scales, len(module.control_channels)))


def compose(nets: Sequence[tuple[ControlledUNet, Any]], scales: float | Sequence[float] = 1.0
            ) -> tuple[ControlledUNet, dict]:
    """Several ControlNets over one base U-Net as one network: ``(module, params)``.

    ``nets``: ``(module, params)`` pairs of ControlledUNets with one ControlNet each, trained on
    the same base (their ``base`` params must be bit-identical, as training keeps them). The
    result's ControlNet i is ``nets[i]``'s; its ``cond["control"]`` is the concatenation of their
    control images on the channel axis, in order, and ``scales`` their strengths.
    """
    if not isinstance(nets, (tuple, list)) or not nets:
        raise ValueError(f"nets: expected a non-empty sequence of (ControlledUNet, params) pairs, got {nets!r}")
    first, first_params = nets[0]
    for i, (m, p) in enumerate(nets):
        if not isinstance(m, ControlledUNet) or len(m.control_channels) != 1:
            raise ValueError(f"nets[{i}]: expected a ControlledUNet with one ControlNet, got {type(m).__name__}"
                             f"{'' if not isinstance(m, ControlledUNet) else f' with {len(m.control_channels)}'}")
        mine = m.clone(control_channels=first.control_channels, control_scale=first.control_scale,
                       hint_channels=first.hint_channels)
        if mine != first:
            raise ValueError(f"nets[{i}]: its base U-Net's fields differ from nets[0]'s; expected ControlNets of one base")
        if i:
            a = traverse_util.flatten_dict(dict(first_params["base"]), sep="/")
            b = traverse_util.flatten_dict(dict(p["base"]), sep="/")
            same = a.keys() == b.keys() and all(np.array_equal(jax.device_get(a[k]), jax.device_get(b[k])) for k in a)
            if not same:
                raise ValueError(f"nets[{i}]: its base params differ from nets[0]'s; expected ControlNets trained on the "
                                 "same base workdir")
    hint = {m.hint_channels for m, _ in nets}
    if len(hint) != 1:
        raise ValueError(f"nets: the ControlNets' hint_channels differ ({sorted(hint)}); expected one hint encoder layout")
    module = first.clone(control_channels=tuple(int(m.control_channels[0]) for m, _ in nets),
                         control_scale=_check_scales(scales, len(nets)))
    params = {"base": first_params["base"]}
    for i, (_, p) in enumerate(nets):
        params[control_name(i)] = p[control_name(0)]
    return module, params
