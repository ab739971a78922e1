"""The diffusion U-Net (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021, ADM).

Images are NHWC. The network is called ``UNet(...).apply(params, x, t, cond)`` with ``cond`` a
mapping of :mod:`jdiff.conditioning` kinds: a class label (learned embedding with a null row,
Ho & Salimans 2022), an image concatenated to the input (super-resolution, SR3 / CDM), context
tokens for cross-attention (LDM, Rombach et al. 2022) and a noise-augmentation level (CDM, Ho
et al. 2022). The network is split into an encoder (time/class embedding, input conv,
downsampling levels, middle block) and a decoder (upsampling levels fed by the encoder's skip
connections, output head), so a ControlNet (Zhang et al. 2023) can run a trainable copy of
:class:`UNetEncoder` with the very same parameter tree and feed its outputs back through
``UNet(...)(..., skip_residuals=...)``, and a noise-aware classifier can reuse the encoder as its
trunk. The network knows nothing of diffusion: ``t`` is whatever the caller feeds the time
embedding (integer steps for DDPM, continuous time for SDE models).

The defaults are the DDPM CIFAR-10 network (35,746,307 parameters with 3 input channels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import conditioning
from jdiff.models.layers import (
    TIME_EMBEDDINGS,
    AttentionBlock,
    Conv,
    CrossAttention,
    Downsample,
    Dtype,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    default_init,
    group_norm,
)

__all__ = ["UNet", "UNetEncoder", "UNetDecoder", "EncoderOutput", "module_from_config", "cifar10_ddpm_unet"]


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def module_from_config(cls, cfg: Any, **overrides) -> nn.Module:
    """Build a linen module ``cls`` from a ConfigDict (or mapping) whose keys are its field names.

    Lists become tuples (command-line overrides give lists) and a dtype may be a string such as
    ``"bfloat16"``. Unknown keys raise a ValueError listing the accepted ones.
    """
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"cfg: expected an ml_collections.ConfigDict or a mapping, got {type(cfg).__name__}")
    kwargs = {**dict(cfg), **overrides}
    allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise ValueError(f"cfg: unknown key(s) {unknown} for {cls.__name__}; expected a subset of {allowed}")
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return cls(**kwargs)


def validate_trunk_fields(m: nn.Module) -> None:
    """Raise a ValueError naming the first bad architecture field of a U-Net-like module (one with
    the trunk fields of ``_UNetFields``, class embedding aside)."""

    def bad(name, expected):
        return ValueError(f"{name}: expected {expected}, got {getattr(m, name)!r}")

    def positive_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0

    if not positive_int(m.base_channels) or m.base_channels < 4 or m.base_channels % 2:
        raise bad("base_channels", "an even int >= 4")
    if not isinstance(m.channel_mult, (tuple, list)) or not m.channel_mult or not all(map(positive_int, m.channel_mult)):
        raise bad("channel_mult", "a non-empty tuple of positive ints")
    if not positive_int(m.num_res_blocks):
        raise bad("num_res_blocks", "a positive int")
    if not isinstance(m.attention_resolutions, (tuple, list)) or not all(map(positive_int, m.attention_resolutions)):
        raise bad("attention_resolutions", "a tuple of positive ints (feature-map heights, e.g. (16,))")
    if not positive_int(m.num_heads):
        raise bad("num_heads", "a positive int")
    if not 0.0 <= m.dropout < 1.0:
        raise bad("dropout", "a rate in [0, 1)")
    if m.time_embedding not in TIME_EMBEDDINGS:
        raise bad("time_embedding", f"one of {TIME_EMBEDDINGS}")
    if not isinstance(m.image_channels, (int, np.integer)) or isinstance(m.image_channels, bool) or m.image_channels < 0:
        raise bad("image_channels", "a non-negative int")
    if m.context_dim is not None:
        if not positive_int(m.context_dim):
            raise bad("context_dim", "None or a positive int")
        if not m.mid_attention and not m.attention_resolutions:
            raise ValueError(
                f"context_dim: cross-attention follows the self-attention blocks, but there are none "
                f"(attention_resolutions=(), mid_attention=False); got context_dim={m.context_dim}"
            )
    if not isinstance(m.aug_level_embedding, (bool, np.bool_)):
        raise bad("aug_level_embedding", "a bool")
    if m.num_head_channels is not None and not positive_int(m.num_head_channels):
        raise bad("num_head_channels", "None or a positive int (the width of every attention head)")
    if m.norm_num_groups is not None:
        widths = sorted({m.base_channels * k for k in m.channel_mult})
        if not positive_int(m.norm_num_groups) or any(c % m.norm_num_groups for c in widths):
            raise bad("norm_num_groups", f"None or a positive divisor of every level's channel count {widths}")
    if not (isinstance(m.norm_eps, (float, int)) and m.norm_eps > 0):
        raise bad("norm_eps", "a positive float")
    if m.downsample_padding not in (0, 1):
        raise bad("downsample_padding", "0 (bottom/right, TF 'SAME') or 1 (every side)")
    if not isinstance(m.flip_sin_to_cos, (bool, np.bool_)):
        raise bad("flip_sin_to_cos", "a bool")
    if not isinstance(m.freq_shift, (float, int)) or not 0 <= m.freq_shift < m.base_channels // 2:
        raise bad("freq_shift", f"a number in [0, base_channels // 2 = {m.base_channels // 2})")
    if not isinstance(m.time_scale, (float, int)) or isinstance(m.time_scale, bool) or not m.time_scale > 0:
        raise bad("time_scale", "a positive number")


class EncoderOutput(NamedTuple):
    """What :class:`UNetEncoder` returns.

    emb: ``[B, 4 * base_channels]`` time (+ class, + augmentation level) embedding.
    skips: the skip connections, shallowest first (input conv, then every block and downsample).
    h: the middle block's output ``[B, H / 2**(L-1), W / 2**(L-1), C_mid]``.
    context, context_mask: ``[B, L, context_dim]`` and ``[B, L]`` bool, the cross-attention
      tokens the decoder attends to (the null ``[B, 1, context_dim]`` zeros, all masked, when
      ``cond`` had none); None when the network has no cross-attention (``context_dim=None``).
    """

    emb: jax.Array
    skips: tuple
    h: jax.Array
    context: Optional[jax.Array] = None
    context_mask: Optional[jax.Array] = None


class _UNetFields(nn.Module):
    """Architecture fields shared by :class:`UNetEncoder`, :class:`UNetDecoder` and :class:`UNet`.

    base_channels: channels of the first level (DDPM: 128).
    channel_mult: per-level channel multipliers; len(channel_mult) - 1 downsamplings.
    num_res_blocks: residual blocks per level on the way down (the way up has one more).
    attention_resolutions: feature-map heights at which self-attention follows each block.
    num_heads: attention heads. dropout: rate inside residual blocks (training only).
    resblock_updown: resample with BigGAN-style residual blocks (ADM) instead of Downsample /
      Upsample. conv_resample: Downsample / Upsample with convolutions (else pool / nearest).
    scale_shift_norm: adaptive group norm (ADM) instead of adding the time embedding.
    mid_attention: self-attention in the middle block (DDPM always has it).
    num_classes: None, or the number of classes of a learned class embedding with
      ``num_classes + 1`` rows; row ``num_classes`` is the null class of classifier-free
      guidance (Ho & Salimans 2022), used when ``cond`` has no "label".
    image_channels: channels of ``cond["image"]``, concatenated to ``x`` (super-resolution,
      inpainting); 0 for none.
    context_dim: None, or the width D of ``cond["context"]`` ``[B, L, D]``: a
      :class:`~jdiff.models.layers.CrossAttention` block follows every self-attention block
      (down, middle and up), LDM-style (Rombach et al. 2022, sec. 3.3).
    aug_level_embedding: embed ``cond["aug_level"]`` ``[B]`` (in the units of ``t``) with its own
      time embedding and add it to the time embedding: the noise-conditioning augmentation of
      cascaded diffusion (Ho et al. 2022, CDM sec. 4.1).
    time_embedding: "sinusoidal" (DDPM) or "fourier" (score SDE), with fourier_scale / seed.
    dtype: computation dtype; parameters are float32 and the output is float32.

    Fields that let imported networks (:mod:`jdiff.convert`: diffusers ``UNet2DModel``, OpenAI's
    improved / guided diffusion) run exactly; the defaults are jdiff's own layout:
    num_head_channels: None (``num_heads`` heads everywhere) or the width of every attention
      head, so each level has ``channels / num_head_channels`` heads (ADM's
      ``num_head_channels``, diffusers' ``attention_head_dim``).
    norm_num_groups: None (:func:`~jdiff.models.layers.norm_groups`, which suits tiny widths) or
      the group count of every GroupNorm (32 in DDPM, ADM and diffusers). norm_eps: their
      epsilon (1e-6; OpenAI and diffusers' default 1e-5).
    downsample_padding: 1 (the stride-2 conv pads every side, as OpenAI) or 0 (bottom / right
      only, TensorFlow "SAME", as the DDPM reference and diffusers' DDPM checkpoints).
    flip_sin_to_cos, freq_shift: the sinusoidal time embedding's layout
      (:func:`~jdiff.models.layers.sinusoidal_embedding`; OpenAI: True, 0).
    time_scale: the time embedding sees ``t * time_scale`` (1: ``t`` itself). improved-diffusion's
      ``rescale_timesteps`` fed its networks ``t * 1000 / T``: its 4000-step models have 0.25.
    """

    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    resblock_updown: bool = False
    conv_resample: bool = True
    scale_shift_norm: bool = False
    mid_attention: bool = True
    num_classes: Optional[int] = None
    image_channels: int = 0
    context_dim: Optional[int] = None
    aug_level_embedding: bool = False
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    fourier_seed: int = 0
    dtype: Dtype = jnp.float32
    num_head_channels: Optional[int] = None
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-6
    downsample_padding: int = 1
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    time_scale: float = 1.0

    def __post_init__(self):
        validate_trunk_fields(self)
        if self.num_classes is not None and (not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1):
            raise ValueError(f"num_classes: expected None or a positive int, got {self.num_classes!r}")
        super().__post_init__()

    @classmethod
    def from_config(cls, cfg: Any, **overrides):
        """Build from an ml_collections ``model`` ConfigDict whose keys are this class's fields."""
        return module_from_config(cls, cfg, **overrides)

    def _shared_fields(self, target) -> dict:
        names = {f.name for f in dataclasses.fields(target)} - {"parent", "name"}
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def _norm(self) -> dict:
        return dict(norm_groups=self.norm_num_groups, norm_eps=self.norm_eps)

    def _res(self) -> dict:
        """The keyword arguments every :class:`ResBlock` of this network takes."""
        return dict(dropout=self.dropout, scale_shift_norm=self.scale_shift_norm, dtype=self.dtype, **self._norm())

    def _attention(self, h: jax.Array, context, context_mask, name: str) -> jax.Array:
        """Self-attention ``name``, then (with ``context_dim``) cross-attention to the context."""
        heads = dict(head_channels=self.num_head_channels, **self._norm())
        h = AttentionBlock(self.num_heads, self.dtype, **heads, name=name)(h)
        if self.context_dim is not None:
            h = CrossAttention(self.num_heads, self.dtype, **heads, name=name.replace("attn", "cross_attn"))(
                h, context, context_mask)
        return h

    def _validate_inputs(self, x, t, cond) -> dict:
        """Static-shape checks, run while tracing (before XLA compiles anything). Returns ``cond``
        as a dict ({} for None)."""
        if np.ndim(x) != 4:
            raise ValueError(f"x: expected rank 4 [B, H, W, C] (NHWC), got shape {_shape(x)}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"x: expected a floating dtype, got {jnp.result_type(x)}")
        B, H, W, _ = _shape(x)
        factor = 2 ** (len(self.channel_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(
                f"x: expected height and width divisible by 2**(len(channel_mult) - 1) = {factor}, got shape {_shape(x)}"
            )
        if np.ndim(t) != 1 or _shape(t)[0] != B:
            raise ValueError(f"t: expected shape [{B}] (one time per example of x), got shape {_shape(t)}")
        cond = {} if cond is None else cond
        conditioning.check(cond, B)
        cond = dict(cond)

        def expect(key, shape):
            if _shape(cond[key]) != shape:
                raise ValueError(f"cond[{key!r}]: expected shape {shape}, got shape {_shape(cond[key])}")

        def unused(key, why):
            if key in cond:
                raise ValueError(f"cond[{key!r}]: given (shape {_shape(cond[key])}) but {why}")

        unused("tokens", "a plain UNet has no text encoder: a TextUNet (model name 'text_unet') reads token ids")
        unused("control", "a plain UNet takes no control image: a ControlNet wrapper consumes cond['control'] "
                          "and feeds the U-Net skip_residuals / input_residual")
        if self.num_classes is None:
            unused("label", "the network has no class embedding (num_classes=None)")
        elif "label" in cond and not isinstance(cond["label"], jax.core.Tracer):
            labels = np.asarray(cond["label"])
            if labels.min() < 0 or labels.max() > self.num_classes:
                raise ValueError(
                    f"cond['label']: expected labels in [0, {self.num_classes}] ({self.num_classes} = null class), "
                    f"got min {labels.min()}, max {labels.max()}"
                )
        if self.image_channels:
            if "image" not in cond:
                raise ValueError(
                    f"cond['image']: expected an image [B, H, W, {self.image_channels}] (image_channels="
                    f"{self.image_channels}), got none; cond has keys {sorted(cond)}"
                )
            expect("image", (B, H, W, self.image_channels))
        else:
            unused("image", "image_channels=0")
        if self.context_dim is not None:
            if "context" in cond:
                expect("context", (B, _shape(cond["context"])[1], self.context_dim))
        else:
            unused("context", "the network has no cross-attention (context_dim=None)")
        if self.aug_level_embedding:
            if "aug_level" not in cond:
                raise ValueError(
                    f"cond['aug_level']: expected a [B] augmentation level (aug_level_embedding=True), got none; "
                    f"cond has keys {sorted(cond)}"
                )
            if not (jnp.issubdtype(jnp.result_type(cond["aug_level"]), jnp.integer)
                    or jnp.issubdtype(jnp.result_type(cond["aug_level"]), jnp.floating)):
                raise ValueError(f"cond['aug_level']: expected an int or float array, got dtype {jnp.result_type(cond['aug_level'])}")
        else:
            unused("aug_level", "aug_level_embedding=False")
        return cond


class UNetEncoder(_UNetFields):
    """Embedding, input conv, downsampling levels and middle block of the U-Net.

    Call: ``x: [B, H, W, C]``, ``t: [B]`` int or float, ``cond`` a :mod:`jdiff.conditioning`
    mapping or None (see :class:`UNet`), ``input_residual: [B, H, W, base_channels]`` or None
    (added after the input conv: ControlNet's entry point for the control image).
    Returns :class:`EncoderOutput`.
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: Optional[Mapping[str, jax.Array]] = None,
        train: bool = False,
        input_residual: Optional[jax.Array] = None,
    ) -> EncoderOutput:
        cond = self._validate_inputs(x, t, cond)
        B, H, W, _ = x.shape
        ch = self.base_channels
        if input_residual is not None and _shape(input_residual) != (B, H, W, ch):
            raise ValueError(f"input_residual: expected shape {(B, H, W, ch)}, got shape {_shape(input_residual)}")

        time_embed = lambda name: TimestepEmbedding(
            ch, 4 * ch, self.time_embedding, self.fourier_scale, self.fourier_seed, self.dtype,
            self.flip_sin_to_cos, self.freq_shift, name=name
        )
        emb = time_embed("time_embed")(t if self.time_scale == 1.0 else t * self.time_scale)
        if self.num_classes is not None:
            labels = cond.get("label", jnp.full((B,), self.num_classes, jnp.int32))
            emb = emb + nn.Embed(
                self.num_classes + 1, 4 * ch, dtype=self.dtype, param_dtype=jnp.float32, name="class_embed"
            )(labels)
        if self.aug_level_embedding:
            emb = emb + time_embed("aug_embed")(cond["aug_level"])

        context = context_mask = None
        if self.context_dim is not None:
            if "context" in cond:
                context = cond["context"]
                context_mask = cond.get("context_mask", jnp.ones(_shape(context)[:2], bool))
            else:  # The null conditioning: one zero token, masked out (only the null token is seen).
                context = jnp.zeros((B, 1, self.context_dim), self.dtype)
                context_mask = jnp.zeros((B, 1), bool)

        if self.image_channels:
            x = jnp.concatenate([x, cond["image"].astype(x.dtype)], axis=-1)
        h = Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=default_init(), name="conv_in")(x.astype(self.dtype))
        if input_residual is not None:
            h = h + input_residual.astype(h.dtype)
        skips = [h]
        res = self._res()
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(ch * mult, **res, name=f"down_{level}_block_{i}")(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = self._attention(h, context, context_mask, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != last:
                if self.resblock_updown:
                    h = ResBlock(resample="down", **res, name=f"down_{level}_downsample")(h, emb, train)
                else:
                    h = Downsample(self.conv_resample, self.dtype, self.downsample_padding, name=f"down_{level}_downsample")(h)
                skips.append(h)

        h = ResBlock(**res, name="mid_block_1")(h, emb, train)
        if self.mid_attention:
            h = self._attention(h, context, context_mask, "mid_attn")
        h = ResBlock(**res, name="mid_block_2")(h, emb, train)
        return EncoderOutput(emb, tuple(skips), h, context, context_mask)


class UNetDecoder(_UNetFields):
    """Upsampling levels and output head: consumes :class:`EncoderOutput` (DDPM appendix B).

    Fields: ``out_channels`` (required, keyword) and the trunk fields of ``_UNetFields``; it reads
    base_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads, dropout,
    resblock_updown, conv_resample, scale_shift_norm, context_dim and dtype (the encoder-only
    fields are accepted so one set of fields builds both halves, and ignored).

    Each level runs ``num_res_blocks + 1`` residual blocks on ``concat(h, skip)``, with
    self-attention (and cross-attention to ``enc.context`` when ``context_dim`` is set) at the
    attention resolutions; the head is GroupNorm -> swish -> 3x3 conv, zero-initialised so a
    fresh U-Net outputs exactly 0 (as in DDPM and vdm). Returns ``[B, H, W, out_channels]`` float32.
    """

    out_channels: int = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(self, enc: EncoderOutput, train: bool = False) -> jax.Array:
        emb, h = enc.emb, enc.h
        skips = list(enc.skips)
        if self.context_dim is not None and enc.context is None:
            raise ValueError(
                f"enc.context: expected the encoder's [B, L, {self.context_dim}] context tokens "
                f"(context_dim={self.context_dim}), got None"
            )
        res = self._res()
        for level in reversed(range(len(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.base_channels * self.channel_mult[level], **res, name=f"up_{level}_block_{i}")(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = self._attention(h, enc.context, enc.context_mask, f"up_{level}_attn_{i}")
            if level != 0:
                if self.resblock_updown:
                    h = ResBlock(resample="up", **res, name=f"up_{level}_upsample")(h, emb, train)
                else:
                    h = Upsample(self.conv_resample, self.dtype, name=f"up_{level}_upsample")(h)
        assert not skips, "encoder and decoder disagree on the number of skip connections"
        h = nn.swish(group_norm(h.shape[-1], self.dtype, "norm_out", self.norm_num_groups, self.norm_eps)(h))
        h = Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=default_init(0.0), name="conv_out")(h)
        return h.astype(jnp.float32)


class UNet(_UNetFields):
    """The diffusion U-Net: ``UNet(...).apply(params, x, t, cond)``.

    Fields: the architecture fields documented on ``_UNetFields`` (base_channels, channel_mult,
    num_res_blocks, attention_resolutions, num_heads, dropout, resblock_updown, conv_resample,
    scale_shift_norm, mid_attention, num_classes, image_channels, context_dim,
    aug_level_embedding, time_embedding, fourier_scale, fourier_seed, dtype, and the import
    fields num_head_channels, norm_num_groups, norm_eps, downsample_padding, flip_sin_to_cos,
    freq_shift, time_scale), plus
    ``out_channels`` (None: the channels of ``x``) and ``learn_sigma`` (double the output to
    ``2 * out_channels``: [eps, variance interpolation v], Nichol & Dhariwal 2021 eq. 15).

    Call:
      x: ``[B, H, W, C]`` float, H and W divisible by ``2**(len(channel_mult) - 1)``.
      t: ``[B]`` int or float.
      cond: None or a mapping with keys from :data:`jdiff.conditioning.KINDS`:
        "label" ``[B]`` int in [0, num_classes] (only if num_classes; missing: the null class
          num_classes);
        "image" ``[B, H, W, image_channels]``, concatenated to x (required iff image_channels > 0);
        "context" ``[B, L, context_dim]`` and "context_mask" ``[B, L]`` bool (only if context_dim;
          missing: the null context, which only the learned null token answers; no mask: every
          token is real);
        "aug_level" ``[B]`` int or float (required iff aug_level_embedding).
        "control" is refused: a ControlNet wrapper consumes it. Every other key, or a shape that
        does not match, raises a ValueError while tracing.
      train: enables dropout (then pass ``rngs={"dropout": key}``).
      skip_residuals: ControlNet hook (Zhang et al. 2023): a sequence with one array per skip
        connection, each shaped like it, followed by one for the middle block's output; all are
        added before the decoder. ``UNetEncoder`` with this network's fields yields exactly
        these shapes (``EncoderOutput.skips + (EncoderOutput.h,)``).
      input_residual: ControlNet's hint, passed to :class:`UNetEncoder`.
    Returns ``[B, H, W, out_channels or C]`` (x2 with learn_sigma), float32.
    """

    out_channels: Optional[int] = None
    learn_sigma: bool = False

    def __post_init__(self):
        if self.out_channels is not None and (not isinstance(self.out_channels, (int, np.integer)) or self.out_channels < 1):
            raise ValueError(f"out_channels: expected None or a positive int, got {self.out_channels!r}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: Optional[Mapping[str, jax.Array]] = None,
        train: bool = False,
        skip_residuals: Optional[Sequence[jax.Array]] = None,
        input_residual: Optional[jax.Array] = None,
    ) -> jax.Array:
        cond = self._validate_inputs(x, t, cond)
        enc = UNetEncoder(**self._shared_fields(UNetEncoder), name="encoder")(x, t, cond, train, input_residual)
        if skip_residuals is not None:
            expected = [_shape(s) for s in enc.skips] + [_shape(enc.h)]
            got = [_shape(r) for r in skip_residuals]
            if got != expected:
                raise ValueError(f"skip_residuals: expected {len(expected)} arrays of shapes {expected}, got {got}")
            *skip_res, mid_res = skip_residuals
            enc = enc._replace(
                skips=tuple(s + r.astype(s.dtype) for s, r in zip(enc.skips, skip_res)),
                h=enc.h + mid_res.astype(enc.h.dtype),
            )
        out_ch = self.out_channels or x.shape[-1]
        if self.learn_sigma:
            out_ch *= 2
        fields = self._shared_fields(UNetDecoder)
        fields.pop("out_channels")
        return UNetDecoder(out_channels=out_ch, **fields, name="decoder")(enc, train)


def cifar10_ddpm_unet(**overrides) -> UNet:
    """The DDPM CIFAR-10 network (Ho et al. 2020, appendix B): 128 channels, multipliers
    (1, 2, 2, 2), 2 residual blocks per level, attention at 16x16, dropout 0.1; 35.7M params."""
    fields = dict(
        base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
        num_heads=1, dropout=0.1, resblock_updown=False, conv_resample=True, scale_shift_norm=False,
        time_embedding="sinusoidal",
    )
    return UNet(**{**fields, **overrides})
