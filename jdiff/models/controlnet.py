"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a frozen U-Net steered by a trainable copy of its encoder that sees a control image.

Eq. (2) of the paper, for one locked block F(.; Theta) and its trainable copy Theta_c:

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)

with Z zero-initialised convolutions. For the whole U-Net (the paper's Stable Diffusion construction, adapted):

- the control image c ``[B, H, W, Cc]`` passes through a small hint encoder (3x3 convs and
  SiLU at full resolution; the paper's 4x4 stride-2 convs map 512 pixels to a 64 latent, which
  a pixel-space model does not need) ending in a zero-initialised 3x3 conv, and is added to the
  copy's features after its input conv (:class:`~jdiff.models.unet.UNetEncoder`'s
  ``input_residual``);
- the copy is a :class:`~jdiff.models.unet.UNetEncoder` with the base's very fields, so its
  param tree is the base's ``encoder`` tree and starts as a copy of it;
- each of its outputs (every skip connection and the middle block's output) goes through a
  zero-initialised 1x1 conv and is added, times the control scale, to the matching input of
  the frozen decoder (:class:`~jdiff.models.unet.UNet`'s ``skip_residuals``).

At initialisation every zero conv outputs exact zeros, so the controlled network's output is
the base network's, bit for bit. :class:`ControlledUNet` holds the base U-Net (``"base"``) and
one or more ControlNets (``"control_0"``, ``"control_1"``, ...): several ControlNets trained
separately add their (scaled) residuals, the zero-shot composition of the paper ("multiple
conditions"). The network knows nothing of diffusion: the train step makes only the
``control_*`` params trainable (``config.train.trainable``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.layers import Conv, default_init
from jdiff.models.unet import UNet, UNetEncoder, _UNetFields

__all__ = ["ControlNet", "ControlledUNet", "control_name"]


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def control_name(i: int) -> str:
    """The param-tree name of the ``i``-th ControlNet of a :class:`ControlledUNet`."""
    return f"control_{i}"


def _zero_conv(features: int, kernel: int, dtype, name: str) -> Conv:
    pad = kernel // 2
    return Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=default_init(0.0), name=name)


class ControlNet(_UNetFields):
    """The control branch: hint encoder, a trainable copy of the U-Net encoder, zero convs.

    Fields: the trunk fields of the base :class:`~jdiff.models.unet.UNet` (they must be the
    base's, so the copy has the base encoder's param tree) and ``hint_channels``, the widths of
    the hint encoder's 3x3 convs before its zero conv.

    Call: ``x: [B, H, W, C]``, ``t: [B]``, ``control: [B, H, W, Cc]`` float, ``cond``: the base
    network's conditioning (label, image, context, aug_level; no "control"), ``train``.
    Returns the residuals for ``UNet(..., skip_residuals=...)``: one ``[B, h, w, c]`` array per
    skip connection, shallowest first, then one for the middle block's output (float32).
    """

    hint_channels: Sequence[int] = (16, 32)

    def __post_init__(self):
        hc = self.hint_channels
        if not isinstance(hc, (tuple, list)) or not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0 for c in hc):
            raise ValueError(f"hint_channels: expected a tuple of positive ints (may be empty), got {hc!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, control: jax.Array,
                 cond: Optional[Mapping[str, jax.Array]] = None, train: bool = False) -> tuple:
        B, H, W, _ = _shape(x)
        if np.ndim(control) != 4 or _shape(control)[:3] != (B, H, W):
            raise ValueError(f"control: expected [{B}, {H}, {W}, Cc] (the batch and size of x), got shape {_shape(control)}")
        h = control.astype(self.dtype)
        for i, c in enumerate(self.hint_channels):
            h = nn.swish(Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                                 kernel_init=default_init(), name=f"hint_conv_{i}")(h))
        hint = _zero_conv(self.base_channels, 3, self.dtype, "hint_zero_conv")(h)
        enc = UNetEncoder(**self._shared_fields(UNetEncoder), name="encoder")(x, t, cond, train, input_residual=hint)
        outs = list(enc.skips) + [enc.h]
        return tuple(_zero_conv(o.shape[-1], 1, self.dtype, f"zero_conv_{i}")(o).astype(jnp.float32)
                     for i, o in enumerate(outs))


class ControlledUNet(_UNetFields):
    """A U-Net (``"base"``) steered by ControlNets (``"control_0"``, ...): eq. (2) of Zhang et al.

    Fields: the architecture fields of :class:`~jdiff.models.unet.UNet` (its ``out_channels``
    and ``learn_sigma`` too), plus
      control_channels: the channels Cc_i of each ControlNet's control image; ``cond["control"]``
        is their concatenation ``[B, H, W, sum(Cc_i)]``, split in that order;
      control_scale: one float per ControlNet, multiplying its residuals (1.0 in training; the
        paper's "control strength" at inference, 0 gives the base model exactly);
      hint_channels: the hint encoders' conv widths (:class:`ControlNet`).

    Call like :class:`~jdiff.models.unet.UNet`: ``(x [B, H, W, C], t [B], cond, train)`` with
    ``cond["control"]`` required. Params: ``{"base": <UNet params>, "control_i": <ControlNet
    params>}``; ``control_i/encoder`` has exactly the tree of ``base/encoder``.
    """

    out_channels: Optional[int] = None
    learn_sigma: bool = False
    control_channels: Sequence[int] = (1,)
    control_scale: Sequence[float] = (1.0,)
    hint_channels: Sequence[int] = (16, 32)

    def __post_init__(self):
        cc, cs = self.control_channels, self.control_scale
        if not isinstance(cc, (tuple, list)) or not cc or not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0 for c in cc):
            raise ValueError(f"control_channels: expected a non-empty tuple of positive ints (one per ControlNet), got {cc!r}")
        if not isinstance(cs, (tuple, list)) or len(cs) != len(cc) or not all(
                isinstance(s, (int, float, np.number)) and not isinstance(s, bool) and np.isfinite(s) for s in cs):
            raise ValueError(f"control_scale: expected {len(cc)} finite float(s), one per ControlNet "
                             f"(control_channels={tuple(cc)}), got {cs!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]] = None,
                 train: bool = False) -> jax.Array:
        cond = dict(cond or {})
        total = int(sum(self.control_channels))
        if "control" not in cond:
            raise ValueError(f"cond['control']: expected the control image [B, H, W, {total}] (control_channels="
                             f"{tuple(self.control_channels)}), got none; cond has keys {sorted(cond)}")
        control = cond.pop("control")
        want = _shape(x)[:3] + (total,)
        if _shape(control) != want:
            raise ValueError(f"cond['control']: expected shape {want} (x's batch and size, sum(control_channels)="
                             f"{total} channels), got shape {_shape(control)}")
        residuals = None
        start = 0
        for i, (c, s) in enumerate(zip(self.control_channels, self.control_scale)):
            net = ControlNet(**self._shared_fields(ControlNet), name=control_name(i))
            res = net(x, t, control[..., start:start + c], cond, train)
            start += c
            res = tuple(float(s) * r for r in res) if float(s) != 1.0 else res
            residuals = res if residuals is None else tuple(a + b for a, b in zip(residuals, res))
        return UNet(**self._shared_fields(UNet), name="base")(x, t, cond, train, skip_residuals=residuals)
