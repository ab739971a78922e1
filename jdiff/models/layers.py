"""Building blocks shared by the U-Net, the noise-aware classifier and ControlNet.

All modules take NHWC images ``[B, H, W, C]`` and a time embedding ``emb: [B, E]`` where they
need one. Parameters are float32; ``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``);
normalisation statistics and attention softmaxes are computed in float32 whatever ``dtype`` is.

Sources: Ho et al. 2020 (DDPM, appendix B and the reference ``diffusion_tf`` U-Net),
Dhariwal & Nichol 2021 (ADM: adaptive group norm, BigGAN up/down residual blocks,
multi-head attention, attention pooling), Song et al. 2021 (score SDE: random Fourier
features), Vaswani et al. 2017 (sinusoidal embedding, scaled dot-product attention), Rombach
et al. 2022 (LDM: cross-attention to context tokens).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Dtype",
    "conv_general_dilated",
    "Conv",
    "default_init",
    "norm_groups",
    "GroupNorm",
    "group_norm",
    "sinusoidal_embedding",
    "fourier_features",
    "TimestepEmbedding",
    "ResBlock",
    "AttentionBlock",
    "CrossAttention",
    "Downsample",
    "Upsample",
    "AttentionPool2d",
    "heads_for",
    "upsample_nearest",
    "avg_pool_2x",
    "TIME_EMBEDDINGS",
]

Dtype = Any
"""The type of the modules' ``dtype`` fields: a JAX dtype such as ``jnp.float32`` or
``jnp.bfloat16``, the dtype of the computation (params and normalisation statistics stay float32)."""

TIME_EMBEDDINGS = ("sinusoidal", "fourier")
"""The time embeddings of :class:`TimestepEmbedding` (a U-Net's ``time_embedding``):
``sinusoidal`` (DDPM, Transformer-style) and ``fourier`` (random Fourier features of continuous
time, score SDE's; Song et al. 2021)."""


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` (same arguments, same value, same derivatives), with a JVP
    whose transpose XLA:CPU runs as a library convolution inside loops.

    Reverse mode transposes the input tangent's convolution into a convolution of the cotangent
    with the flipped kernel whose input and output feature axes swap roles in the dimension
    numbers (``dim_labels=..._01oi->...`` for HWIO). Outside a loop XLA:CPU moves that kernel
    into its canonical layout and calls Eigen; inside a ``while`` body (every sampler's
    ``lax.scan``) it does not, and emits a naive loop nest: grad_x of a classifier in classifier
    or CLIP guidance ran 20x slower per step than the same gradient unrolled at XLA's default
    optimisation level, 100x at -O0 (BENCHMARKS.md, "Input gradients inside a sampler's loop").
    Here the input tangent is convolved with the kernel's feature axes swapped in memory and in
    the dimension numbers (the same linear map), so its transpose names the axes canonically.
    Forward-mode tangents (``jax.jvp``) are the same numbers as lax's. Grouped convolutions go
    to lax unchanged.
    """
    kw = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              precision=precision, preferred_element_type=preferred_element_type)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if feature_group_count != 1 or batch_group_count != 1:
        return lax.conv_general_dilated(lhs, rhs, dimension_numbers=dn, feature_group_count=feature_group_count,
                                        batch_group_count=batch_group_count, **kw)
    lhs_spec, rhs_spec, out_spec = dn
    o, i = rhs_spec[0], rhs_spec[1]
    swapped = lax.ConvDimensionNumbers(lhs_spec, (i, o) + tuple(rhs_spec[2:]), out_spec)

    @jax.custom_jvp
    def conv(x, w):
        return lax.conv_general_dilated(x, w, dimension_numbers=dn, **kw)

    def conv_jvp(primals, tangents):
        x, w = primals
        dx, dw = tangents
        out = lax.conv_general_dilated(x, w, dimension_numbers=dn, **kw)
        dout = None
        if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
            dout = lax.conv_general_dilated(dx, jnp.swapaxes(w, o, i), dimension_numbers=swapped, **kw)
        if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
            d = lax.conv_general_dilated(x, dw, dimension_numbers=dn, **kw)
            dout = d if dout is None else dout + d
        return out, (jnp.zeros_like(out) if dout is None else dout)

    conv.defjvp(conv_jvp, symbolic_zeros=True)
    return conv(lhs, rhs)


class Conv(nn.Conv):
    """``flax.linen.Conv`` computing with :func:`conv_general_dilated`: the same params, values and
    gradients, and input gradients inside a sampler's loop at library speed on XLA:CPU."""

    conv_general_dilated: Any = conv_general_dilated


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Glorot-uniform ("fan_avg", uniform) initialiser, as in the DDPM reference code.

    ``scale=0`` gives exact zeros (DDPM's ``init_scale=0.``): residual branches and output
    projections start at zero so a fresh block is the identity and a fresh network outputs 0.
    """
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for ``channels``: the largest divisor of ``channels`` that is
    at most ``max_groups`` and leaves at least 2 channels per group.

    Wu & He 2018 use 32 groups; with the 8-16 channels of tiny test networks 32 does not divide
    C, and one channel per group would make a 1x1 feature map normalise to exactly zero.
    """
    if channels < 1:
        raise ValueError(f"channels: expected a positive channel count, got {channels}")
    if channels == 1:
        return 1
    cap = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018, eq. 1-3) computed from per-channel moments.

    y = (x - mu_g) / sqrt(sigma_g^2 + eps) * scale + bias, with mu_g and sigma_g^2 the mean and
    variance over the spatial positions and the C / G channels of group g, per example.

    The same function and parameters (``scale`` [C], ``bias`` [C]) as ``flax.linen.GroupNorm``
    with ``use_fast_variance=False``, computed in an order XLA:CPU runs faster: each moment is a
    reduction over space of the channels-last array (contiguous), then a small sum over the
    channels of each group, instead of one reduction over a reshaped [.., G, C/G] array. The
    variance is two-pass (mean first, then the mean of squared deviations), as flax's. Statistics
    are float32 whatever ``dtype`` is.

    Call: ``x: [B, *spatial, C]`` -> same shape, ``dtype``.
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        C = x.shape[-1]
        G = self.num_groups
        if C % G:
            raise ValueError(f"num_groups: expected a divisor of the channel count {C}, got {G}")
        scale = self.param("scale", nn.initializers.ones_init(), (C,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (C,), self.param_dtype)
        xf = x.astype(jnp.float32)
        space = tuple(range(1, x.ndim - 1))
        lead = x.shape[:1] + (1,) * len(space)

        def group_mean(per_channel):  # [B, C] -> [B, 1.., C], each channel given its group's mean
            g = per_channel.reshape(-1, G, C // G).mean(axis=-1, keepdims=True)
            return jnp.broadcast_to(g, g.shape[:2] + (C // G,)).reshape(lead + (C,))

        mean = group_mean(xf.mean(axis=space))
        centred = xf - mean
        var = group_mean(jnp.square(centred).mean(axis=space))
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def group_norm(
    channels: int, dtype: Dtype, name: Optional[str] = None, groups: Optional[int] = None, eps: float = 1e-6
) -> GroupNorm:
    """A :class:`GroupNorm` over ``channels`` with float32 statistics: ``groups`` groups (None:
    :func:`norm_groups`, the rule jdiff's own networks use; imported networks give the count
    they were trained with, e.g. 32) and ``eps`` (jdiff, DDPM: 1e-6; OpenAI, PyTorch: 1e-5)."""
    return GroupNorm(num_groups=norm_groups(channels) if groups is None else groups, epsilon=eps, dtype=dtype, name=name)


def _check_t(t: jax.Array, name: str = "t") -> jax.Array:
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"{name}: expected shape [batch], got shape {tuple(t.shape)}")
    if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
        raise ValueError(f"{name}: expected an int or float array, got dtype {t.dtype}")
    return t


def sinusoidal_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False, freq_shift: float = 1.0
) -> jax.Array:
    """Transformer sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5), as in DDPM.

    emb[b, i] = sin(t_b * f_i), emb[b, half + i] = cos(t_b * f_i) for i < half = dim // 2, with
    f_i = exp(-log(max_period) * i / (half - freq_shift)). The default ``freq_shift=1`` is the
    DDPM reference's spacing (the lowest frequency is exactly 1 / max_period); OpenAI's
    improved / guided diffusion use ``freq_shift=0`` and ``flip_sin_to_cos=True`` (cos first),
    as diffusers' ``Timesteps(flip_sin_to_cos, downscale_freq_shift)`` does. An odd ``dim`` gets
    a trailing zero column.

    Args:
      t: ``[B]`` int or float timesteps (fractional values are fine).
      dim: embedding width, at least 4.
    Returns:
      ``[B, dim]`` float32.
    """
    t = _check_t(t)
    if dim < 4:
        raise ValueError(f"dim: expected an embedding width of at least 4, got {dim}")
    half = dim // 2
    if not half - freq_shift > 0:
        raise ValueError(f"freq_shift: expected less than dim // 2 = {half}, got {freq_shift}")
    # Frequencies are static: computed in float64 and rounded once, so the only float32 error
    # left is the rounding of t * f (relative 2^-24 of the argument).
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    pair = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(pair, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_features(t: jax.Array, dim: int, scale: float = 16.0, seed: int = 0) -> jax.Array:
    """Random Fourier features of continuous time (Tancik et al. 2020; score SDE's
    ``GaussianFourierProjection``, Song et al. 2021).

    emb = [sin(2 pi t W), cos(2 pi t W)] with W ~ N(0, scale^2) of size dim // 2. score_sde
    stores W as a parameter and stops its gradient; here W is a constant drawn from ``seed``
    so no optimizer (weight decay included) can move it and the config alone fixes it.

    Args:
      t: ``[B]`` int or float (continuous time, or score_sde's log sigma).
      dim: even embedding width.
    Returns:
      ``[B, dim]`` float32.
    """
    t = _check_t(t)
    if dim < 2 or dim % 2:
        raise ValueError(f"dim: expected an even embedding width >= 2, got {dim}")
    w = jax.random.normal(jax.random.key(seed), (dim // 2,), jnp.float32) * scale
    args = 2.0 * jnp.pi * t.astype(jnp.float32)[:, None] * w[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    """``t`` -> sinusoidal or Fourier features -> Dense -> swish -> Dense (DDPM appendix B).

    Attributes:
      features: width of the sinusoidal / Fourier features (DDPM: the base channel count).
      hidden: output width (DDPM: 4 x base channels).
      kind: "sinusoidal" or "fourier".
      flip_sin_to_cos, freq_shift: the sinusoidal layout (:func:`sinusoidal_embedding`).
    Call: ``t: [B]`` int or float -> ``[B, hidden]``.
    """

    features: int
    hidden: int
    kind: str = "sinusoidal"
    fourier_scale: float = 16.0
    fourier_seed: int = 0
    dtype: Dtype = jnp.float32
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        if self.kind == "sinusoidal":
            emb = sinusoidal_embedding(t, self.features, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        elif self.kind == "fourier":
            emb = fourier_features(t, self.features, self.fourier_scale, self.fourier_seed)
        else:
            raise ValueError(f"kind: expected one of {TIME_EMBEDDINGS}, got {self.kind!r}")
        dense = lambda name: nn.Dense(
            self.hidden, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=default_init(), name=name
        )
        emb = dense("dense0")(emb.astype(self.dtype))
        return dense("dense1")(nn.swish(emb))


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling: ``[B, H, W, C] -> [B, 2H, 2W, C]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2: ``[B, H, W, C] -> [B, H/2, W/2, C]``."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _conv(features: int, dtype: Dtype, *, kernel: int = 3, stride: int = 1, init_scale: float = 1.0, name=None):
    pad = kernel // 2
    return Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=default_init(init_scale),
        name=name,
    )


class Downsample(nn.Module):
    """Halve the resolution: a 3x3 stride-2 conv (``use_conv``) or 2x2 average pooling (DDPM).

    ``padding``: 1 pads the conv by one pixel on every side (OpenAI, diffusers' default); 0 pads
    one pixel on the bottom and right only, TensorFlow's "SAME" for stride 2 (the DDPM reference,
    diffusers' ``downsample_padding=0``). Both give ``[B, H/2, W/2, C]`` for even H, W.
    """

    use_conv: bool = True
    dtype: Dtype = jnp.float32
    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding not in (0, 1):
            raise ValueError(f"padding: expected 0 (bottom/right, TF 'SAME') or 1 (every side), got {self.padding!r}")
        if self.use_conv:
            pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
            return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=default_init(), name="conv")(x)
        return avg_pool_2x(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv if ``use_conv`` (DDPM)."""

    use_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.use_conv:
            x = _conv(x.shape[-1], self.dtype, name="conv")(x)
        return x


class ResBlock(nn.Module):
    """Residual block with time conditioning (DDPM appendix B; ADM sec. 3).

    h = conv1(swish(GN(x)))                       (resampled between swish and conv1 if ``resample``)
    plain:        h = conv2(dropout(swish(GN(h + Dense(swish(emb))))))
    scale-shift:  h = conv2(dropout(swish(GN(h) * (1 + s) + b))), [s, b] = Dense(swish(emb))
                  (adaptive group norm, ADM eq. in sec. 3 "AdaGN")
    out = skip(x) + h, skip = 1x1 conv when the channel count changes, else identity.
    conv2 is zero-initialised, so a fresh block is the identity (or a 1x1 projection).

    Attributes:
      out_channels: output channels (None: same as input).
      resample: None, "up" (nearest 2x) or "down" (2x2 average pool), applied to both branches
        (BigGAN-style up/down blocks, ADM's ``resblock_updown``).
      norm_groups, norm_eps: the group norms' groups (None: :func:`~jdiff.models.layers.norm_groups`)
        and epsilon.
    Call: ``x: [B, H, W, C]``, ``emb: [B, E]`` -> ``[B, H', W', out_channels]``.
    """

    out_channels: Optional[int] = None
    dropout: float = 0.0
    scale_shift_norm: bool = False
    resample: Optional[str] = None
    dtype: Dtype = jnp.float32
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        if self.resample not in (None, "up", "down"):
            raise ValueError(f"resample: expected None, 'up' or 'down', got {self.resample!r}")
        in_ch = x.shape[-1]
        out_ch = self.out_channels or in_ch
        h = nn.swish(group_norm(in_ch, self.dtype, "norm1", self.norm_groups, self.norm_eps)(x))
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = avg_pool_2x(h), avg_pool_2x(x)
        h = _conv(out_ch, self.dtype, name="conv1")(h)

        emb_out = nn.Dense(
            2 * out_ch if self.scale_shift_norm else out_ch,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=default_init(),
            name="temb_proj",
        )(nn.swish(emb.astype(self.dtype)))[:, None, None, :]
        norm2 = group_norm(out_ch, self.dtype, "norm2", self.norm_groups, self.norm_eps)
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm2(h) * (1.0 + scale) + shift
        else:
            h = norm2(h + emb_out)
        h = nn.swish(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(out_ch, self.dtype, init_scale=0.0, name="conv2")(h)

        if in_ch != out_ch:
            x = _conv(out_ch, self.dtype, kernel=1, name="nin_shortcut")(x)
        return x + h


def heads_for(channels: int, num_heads: int, head_channels: Optional[int] = None) -> int:
    """Attention heads over ``channels``: ``channels / head_channels`` when ``head_channels`` is
    set, else ``num_heads``; a ValueError names the one that does not divide ``channels``."""
    if head_channels is not None:
        if not isinstance(head_channels, (int, np.integer)) or head_channels < 1 or channels % head_channels:
            raise ValueError(f"head_channels: expected a positive divisor of the channel count {channels}, got {head_channels!r}")
        return channels // head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"num_heads: expected a positive divisor of the channel count {channels}, got {num_heads}")
    return num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H x W positions, residual (DDPM ``attn_block``; ADM).

    out = x + proj_out(MHA(GN(x))), MHA with q, k, v = 1x1 projections, softmax(q k^T / sqrt(d))
    per head of width d = C / num_heads (Vaswani et al. 2017, eq. 1). ``proj_out`` is
    zero-initialised, so a fresh block is the identity.

    ``head_channels`` (ADM's ``num_head_channels``, diffusers' ``attention_head_dim``), when set,
    fixes the head width instead: ``C / head_channels`` heads. ``norm_groups`` / ``norm_eps``: the
    group norm's groups (None: :func:`~jdiff.models.layers.norm_groups`) and epsilon.

    Call: ``x: [B, H, W, C]`` -> same shape. C must be divisible by ``num_heads`` (or by
    ``head_channels``).
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32
    head_channels: Optional[int] = None
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        num_heads = heads_for(C, self.num_heads, self.head_channels)
        d = C // num_heads
        h = group_norm(C, self.dtype, "norm", self.norm_groups, self.norm_eps)(x)
        dense = lambda name, scale=1.0: nn.Dense(
            C, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=default_init(scale), name=name
        )
        heads = lambda a: a.reshape(B, H * W, num_heads, d)
        q, k, v = (heads(dense(n)(h)) for n in ("q", "k", "v"))
        # Logits and softmax in float32 whatever the dtype (XLA implementation).
        out = jax.nn.dot_product_attention(q, k, v).reshape(B, H, W, C)
        return x + dense("proj_out", 0.0)(out)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from the H x W positions to context tokens, residual
    (Rombach et al. 2022, LDM sec. 3.3; GLIDE / Imagen's text conditioning).

    out = x + proj_out(MHA(q = Dense(GN(x)), k, v = [null; Dense(context)], mask = [True; mask]))

    One learned null key/value token is always visible, so a context whose every token is masked
    out (the null conditioning of classifier-free guidance) attends to it alone: the output is
    well defined, finite, and the same whatever the masked tokens hold. ``proj_out`` is
    zero-initialised, so a fresh block is the identity.

    Call: ``x: [B, H, W, C]``, ``context: [B, L, D]`` float, ``context_mask: [B, L]`` bool
    (True = real token) or None (every token real) -> ``[B, H, W, C]``. C must be divisible by
    ``num_heads``.
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32
    head_channels: Optional[int] = None  # as AttentionBlock's
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, context_mask: Optional[jax.Array] = None) -> jax.Array:
        B, H, W, C = x.shape
        num_heads = heads_for(C, self.num_heads, self.head_channels)
        if np.ndim(context) != 3 or np.shape(context)[0] != B:
            raise ValueError(f"context: expected shape [{B}, L, D], got shape {tuple(np.shape(context))}")
        L = np.shape(context)[1]
        if context_mask is None:
            context_mask = jnp.ones((B, L), bool)
        if tuple(np.shape(context_mask)) != (B, L) or jnp.result_type(context_mask) != jnp.bool_:
            raise ValueError(
                f"context_mask: expected a bool array of shape {(B, L)}, got shape {tuple(np.shape(context_mask))} "
                f"dtype {jnp.result_type(context_mask)}"
            )
        d = C // num_heads
        dense = lambda name, scale=1.0: nn.Dense(
            C, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=default_init(scale), name=name
        )
        h = group_norm(C, self.dtype, "norm", self.norm_groups, self.norm_eps)(x)
        q = dense("q")(h).reshape(B, H * W, num_heads, d)
        ctx = context.astype(self.dtype)
        null_token = lambda name: jnp.broadcast_to(
            self.param(name, nn.initializers.normal(1.0), (C,), jnp.float32).astype(self.dtype), (B, 1, C)
        )
        k = jnp.concatenate([null_token("null_key"), dense("k")(ctx)], axis=1).reshape(B, L + 1, num_heads, d)
        v = jnp.concatenate([null_token("null_value"), dense("v")(ctx)], axis=1).reshape(B, L + 1, num_heads, d)
        mask = jnp.concatenate([jnp.ones((B, 1), bool), context_mask], axis=1)[:, None, None, :]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(B, H, W, C)
        return x + dense("proj_out", 0.0)(out)


class AttentionPool2d(nn.Module):
    """Attention pooling of a feature map to a vector (CLIP; ADM's classifier head).

    tokens = [mean over positions; the H*W positions] + learned positional embedding;
    one multi-head attention step whose query is the mean token; then a Dense to
    ``out_features``. Call: ``x: [B, H, W, C]`` -> ``[B, out_features]``. The positional
    embedding is sized at init, so the spatial size must stay fixed.
    """

    out_features: int
    num_heads: int = 1
    dtype: Dtype = jnp.float32
    head_channels: Optional[int] = None  # as AttentionBlock's

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        num_heads = heads_for(C, self.num_heads, self.head_channels)
        d = C // num_heads
        tokens = x.reshape(B, H * W, C)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(C**-0.5), (H * W + 1, C), jnp.float32)
        tokens = tokens + pos.astype(self.dtype)
        qkv = nn.Dense(3 * C, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=default_init(), name="qkv")(tokens)
        q, k, v = (a.reshape(B, H * W + 1, num_heads, d) for a in jnp.split(qkv, 3, axis=-1))
        logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], k, preferred_element_type=jnp.float32) / math.sqrt(d)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        pooled = jnp.einsum("bhk,bkhd->bhd", weights, v).reshape(B, C)
        return nn.Dense(
            self.out_features, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=default_init(), name="proj"
        )(pooled)
